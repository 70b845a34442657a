"""LoRA adapters on diffusers / transformers models with peft, as jaxdiff.models.lora does for the JAX backend.

Adapters are peft's (``inject_adapter_in_model``) on the layers the settings' targets name, float32 whatever the
base weights' dtype, starting from ``adapters.initial_lora_a`` (keyed by the run's seed and the module's file key,
so both backends start from the same numbers) and a zero ``lora_B``, on Linear and Conv2d layers alike. Their file
is written by ``adapters.save_lora_file``, the JAX backend's writer.
"""

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from jaxdiff.adapters import LoRASettings, initial_lora_a, save_lora_file


def add_lora(model: torch.nn.Module, settings: LoRASettings, prefix: str, *, seed: int) -> list[str]:
    """Freezes ``model`` and adds a trainable float32 adapter to every layer the settings' targets name for the
    file's ``prefix`` (``unet``, ``text_encoder``, ...); returns the adapted modules' names. Raises ValueError when
    no layer matches."""
    targets = list(settings.targets(prefix))
    model.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"no layer of {type(model).__name__} ({prefix}) matches the LoRA targets {targets}") from err
    names = []
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            down, up = layer.lora_A["default"], layer.lora_B["default"]
            a = initial_lora_a(seed, f"{prefix}.{name}", tuple(down.weight.shape))  # (rank, in[, kh, kw])
            down.float().weight.copy_(torch.from_numpy(a))
            up.float().weight.zero_()
            names.append(name)
    return names


def lora_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The adapters of ``model`` under diffusers' peft keys ``<prefix>.<module>.lora_A/B.weight`` (float32)."""
    return {
        f"{prefix}.{key}": value.detach().float().cpu().numpy()
        for key, value in get_peft_model_state_dict(model).items()
    }


def save_lora_weights(
    folder: Path, models: Mapping[str, torch.nn.Module], settings: LoRASettings, *, kohya: bool = False
) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` with every adapter of ``models`` (prefix -> model), their
    configs in the metadata (and with ``kohya`` the kohya file)."""
    tensors: dict[str, np.ndarray] = {}
    for prefix, model in models.items():
        tensors.update(lora_state_dict(model, prefix))
    return save_lora_file(folder, tensors, settings, kohya=kohya)


def merge_lora(model: torch.nn.Module) -> None:
    """Folds every adapter into its layer's weight (peft's merge) and puts the plain layer back in its place, in
    place: ``model`` then computes what it computed adapted, as the diffusers model it was."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, every peft adapter of ``model`` is off (peft's ``enable_adapters(False)``): it computes its base model,
    e.g. LCM-LoRA's teacher, without a second copy in memory. Afterwards the adapters that were on are on again and
    every parameter's ``requires_grad`` is what it was (peft's ``enable_adapters(True)`` would make them trainable)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
