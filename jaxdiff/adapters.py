"""LoRA training settings and files, shared by both backends (no JAX, no torch).

Which layers get adapters (peft's target matching), their starting values, and diffusers' LoRA weights files:
``pytorch_lora_weights.safetensors`` in peft format (``<prefix>.<module>.lora_A.weight`` (rank, in) and
``.lora_B.weight`` (out, rank); a convolution's (rank, in, kh, kw) and (out, rank, 1, 1)) with the
``lora_adapter_metadata`` that keeps each prefix's rank and alpha (without it diffusers would assume alpha = rank),
and with ``--output_kohya_format`` the same adapters under kohya's names.
"""

import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from jaxdiff.config import TrainConfig
from jaxdiff.files import atomic_write_bytes

#: diffusers' LoRA scripts' targets: the UNet's attention projections (SDXL's added ones where present) and the
#: CLIP text encoders' (with --train_text_encoder).
UNET_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
UNET_ADDED_TARGETS: tuple[str, ...] = ("add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
#: diffusers' LCM-LoRA scripts' (train_lcm_distill_lora_sd(xl)_wds.py) default UNet targets: attention and
#: feed-forward projections, the resnets' convolutions and time projections, the down/upsampling convolutions
#: (Conv layers among them: peft's conv LoRA).
LCM_UNET_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"
#: kohya's name of each module prefix.
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
#: The rank the lcm_lora task trains when --lora_rank is not given (diffusers' LCM-LoRA script's default).
LCM_LORA_DEFAULT_RANK = 64


def matches(name: str, targets: Sequence[str]) -> bool:
    """Whether the module called ``name`` is one of ``targets`` (peft's rule: equal, or ending in ``.target``)."""
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """A LoRA run's adapters: rank, alpha (scale alpha / rank), dropout on their input, UNet targets."""

    rank: int
    alpha: float
    dropout: float
    unet_targets: tuple[str, ...]
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS

    @classmethod
    def from_config(cls, config: TrainConfig) -> "LoRASettings | None":
        """The run's settings, or None when it trains full weights (no --lora_rank; lcm_lora always has one). The
        UNet targets without --lora_target_modules: `LCM_UNET_TARGETS` for lcm_lora, else the attention projections."""
        lcm = config.task == "lcm_lora"
        rank = config.lora_rank or (LCM_LORA_DEFAULT_RANK if lcm else None)
        if rank is None:
            return None
        default_targets = LCM_UNET_TARGETS if lcm else (*UNET_TARGETS, *UNET_ADDED_TARGETS)
        targets = tuple(config.lora_target_modules or default_targets)
        alpha = rank if config.lora_alpha is None else config.lora_alpha
        return cls(rank=rank, alpha=alpha, dropout=config.lora_dropout, unet_targets=targets)

    def targets(self, prefix: str) -> tuple[str, ...]:
        """The targets of the model at ``prefix`` (``unet``, ``text_encoder``, ``text_encoder_2``)."""
        return self.unet_targets if prefix == "unet" else self.text_encoder_targets

    def peft_config(self, modules: Sequence[str]) -> dict[str, Any]:
        """The peft ``LoraConfig`` fields that reproduce adapters on ``modules`` (the metadata of the file)."""
        return {
            "r": self.rank,
            "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "target_modules": sorted(modules),
            "init_lora_weights": "gaussian",
            "lora_dropout": self.dropout,
            "bias": "none",
            "use_dora": False,
        }


def initial_lora_a(seed: int, key: str, shape: Sequence[int]) -> np.ndarray:
    """The starting ``lora_A.weight`` of the adapter whose file key is ``key`` (``unet.<module>``), of peft's
    ``shape``: (rank, in) on a Linear, (rank, in, kh, kw) on a Conv. peft's "gaussian" N(0, 1 / rank^2), drawn with
    NumPy from (seed, key), so both backends, any mesh and any module order start from the same adapters
    (``lora_B`` starts at zero: the adapted model equals the base)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return (rng.standard_normal(tuple(shape)) / shape[0]).astype(np.float32)


def to_kohya(tensors: Mapping[str, np.ndarray], alphas: Mapping[str, float]) -> dict[str, np.ndarray]:
    """peft-format adapters as kohya names them: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` and
    an ``.alpha`` scalar per module (``alphas``: prefix -> alpha), the layout diffusers'
    ``convert_state_dict_to_kohya`` writes, with the run's alpha instead of the rank."""
    kohya = {}
    for key, value in tensors.items():
        prefix, rest = key.split(".", 1)
        module, kind, _ = rest.rsplit(".", 2)  # <module>.lora_A.weight
        name = f"{KOHYA_PREFIXES[prefix]}_{module.replace('.', '_')}"
        kohya[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = np.asarray(alphas[prefix], np.float32)
    return kohya


def save_lora_file(
    folder: Path, tensors: Mapping[str, np.ndarray], settings: LoRASettings, *, kohya: bool = False
) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` holding ``tensors`` (peft keys, every prefix) and each prefix's
    peft config in its metadata; with ``kohya`` also the kohya file. Written atomically; returns the peft file."""
    prefixes = sorted({key.split(".", 1)[0] for key in tensors})
    metadata: dict[str, Any] = {}
    for prefix in prefixes:
        modules = {key.split(".", 1)[1].rsplit(".", 2)[0] for key in tensors if key.startswith(prefix + ".")}
        metadata.update({f"{prefix}.{k}": v for k, v in settings.peft_config(sorted(modules)).items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    path = folder / LORA_WEIGHTS_NAME
    atomic_write_bytes(path, save(arrays, metadata=header))
    if kohya:
        kohya_arrays = to_kohya(arrays, {prefix: settings.alpha for prefix in prefixes})
        atomic_write_bytes(folder / KOHYA_WEIGHTS_NAME, save(kohya_arrays, metadata={"format": "pt"}))
    return path
