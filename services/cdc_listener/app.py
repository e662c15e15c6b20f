"""The CDC listener service (defined in :mod:`sf_poller.cdc`, see the package docstring)."""

from sf_poller.cdc import SERVICE

__all__ = ["SERVICE"]
