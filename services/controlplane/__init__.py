"""controlplane service."""
