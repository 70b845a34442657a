"""jaxdiff: train Stable Diffusion-family models on TPU with JAX."""

__version__ = "0.1.0"
