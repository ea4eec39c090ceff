"""retromae-ds: a DeepSpeed pre-training engine for RetroMAE-style retrieval encoders."""

__version__ = "0.1.0"
