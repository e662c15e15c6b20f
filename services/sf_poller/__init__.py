"""sf_poller service."""
