"""Site: data ingestion, local DP training, the ClientApp and the site CLI."""
