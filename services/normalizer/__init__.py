"""normalizer service."""
