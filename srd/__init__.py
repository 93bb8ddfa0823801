"""SRD: Semantic Reward Defense for backdoored image captioners (reference pipeline)."""

__version__ = "0.1.0"
