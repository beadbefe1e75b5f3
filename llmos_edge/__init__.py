"""llmos-edge: an LLM operating system for edge hardware."""

__version__ = "0.1.0"
