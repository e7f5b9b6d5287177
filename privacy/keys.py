"""Ed25519 site keys that sign a site's privacy ledger.

The private key lives in the site's state folder as `site-key.pem` (PKCS#8 PEM, mode 0600) and the
public key beside the ledger as `site-key.pub` (SubjectPublicKeyInfo PEM). Nothing here logs or
returns the private key's bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyFileError",
    "generate_key_pair",
    "key_id",
    "load_or_create_private_key",
    "load_private_key",
    "load_public_key",
    "verify_signature",
]

logger = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "site-key.pem"
PUBLIC_KEY_FILE = "site-key.pub"


class KeyFileError(ValueError):
    """Raised when a key file is missing, unreadable or not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key's fingerprint: the first 16 hex digits of SHA-256 over its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, private_key: Ed25519PrivateKey) -> None:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL with mode 0600 creates the file readable by its owner only from the first byte, and
    # never overwrites an existing key.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())


def generate_key_pair(out_dir: str | Path) -> tuple[Path, Path]:
    """Create a new key pair in `out_dir` and return the paths of the private and public files.

    Raises
    ------
    KeyFileError
        When `out_dir` already holds a private key, which is never overwritten: a new key would
        make the site's existing ledger unverifiable with the new public key.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    private_path = folder / PRIVATE_KEY_FILE
    public_path = folder / PUBLIC_KEY_FILE
    if private_path.exists():
        msg = (
            f"{private_path}: a site key already exists and is never overwritten; choose another "
            "folder with --out."
        )
        raise KeyFileError(msg)

    private_key = Ed25519PrivateKey.generate()
    _write_private(private_path, private_key)
    public_path.write_bytes(_public_pem(private_key.public_key()))
    logger.info("Created site key %s in %s", key_id(private_key.public_key()), folder)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError as err:
        msg = f"{file}: private key file not found; create one with `fedtwin-steward keygen`."
        raise KeyFileError(msg) from err
    except OSError as err:
        msg = f"{file}: private key file cannot be read ({err.strerror})."
        raise KeyFileError(msg) from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        msg = f"{file}: not an unencrypted PEM private key ({err})."
        raise KeyFileError(msg) from err
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{file}: the private key is {type(key).__name__}, expected Ed25519."
        raise KeyFileError(msg)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key, such as a site's `site-key.pub`."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError as err:
        msg = (
            f"{file}: public key file not found; pass the site's site-key.pub (it lies beside the "
            "site's ledger.jsonl)."
        )
        raise KeyFileError(msg) from err
    except OSError as err:
        msg = f"{file}: public key file cannot be read ({err.strerror})."
        raise KeyFileError(msg) from err
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        msg = f"{file}: not a PEM public key ({err})."
        raise KeyFileError(msg) from err
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{file}: the public key is {type(key).__name__}, expected Ed25519."
        raise KeyFileError(msg)
    return key


def load_or_create_private_key(state_dir: str | Path) -> Ed25519PrivateKey:
    """Return the site key of a state folder, creating the pair on first use.

    The public key file is rewritten from the private key when it is missing, so it always
    matches the key that signs.
    """
    folder = Path(state_dir)
    private_path = folder / PRIVATE_KEY_FILE
    if not private_path.exists():
        generate_key_pair(folder)
    private_key = load_private_key(private_path)

    public_path = folder / PUBLIC_KEY_FILE
    if not public_path.exists():
        public_path.write_bytes(_public_pem(private_key.public_key()))
    return private_key


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Return True when `signature` is the key's Ed25519 signature of `message`."""
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
