"""fo_poller service."""
