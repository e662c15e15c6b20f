"""ce_poller service."""
