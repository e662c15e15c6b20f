"""cdc_listener service."""
