"""LoRA adapters on a model's Linear and Conv layers, as peft adapts them, and their diffusers LoRA weights file
(``jaxdiff.adapters``).

Layers are chosen as peft chooses them (``adapters.matches``): ``to_q`` matches every attention's query
projection, ``attn1.to_q`` only self-attention's. Adapters are float32 ``nn.LoRAParam`` variables whatever the
base weights' dtype, and start from ``adapters.initial_lora_a`` (keyed by the run's seed and the module's file key,
so the torch backend starts from the same numbers) and a zero ``up``.
"""

import logging
import zlib
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.adapters import LoRASettings, initial_lora_a, matches, save_lora_file
from jaxdiff.models.nn import Conv, Linear, LoRA, LoRAParam

log = logging.getLogger("jaxdiff")


def _root(model: nnx.Module) -> str:
    """Where the torch twin's module names start: a model whose torch class is one of its submodules
    (``torch_module_root``, e.g. CLIP's ``text_model``) names layers from there."""
    return getattr(type(model), "torch_module_root", "")


def _torch_name(path: tuple, root: str) -> str:
    name = ".".join(map(str, path))
    return name.removeprefix(f"{root}.") if root else name


def _adaptable(model: nnx.Module) -> list[tuple[str, Linear | Conv]]:
    """(torch module name, layer) of every Linear and Conv of ``model``: the layers that can hold an adapter."""
    root = _root(model)
    return [(_torch_name(p, root), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear | Conv)]


def _lora_a_shape(layer: Linear | Conv, rank: int) -> tuple[int, ...]:
    """peft's ``lora_A.weight`` shape for ``layer``: (rank, in), or (rank, in, kh, kw) for a Conv."""
    return (rank, layer.in_features, *(layer.kernel_size if isinstance(layer, Conv) else ()))


def _down_from_torch(lora_a: np.ndarray) -> np.ndarray:
    """peft's ``lora_A.weight`` (rank, in, *kernel) as our ``down`` (*kernel, in, rank)."""
    return np.ascontiguousarray(np.transpose(lora_a, (*range(2, lora_a.ndim), 1, 0)))


def _down_to_torch(down: np.ndarray) -> np.ndarray:
    """Our ``down`` (*kernel, in, rank) as peft's ``lora_A.weight`` (rank, in, *kernel)."""
    return np.ascontiguousarray(np.transpose(down, (down.ndim - 1, down.ndim - 2, *range(down.ndim - 2))))


def _up_to_torch(up: np.ndarray, conv: bool) -> np.ndarray:
    """Our ``up`` (rank, out) as peft's ``lora_B.weight``: (out, rank), or (out, rank, 1, 1) for a Conv."""
    return np.ascontiguousarray(up.T.reshape(*up.T.shape, *((1, 1) if conv else ())))


def add_lora(
    model: nnx.Module, settings: LoRASettings, prefix: str, *, seed: int = 0, abstract: bool = False
) -> list[str]:
    """Adds an adapter to every Linear and Conv of ``model`` (the file's ``prefix``: ``unet``, ``text_encoder``, ...)
    that the settings' targets name, starting from `initial_adapters`' values (``abstract``: shapes only, for an
    abstract model); returns the adapted modules' names. Raises ValueError when no layer matches."""
    if settings.rank < 1:
        raise ValueError(f"LoRA rank={settings.rank}: must be >= 1")
    targets = settings.targets(prefix)
    chosen = [(name, layer) for name, layer in _adaptable(model) if matches(name, targets)]
    if not chosen:
        raise ValueError(
            f"no Linear or Conv layer of {type(model).__name__} ({prefix}) matches the LoRA targets {list(targets)}"
        )
    unmatched = [t for t in targets if not any(matches(name, (t,)) for name, _ in chosen)]
    if unmatched:
        log.info("%s: LoRA targets %s match no layer", prefix, unmatched)
    for name, layer in chosen:
        a_shape, up_shape = _lora_a_shape(layer, settings.rank), (settings.rank, layer.out_features)
        if abstract:
            down_shape = (*a_shape[2:], a_shape[1], a_shape[0])
            down, up = jax.ShapeDtypeStruct(down_shape, jnp.float32), jax.ShapeDtypeStruct(up_shape, jnp.float32)
        else:
            down = jnp.asarray(_down_from_torch(initial_lora_a(seed, f"{prefix}.{name}", a_shape)))
            up = jnp.zeros(up_shape, jnp.float32)
        stream = zlib.crc32(name.encode()) % 2**31  # each layer's own dropout masks
        layer.lora = LoRA(down, up, alpha=settings.alpha, dropout=settings.dropout, stream=stream)
    return [name for name, _ in chosen]


def initial_adapters(model: nnx.Module, prefix: str, seed: int) -> nnx.State:
    """``nnx.state(model, LoRAParam)`` holding the adapters' starting values (host arrays): what `add_lora` sets,
    for a model whose adapters are abstract."""
    root = _root(model)
    flat = []
    for path, variable in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        shape = variable.get_value().shape
        if path[-1] == "down":  # (*kernel, in, rank)
            a_shape = (shape[-1], shape[-2], *shape[:-2])
            value = _down_from_torch(initial_lora_a(seed, f"{prefix}.{_torch_name(path[:-2], root)}", a_shape))
        else:
            value = np.zeros(shape, np.float32)
        flat.append((path, variable.replace(value)))
    return nnx.from_flat_state(flat)


def lora_state_dict(model: nnx.Module, prefix: str) -> dict[str, np.ndarray]:
    """The adapters of ``model`` under diffusers' peft keys ``<prefix>.<module>.lora_A/B.weight`` in peft's layouts
    (a Linear's (rank, in) and (out, rank), a Conv's (rank, in, kh, kw) and (out, rank, 1, 1)), as host arrays."""
    tensors = {}
    for name, layer in _adaptable(model):
        if layer.lora is not None:
            lora = layer.lora
            down, up = (np.asarray(jax.device_get(v.get_value()), np.float32) for v in (lora.down, lora.up))
            tensors[f"{prefix}.{name}.lora_A.weight"] = _down_to_torch(down)
            tensors[f"{prefix}.{name}.lora_B.weight"] = _up_to_torch(up, isinstance(layer, Conv))
    return tensors


def save_lora_weights(
    folder: Path, models: Mapping[str, nnx.Module], settings: LoRASettings, *, kohya: bool = False
) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` with every adapter of ``models`` (prefix -> model: ``unet``,
    ``text_encoder``, ``text_encoder_2``), their configs in the metadata (and with ``kohya`` the kohya file)."""
    tensors: dict[str, np.ndarray] = {}
    for prefix, model in models.items():
        tensors.update(lora_state_dict(model, prefix))
    return save_lora_file(folder, tensors, settings, kohya=kohya)


def merge_lora(model: nnx.Module) -> None:
    """Folds every adapter into its layer's kernel (in float32, stored in the kernel's dtype) and removes it: the
    model then computes what it computed adapted, as a plain model. A Conv's update ``down @ up`` (kh, kw, in, out)
    is its kernel's: a convolution is linear in its kernel, and ``up`` is a 1x1 one."""
    for _, layer in _adaptable(model):
        if layer.lora is None:
            continue
        lora = layer.lora
        down, up = (np.asarray(jax.device_get(v.get_value()), np.float32) for v in (lora.down, lora.up))
        kernel = np.asarray(jax.device_get(layer.kernel.get_value()))
        merged = kernel.astype(np.float32) + (down @ up) * (lora.alpha / lora.rank)
        layer.kernel.set_value(merged.astype(kernel.dtype))
        layer.lora = None
