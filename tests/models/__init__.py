"""Helpers for parity tests of Flax modules against their diffusers/transformers torch oracles."""

import math
from collections.abc import Callable

import numpy as np
import torch
from flax import nnx

from jaxdiff.models.modeling import abstract_model
from jaxdiff.weights import load_state_dict


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter in place with random values that keep activations of order one.

    Weights get N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2): zero-initialised layers
    (``conv_out``, ``proj_out``) become non-trivial, so a wrong layout or a missed layer cannot hide.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.ndim >= 2:
                param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module.eval()


def copy_torch_weights(ours: nnx.Module, theirs: torch.nn.Module) -> None:
    """Loads the torch module's state dict into ours through ``jaxdiff.weights``."""
    load_state_dict(ours, {k: v.detach().numpy() for k, v in theirs.state_dict().items()})


def load_from_torch(build: Callable[[nnx.Rngs], nnx.Module], theirs: torch.nn.Module) -> nnx.Module:
    """Our module built abstractly (no initialisation compute) and filled from the torch module's state dict."""
    ours = abstract_model(build)
    copy_torch_weights(ours, theirs)
    return ours


def jit_call(module: nnx.Module, *args, **static):
    """``module(*args, **static)`` compiled (so it lands in the persistent cache); ``static`` kwargs are constants."""
    return nnx.jit(lambda m, *a: m(*a, **static))(module, *args)


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def max_abs_diff(ours, theirs) -> float:
    """Max |ours - theirs|; a torch tensor is compared as numpy, shapes must match exactly."""
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
