"""flowgen: exact-likelihood image generation with normalizing flows (Glow, RealNVP)."""

__version__ = "0.1.0"
