"""abliterate: measure a behaviour direction in a causal LM and edit it out of the weights."""

__version__ = "0.1.0"
