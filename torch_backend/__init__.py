"""The torch backend: the shared jaxdiff config run with diffusers + accelerate on GPUs.

Torch is imported only inside this package.
"""
