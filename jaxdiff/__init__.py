"""jaxdiff: train Stable Diffusion-family models on TPU with JAX."""

import logging

__version__ = "0.1.0"

# The JAX core uses only transformers' tokenizers, so transformers' import-time advice that PyTorch is missing
# (printed to every torch-less JAX run) says nothing to a jaxdiff user.
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())
