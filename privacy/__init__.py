"""Opacus accountants, the privacy budget check and the steward CLI."""
