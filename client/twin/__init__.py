"""The per-patient twin at a site: fine-tuned forecasts and risks written as FHIR R4 resources."""
