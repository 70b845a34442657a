"""LoRA adapters on a model's Linear layers, and diffusers' LoRA weights file (peft format).

Layers are chosen as peft chooses them: a target matches the module whose diffusers name equals it or ends
with ``"." + target`` (``to_q`` matches every attention's query projection, ``attn1.to_q`` only
self-attention's). The file holds ``<prefix>.<module>.lora_A.weight`` (rank, in) and ``.lora_B.weight``
(out, rank) per adapted layer, and in its ``lora_adapter_metadata`` the peft config of each prefix (rank,
alpha, targets): without it diffusers would assume alpha = rank.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save

from jaxdiff.files import atomic_write_bytes
from jaxdiff.models.nn import Linear, LoRA

#: diffusers' LoRA scripts' targets for the UNet and for the CLIP text encoders.
UNET_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def _adaptable(model: nnx.Module) -> list[tuple[str, Linear]]:
    """(torch module name, layer) of every Linear; a model whose torch twin is one of its submodules
    (``torch_module_root``) names layers from there."""
    root = getattr(type(model), "torch_module_root", "")
    layers = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            name = ".".join(map(str, path))
            layers.append((name.removeprefix(f"{root}.") if root else name, module))
    return layers


def matches(name: str, targets: Sequence[str]) -> bool:
    """Whether the module called ``name`` is one of ``targets`` (peft's rule)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nnx.Module, targets: Sequence[str], *, rank: int, alpha: float, rngs: nnx.Rngs) -> list[str]:
    """Adds an adapter (in the layer's parameter dtype) to every Linear of ``model`` that ``targets`` names;
    returns their names. Raises ValueError when none matches."""
    if rank < 1:
        raise ValueError(f"LoRA rank={rank}: must be >= 1")
    chosen = [(name, layer) for name, layer in _adaptable(model) if matches(name, targets)]
    if not chosen:
        raise ValueError(f"no Linear layer of {type(model).__name__} matches the LoRA targets {list(targets)}")
    for _, layer in chosen:
        layer.lora = LoRA(
            layer.in_features, layer.out_features, rank=rank, alpha=alpha, dtype=layer.param_dtype, rngs=rngs
        )
    return [name for name, _ in chosen]


def lora_state_dict(model: nnx.Module, prefix: str) -> dict[str, np.ndarray]:
    """The adapters of ``model`` under diffusers' peft keys ``<prefix>.<module>.lora_A/B.weight`` (host arrays)."""
    tensors = {}
    for name, layer in _adaptable(model):
        if layer.lora is not None:
            down, up = jax.device_get((layer.lora.down.get_value(), layer.lora.up.get_value()))
            tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(down).T)
            tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(up).T)
    return tensors


def adapter_config(model: nnx.Module) -> dict:
    """The peft ``LoraConfig`` fields that reproduce ``model``'s adapters (one rank and alpha for all)."""
    adapters = [(name, layer.lora) for name, layer in _adaptable(model) if layer.lora is not None]
    settings = {(lora.rank, lora.alpha) for _, lora in adapters}
    if len(settings) != 1:
        raise ValueError(f"{type(model).__name__}: expected adapters of one rank and alpha, found {sorted(settings)}")
    ((rank, alpha),) = settings
    alpha_value = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "r": rank,
        "lora_alpha": alpha_value,
        "target_modules": sorted(name for name, _ in adapters),
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
    }


def save_lora_weights(folder: Path, models: Mapping[str, nnx.Module]) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` with every adapter of ``models`` (prefix -> model: ``unet``,
    ``text_encoder``, ``text_encoder_2``) and their configs in the metadata; written atomically."""
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, object] = {}
    for prefix, model in models.items():
        tensors.update(lora_state_dict(model, prefix))
        metadata.update({f"{prefix}.{k}": v for k, v in adapter_config(model).items()})
    path = Path(folder) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path
