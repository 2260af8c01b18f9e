"""pocketlm: take a Phi-3-family checkpoint to a phone."""

__version__ = "0.1.0"
