"""points service."""
