"""halokit: align causal LMs with human-aware losses (KTO first) and make them unlearn (NPO)."""

__version__ = "0.1.0"
