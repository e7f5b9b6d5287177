"""FHIR R4 input of a site: Bulk Data NDJSON and Bundles, validated with R4B models."""

from client.fhir.load import FhirTables, read_fhir

__all__ = ["FhirTables", "read_fhir"]
