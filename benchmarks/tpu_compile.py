"""The real train step compiled for TPU generations on this CPU machine: memory against HBM, FLOPs, largest batch.

    python benchmarks/tpu_compile.py --model sd15|sd21|sdxl|tiny|tiny_sdxl|PIPELINE_FOLDER [--task lcm|lcm_sdxl|...]
        --topology v5p-8[,v4-8,...] [--per_device_batch 1] [--gradient_checkpointing] [--mesh DxM]
        [--max_batch] [--json]

Needs libtpu (``pip install -e ".[tpu]"``); no TPU. jax runs on the host CPU and libtpu compiles for a topology
description (`jax.experimental.topologies.get_topology_desc`), so XLA's TPU compiler reports what the program needs
on the real chips. The step is the trainer's own (`jaxdiff.trainer.TrainProgram`), lowered from abstract shapes: the
built-in model configs (the published config.json files of runwayml/stable-diffusion-v1-5 at 512 px,
stabilityai/stable-diffusion-2-1 at 768 px, v-prediction, and stabilityai/stable-diffusion-xl-base-1.0 at 1024 px,
task sdxl; ``tiny`` and ``tiny_sdxl``: the tests' shapes) are written to a temporary pipeline folder, configs only,
no weights; ``--model FOLDER`` reads a local pipeline's configs instead. Training settings are the presets': bf16
compute, fp32 master weights, AdamW, EMA (``--no-use_ema`` drops it; LCM's EMA is its target network), images encoded
by the frozen VAE each step (``--cache_latents`` trains on cached latents), ``--attention_implementation xla`` (what
``auto`` picks on an accelerator; on this CPU host ``auto`` would pick ``chunked``).

One row per topology, printed as it finishes (``--json``: one JSON object per line):

* ``mesh``, ``devices`` (JAX devices: a v4-8 or v5p-8 has 4 megacore chips, a v3-8 8 cores), ``per_device_batch``;
* ``peak_bytes``: XLA's peak memory per device (state, batch and temporaries) against ``hbm_bytes``, the HBM per
  device the TPU compiler itself says a program may use (``hbm_spec_bytes``: the chip's published capacity);
  a compile that does not fit fails, and the row says so (``fits``: false);
* ``flops``: the compiled step's FLOPs, all devices (XLA's cost analysis per device x devices; it counts elementwise
  ops too, and nothing inside Pallas kernels), against ``model_flops``, counted from the program: ``model_flops = 3 *
  F(trained) + F(frozen)``, where F sums 2 x multiply-adds of every matmul and convolution (``dot_general``,
  ``conv_general_dilated``) in the jaxpr of one forward of the step's loss at the global batch, split by whether the op
  depends on a trained parameter (UNet: forward + two backward matmuls each) or not (VAE encoder, frozen text encoder,
  LCM's teacher and target network: forward only). ``flops_ratio = flops / model_flops`` shows recomputation (gradient
  checkpointing: ~4/3) and other waste;
* ``max_batch_estimate``: the largest per-device batch that fits if the step's temporaries grow in proportion to
  the batch (state fixed), from this one compile: a lower bound, free;
* with ``--max_batch``: the largest per-device batch that fits, without and with gradient checkpointing. Peak memory
  is fitted as a + b * batch from compiles at the row's batch and twice it, and the predicted largest batch is
  compiled to verify it (bisecting down when it does not fit): up to 5 more compiles per topology and setting.

Compiles take seconds for the tiny model and minutes on this 2-core machine for SD (SD 1.5 for a v5p-8: ~9 min
each), so a run over several topologies is meant to be left alone; rows appear as each completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# jax itself runs on the host CPU (set before jax is imported); libtpu is loaded only to compile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from jax.extend import core as jcore

from jaxdiff import cli, parallel
from jaxdiff.config import LCM_TASKS, ConfigError
from jaxdiff.demo import save_tiny_clip_tokenizer
from jaxdiff.tasks import TASKS

GIB = 2**30
ATTENTIONS = ("xla", "chunked", "splash")
OPTIMIZERS = ("adamw", "adam8bit")

# ---- TPU topologies ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """A Cloud TPU slice as libtpu names its topology, and the published HBM of one JAX device."""

    topology: str  # libtpu's topology name: generation and chip grid
    hbm_spec_gib: int  # per JAX device: a v3 core (2 per chip), else a chip
    chip_config: str | None = None  # "megacore": the chip's 2 TensorCores are one JAX device


TOPOLOGIES = {
    "v3-8": Generation("v3:2x2", 16),  # 4 chips x 2 cores, each core a device with its half of the chip's 32 GiB
    "v4-8": Generation("v4:2x2x1", 32, chip_config="megacore"),
    "v5p-8": Generation("v5p:2x2x1", 96),  # megacore, libtpu's default for v5p; 96 GiB (published as "95 GB")
    "v5e-8": Generation("v5e:2x4", 16),  # v5litepod-8
    "v6e-8": Generation("v6e:2x4", 32),
}
_MULTISLICE = re.compile(r"^(?:(\d+)x)?(v\w+-\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: list[Any]
    hbm_bytes: int  # usable per device, as the TPU compiler reports it
    hbm_spec_bytes: int


def topology_help() -> str:
    return ", ".join(TOPOLOGIES) + "; 'Nx' in front for N slices over the data-center network, e.g. 2xv5p-8"


def parse_topology(name: str) -> tuple[Generation, int]:
    """(generation, number of slices) of a name such as ``v5p-8`` or ``2xv5p-8``."""
    match = _MULTISLICE.match(name)
    if not match or match.group(2) not in TOPOLOGIES or match.group(1) in ("0",):
        raise ConfigError(f"--topology={name!r}: unknown; known: {topology_help()}")
    return TOPOLOGIES[match.group(2)], int(match.group(1) or 1)


def prepare_libtpu() -> None:
    """Refuses, with the install command, when no TPU compiler is installed.

    libtpu probes the machine it is loaded on for a TPU (GCE metadata, accelerator type, worker hostnames) and logs
    warnings when it finds none; compiling for a topology description uses none of that, so the probes get fixed
    answers here (they do not choose the compile target).
    """
    from jax._src import xla_bridge

    if xla_bridge.get_tpu_library_path() is None:
        raise ConfigError(
            'libtpu is not installed: pip install -e ".[tpu]" (or pip install "jax[tpu]==<jax version>")'
        )
    # Compiling claims no chip, so several compiles (one per process) may share the machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def make_topology(name: str) -> Topology:
    """The compile-only TPU devices of a named slice and their HBM."""
    from jax.experimental import topologies

    generation, slices = parse_topology(name)
    kwargs: dict[str, Any] = {"num_slices": slices} if slices > 1 else {}
    if generation.chip_config:
        kwargs["chip_config_name"] = generation.chip_config
    devices = topologies.get_topology_desc(platform="tpu", topology_name=generation.topology, **kwargs).devices
    return Topology(name, list(devices), usable_hbm_bytes(devices), generation.hbm_spec_gib * GIB)


_HBM_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")


def usable_hbm_bytes(devices: Sequence[Any]) -> int:
    """HBM per device that a program may use, read from the TPU compiler's refusal of a program that needs 1 TiB."""
    mesh = parallel.make_mesh(None, devices=list(devices))
    sharding = parallel.batch_sharding(mesh)
    too_big = jax.ShapeDtypeStruct((len(devices) * 2**38,), np.float32, sharding=sharding)
    try:
        jax.jit(lambda x: x * 2, out_shardings=sharding).lower(too_big).compile()
    except jax.errors.JaxRuntimeError as err:
        match = _HBM_AVAILABLE.search(str(err))
        if match:
            return round(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)
        raise
    raise RuntimeError("the TPU compiler accepted a program needing 1 TiB per device; cannot tell its HBM")


# ---- models: published configs, written as a pipeline folder without weights ---------------------------------

_CROSS_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_CROSS_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIP ViT-L/14's text tower: SD 1.5's text encoder and SDXL's first.
_CLIP_VIT_L = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
_TINY_VAE = {
    **_SD_VAE,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}
_TINY_TEXT = {
    "architectures": ["CLIPTextModel"],
    "hidden_size": 32,
    "intermediate_size": 37,
    "max_position_embeddings": 16,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
}
_SDXL_PIPELINE = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_SD_PIPELINE = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# Folder -> file -> config.json contents. The SD ones are the published files' keys that differ from the classes'
# defaults (diffusers' and transformers' field names, which jaxdiff's model configs read unchanged).
MODELS: dict[str, dict[str, dict[str, Any]]] = {
    # runwayml/stable-diffusion-v1-5 (512 px): CLIP ViT-L/14 text encoder, epsilon prediction.
    "sd15": {
        "model_index.json": _SD_PIPELINE,
        "scheduler/scheduler_config.json": {
            "_class_name": "PNDMScheduler",
            **_SD_BETAS,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768,
            "down_block_types": _CROSS_DOWN,
            "in_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": _CROSS_UP,
        },
        "vae/config.json": _SD_VAE,
        "text_encoder/config.json": _CLIP_VIT_L,
    },
    # stabilityai/stable-diffusion-2-1 (768 px, v-prediction): OpenCLIP ViT-H text encoder (its first 23 layers,
    # 1024 wide), per-block head counts, linear projections, attention upcast to float32.
    "sd21": {
        "model_index.json": {**_SD_PIPELINE, "scheduler": ["diffusers", "DDIMScheduler"]},
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            **_SD_BETAS,
            "clip_sample": False,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 1024,
            "down_block_types": _CROSS_DOWN,
            "in_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 96,
            "up_block_types": _CROSS_UP,
            "upcast_attention": True,
            "use_linear_projection": True,
        },
        "vae/config.json": {**_SD_VAE, "sample_size": 768},
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"],
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "pad_token_id": 1,
            "projection_dim": 512,
            "vocab_size": 49408,
        },
    },
    # stabilityai/stable-diffusion-xl-base-1.0 (1024 px): a 3-level UNet (no attention at the first level, 1, 2 and
    # 10 transformer layers per block) conditioned on CLIP ViT-L's and OpenCLIP bigG's penultimate states (768 +
    # 1280) and, through text_time, on bigG's projected pooled state and 6 size numbers (6 x 256 + 1280 = 2816);
    # its VAE stays in float32 (force_upcast).
    "sdxl": {
        "model_index.json": _SDXL_PIPELINE,
        "scheduler/scheduler_config.json": {
            "_class_name": "EulerDiscreteScheduler",
            **_SD_BETAS,
            "clip_sample": False,
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "in_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": True,
        },
        "vae/config.json": {**_SD_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025},
        "text_encoder/config.json": _CLIP_VIT_L,
        "text_encoder_2/config.json": {
            "architectures": ["CLIPTextModelWithProjection"],
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "pad_token_id": 1,
            "projection_dim": 1280,
            "vocab_size": 49408,
        },
    },
    # The tests' tiny SD 1.x shapes (tests/fixtures/pipelines.py) at 32 px: seconds per compile.
    "tiny": {
        "model_index.json": {**_SD_PIPELINE, "scheduler": ["diffusers", "DDPMScheduler"]},
        "scheduler/scheduler_config.json": {"_class_name": "DDPMScheduler", **_SD_BETAS, "clip_sample": False},
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": 2,
            "block_out_channels": [32, 64],
            "cross_attention_dim": 32,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 16,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        },
        "vae/config.json": _TINY_VAE,
        "text_encoder/config.json": _TINY_TEXT,
    },
    # The tests' tiny SDXL shapes (tests/fixtures/pipelines.py) at 32 px: two text encoders of different widths
    # (32 + 64), the second with projection, a text_time UNet with 1 and 2 transformer layers per block.
    "tiny_sdxl": {
        "model_index.json": _SDXL_PIPELINE,
        "scheduler/scheduler_config.json": {
            "_class_name": "EulerDiscreteScheduler",
            **_SD_BETAS,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "attention_head_dim": [2, 4],
            "block_out_channels": [32, 64],
            "cross_attention_dim": 96,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "sample_size": 16,
            "transformer_layers_per_block": [1, 2],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": True,
        },
        "vae/config.json": {**_TINY_VAE, "force_upcast": True, "scaling_factor": 0.13025},
        "text_encoder/config.json": _TINY_TEXT,
        "text_encoder_2/config.json": {
            **_TINY_TEXT,
            "architectures": ["CLIPTextModelWithProjection"],
            "hidden_act": "gelu",
            "hidden_size": 64,
            "projection_dim": 32,
        },
    },
}


# Each component's weights file, written empty: building a task's abstract models checks that the files exist
# (and reads their headers), not their tensors.
_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def write_pipeline(model: str, folder: Path) -> Path:
    """A diffusers pipeline folder of ``model``'s configs (weight files without tensors) and, for each text encoder,
    a stand-in tokenizer of its length (a step that encodes a prompt, LCM's unconditional "", needs token ids of
    that shape, not the real vocabulary)."""
    from safetensors.numpy import save_file

    for name, content in MODELS[model].items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
        if name.endswith("/config.json"):
            save_file({}, str(path.parent / _WEIGHTS.get(path.parent.name, "model.safetensors")))
        if name.startswith("text_encoder"):
            tokenizer = folder / name.split("/")[0].replace("text_encoder", "tokenizer")
            save_tiny_clip_tokenizer(tokenizer, model_max_length=content["max_position_embeddings"])
    return folder


def default_resolution(pipeline: Path) -> int:
    """The image size the pipeline's VAE was trained at (its config's sample_size)."""
    size = json.loads((pipeline / "vae" / "config.json").read_text()).get("sample_size", 512)
    return size[0] if isinstance(size, list) else size


# ---- analytic FLOPs ------------------------------------------------------------------------------------------


def _matmul_flops(eqn: jcore.JaxprEqn) -> int:
    """2 x multiply-adds of a dot_general or convolution; 0 for any other op."""
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * out * math.prod(lhs[d] for d in lhs_contract)
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # out features x (in features / groups) x window
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * out * math.prod(rhs) // out_features
    return 0


def _sub_jaxpr(value: Any) -> jcore.Jaxpr | None:
    if isinstance(value, jcore.ClosedJaxpr):
        return value.jaxpr
    return value if isinstance(value, jcore.Jaxpr) else None


def count_flops(jaxpr: jcore.Jaxpr, depends: Sequence[bool]) -> tuple[int, int, list[bool]]:
    """(FLOPs of matmuls that depend on a marked input, FLOPs of the others, which outputs depend on one).

    ``depends`` marks ``jaxpr.invars``; sub-programs (jit, remat, custom derivatives, scan, cond) are followed.
    """
    marked = dict(zip(jaxpr.invars, depends, strict=True))
    dependent = independent = 0
    for eqn in jaxpr.eqns:
        ins = [isinstance(v, jcore.Var) and marked.get(v, False) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "scan":
            body, length = eqn.params["jaxpr"].jaxpr, eqn.params["length"]
            consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
            carry_in = ins[consts : consts + carries]
            while True:  # a carry depends on a marked input once any iteration makes it
                dep, ind, outs = count_flops(body, ins[:consts] + carry_in + ins[consts + carries :])
                widened = [a or b for a, b in zip(carry_in, outs[:carries], strict=True)]
                if widened == carry_in:
                    break
                carry_in = widened
            dependent, independent = dependent + length * dep, independent + length * ind
        elif name == "cond":
            counts = [count_flops(_sub_jaxpr(b), ins[1:]) for b in eqn.params["branches"]]
            dep, ind, _ = max(counts, key=lambda c: c[0] + c[1])
            dependent, independent = dependent + dep, independent + ind
            outs = [any(c[2][i] for c in counts) or ins[0] for i in range(len(eqn.outvars))]
        elif name == "while":
            raise ValueError("the step's forward has a while loop: its trip count, and so its FLOPs, are unknown")
        else:
            subs = [j for j in map(_sub_jaxpr, eqn.params.values()) if j is not None and len(j.invars) == len(ins)]
            if subs:  # jit, remat, custom_jvp/vjp calls: the first program is the primal one
                dep, ind, outs = count_flops(subs[0], ins)
                dependent, independent = dependent + dep, independent + ind
            else:
                flops = _matmul_flops(eqn)
                if any(ins):
                    dependent += flops
                else:
                    independent += flops
                outs = [any(ins)] * len(eqn.outvars)
        marked.update(zip(eqn.outvars, outs, strict=True))
    return dependent, independent, [isinstance(v, jcore.Var) and marked.get(v, False) for v in jaxpr.outvars]


def forward_jaxpr(program: Any, batch: dict) -> jcore.ClosedJaxpr:
    """The jaxpr of one forward of the step's loss on ``batch``; its inputs are the leaves of (trained parameters,
    frozen parameters, batch, the step's random draws, the target networks' EMA parameters (LCM's)), in that order."""
    task, state = program.task, program.abstract_state
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    randoms = jax.eval_shape(lambda rng: task.draw(rng, batch_size), state["rng"])
    ema = state["ema_params"] if task.target_decay is not None else None

    def forward(params: Any, frozen: Any, batch: dict, randoms: dict, ema: Any) -> Any:
        targets = {} if ema is None else program.target_models(ema, frozen)
        return task.loss({**program.models(params, frozen), **targets}, batch, randoms)[0]

    return jax.make_jaxpr(forward)(state["params"], program.abstract_frozen, batch, randoms, ema)


def model_flops(program: Any, closed: jcore.ClosedJaxpr) -> tuple[int, int]:
    """(FLOPs of one forward of the trained parts, of the frozen parts) in the loss's jaxpr ``closed``."""
    trained = len(jax.tree.leaves(program.abstract_state["params"]))
    depends = [i < trained for i in range(len(closed.jaxpr.invars))]
    dependent, independent, _ = count_flops(closed.jaxpr, depends)
    return dependent, independent


def idle_frozen_bytes(program: Any, closed: jcore.ClosedJaxpr) -> int:
    """Per-device bytes of frozen parameters the step never reads (the VAE decoder, kept for validation).

    jit leaves unused inputs out of the executable, so XLA's peak does not count them; on the chip they are there.
    """
    trained = len(jax.tree.leaves(program.abstract_state["params"]))
    frozen = jax.tree.leaves(program.abstract_frozen)
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars} | {id(v) for v in closed.jaxpr.outvars}
    invars = closed.jaxpr.invars[trained : trained + len(frozen)]
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf, var in zip(frozen, invars, strict=True)
        if id(var) not in read
    )


# ---- one compile ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """What one compile of the train step for one topology tells (bytes per device, FLOPs over all devices)."""

    fits: bool
    model_flops_trained_forward: int
    model_flops_frozen_forward: int
    idle_bytes: int  # frozen parameters on the devices that the step does not read
    xla_peak_bytes: int | None = None
    argument_bytes: int | None = None
    temp_bytes: int | None = None
    flops: float | None = None
    pallas_kernels: int = 0  # Mosaic (Pallas TPU) kernel calls in the compiled program: splash attention's
    compile_s: float = 0.0
    message: str | None = None  # why it does not fit

    @property
    def peak_bytes(self) -> int | None:
        return None if self.xla_peak_bytes is None else self.xla_peak_bytes + self.idle_bytes

    @property
    def model_flops(self) -> int:
        """3 x forward of the trained parts (forward, and two backward matmuls each) + forward of the frozen ones."""
        return 3 * self.model_flops_trained_forward + self.model_flops_frozen_forward


_TEMPS_REQUIRED = re.compile(r"RESOURCE_EXHAUSTED: [^\n]*")


#: DreamBooth's data flags (never read: the step compiles from shapes), with prior preservation.
DREAMBOOTH = {
    "instance_data_dir": tempfile.gettempdir(),
    "instance_prompt": "a photo of sks dog",
    "with_prior_preservation": True,
    "class_data_dir": tempfile.gettempdir(),
    "class_prompt": "a photo of dog",
}


def train_config(args: argparse.Namespace, pipeline: Path, per_device_batch: int, checkpointing: bool) -> Any:
    """The run's TrainConfig: the presets' training settings on the benchmark's model and batch."""
    config = cli.validate(
        {
            "pretrained_model_name_or_path": str(pipeline),
            "task": args.task,
            "output_dir": tempfile.gettempdir(),
            "resolution": args.resolution or default_resolution(pipeline),
            "train_batch_size": per_device_batch,
            "mesh": args.mesh,
            "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": checkpointing,
            "use_ema": args.use_ema,
            "cache_latents": args.cache_latents,
            "attention_implementation": args.attention_implementation,
            "use_8bit_adam": args.use_8bit_adam,
            "seed": 0,
            **(DREAMBOOTH if args.task == "dreambooth" else {}),
        }
    )
    if config.task is None:
        config = config.model_copy(update={"task": cli.infer_task(config)})
    if config.task not in TASKS:
        raise ConfigError(f"--task={config.task!r}: not a task of the JAX backend yet; available: {', '.join(TASKS)}")
    if config.task in LCM_TASKS:  # the target network is LCM's EMA: no second one
        config = config.model_copy(update={"use_ema": False})
    return config


def build_program(config: Any, devices: Sequence[Any]) -> tuple[Any, dict]:
    """The trainer's compiled-step program for a mesh over ``devices``, and the abstract batch it takes."""
    from jaxdiff.trainer import TrainProgram

    task = TASKS[config.task](config)
    mesh = parallel.make_mesh(config.mesh, devices=list(devices))
    batch_size = config.train_batch_size * mesh.size
    program = TrainProgram(config, task, mesh, batch_size=batch_size, total_steps=1000)
    return program, task.abstract_batch(batch_size * config.gradient_accumulation_steps)


def compile_step(program: Any, batch: dict, hbm_bytes: int, counted: Any = None) -> Compiled:
    """Compiles the step; a program that does not fit in HBM is a result (``fits`` False), not an error. The model
    FLOPs are counted in ``counted`` (default: ``program``): the same step with XLA attention when ``program`` runs a
    Pallas kernel, whose matmuls a jaxpr does not show as the model's."""
    counted = counted or program
    closed = forward_jaxpr(counted, batch)
    counts = (*model_flops(counted, closed), idle_frozen_bytes(counted, closed))
    start = time.perf_counter()
    lowered = program.step_fn.lower(program.abstract_state, program.abstract_frozen, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        match = _TEMPS_REQUIRED.search(str(err))
        message = match.group(0) if match else str(err)
        return Compiled(False, *counts, compile_s=time.perf_counter() - start, message=message)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result = Compiled(
        True,
        *counts,
        xla_peak_bytes=int(memory.peak_memory_in_bytes),
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=float(cost["flops"]) * program.mesh.size,
        pallas_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'),
        compile_s=seconds,
    )
    if result.peak_bytes > hbm_bytes:
        result.fits, result.message = False, "the step fits only without the frozen parameters it does not read"
    return result


# ---- largest batch -------------------------------------------------------------------------------------------


def estimated_max_batch(result: Compiled, batch: int, hbm_bytes: int) -> int | None:
    """The largest per-device batch that fits if temporaries grow in proportion to the batch, from one compile.

    State (arguments, idle frozen parameters) stays; temporaries are taken as all per-sample, so with any constant
    part in them this is an underestimate. ``--max_batch`` measures the real one.
    """
    if not result.fits or not result.temp_bytes:
        return None
    per_sample = result.temp_bytes / batch
    return int((hbm_bytes - result.argument_bytes - result.idle_bytes) // per_sample)


def largest_batch(measure: Callable[[int], Compiled], first: Compiled, batch: int, hbm_bytes: int) -> int:
    """The largest per-device batch whose step fits: peak = a + b * batch fitted at ``batch`` (compiled: ``first``)
    and twice it, the prediction compiled to verify it, bisecting down when it does not fit (at most 5 compiles)."""
    if not first.fits:
        return 0 if batch == 1 else largest_batch(measure, measure(1), 1, hbm_bytes)
    second = measure(2 * batch)
    if not second.fits:
        return _bisect(measure, batch, 2 * batch, budget=3)
    per_sample = max((second.peak_bytes - first.peak_bytes) / batch, 1.0)
    guess = max(2 * batch, int(2 * batch + (hbm_bytes - second.peak_bytes) // per_sample))
    if guess == 2 * batch or measure(guess).fits:
        return guess
    return _bisect(measure, 2 * batch, guess, budget=2)


def _bisect(measure: Callable[[int], Compiled], fits: int, too_big: int, *, budget: int) -> int:
    """The largest batch in [fits, too_big) that fits, or the best found within ``budget`` compiles."""
    while too_big - fits > 1 and budget:
        mid = (fits + too_big) // 2
        fits, too_big = (mid, too_big) if measure(mid).fits else (fits, mid)
        budget -= 1
    return fits


# ---- rows ----------------------------------------------------------------------------------------------------


def run_topology(args: argparse.Namespace, pipeline: Path, name: str) -> dict[str, Any]:
    """One row: the step compiled for topology ``name`` at the requested batch (and, with --max_batch, the
    largest batches that fit)."""
    topology = make_topology(name)

    def measure(batch: int, checkpointing: bool) -> tuple[Compiled, Any]:
        config = train_config(args, pipeline, batch, checkpointing)
        program, abstract_batch = build_program(config, topology.devices)
        counted = None
        if config.attention_implementation == "splash":
            counted = build_program(config.model_copy(update={"attention_implementation": "xla"}), topology.devices)[0]
        result = compile_step(program, abstract_batch, topology.hbm_bytes, counted)
        if args.verbose:
            state = f"peak {_gib(result.peak_bytes)} GiB" if result.fits else "does not fit"
            print(
                f"  {name} batch {batch} checkpointing {checkpointing}: {state} ({result.compile_s:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return result, program

    result, program = measure(args.per_device_batch, args.gradient_checkpointing)
    mesh = program.mesh
    row: dict[str, Any] = {
        "topology": name,
        "device_kind": topology.devices[0].device_kind,
        "devices": len(topology.devices),
        "mesh": f"{mesh.shape[parallel.DATA_AXIS]}x{mesh.shape[parallel.FSDP_AXIS]}",
        "model": args.model,
        "task": program.config.task,
        "resolution": program.config.resolution,
        "attention": args.attention_implementation,
        "optimizer": "adam8bit" if args.use_8bit_adam else "adamw",
        "per_device_batch": args.per_device_batch,
        "global_batch": program.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fits": result.fits,
        "peak_bytes": result.peak_bytes,
        "xla_peak_bytes": result.xla_peak_bytes,
        "argument_bytes": result.argument_bytes,
        "temp_bytes": result.temp_bytes,
        "pallas_kernels": result.pallas_kernels,
        "idle_bytes": result.idle_bytes,
        "hbm_bytes": topology.hbm_bytes,
        "hbm_spec_bytes": topology.hbm_spec_bytes,
        "flops": result.flops,
        "model_flops": result.model_flops,
        "model_flops_trained_forward": result.model_flops_trained_forward,
        "model_flops_frozen_forward": result.model_flops_frozen_forward,
        "flops_ratio": result.flops / result.model_flops if result.flops else None,
        "max_batch_estimate": estimated_max_batch(result, args.per_device_batch, topology.hbm_bytes),
        "compile_s": round(result.compile_s, 1),
    }
    if not result.fits:
        row["message"] = result.message
    if args.max_batch:
        for checkpointing in (False, True):
            first = result if checkpointing == args.gradient_checkpointing else None

            def at(batch: int, checkpointing: bool = checkpointing, first: Compiled | None = first) -> Compiled:
                if first is not None and batch == args.per_device_batch:
                    return first
                return measure(batch, checkpointing)[0]

            key = "max_batch_gradient_checkpointing" if checkpointing else "max_batch"
            row[key] = largest_batch(at, at(args.per_device_batch), args.per_device_batch, topology.hbm_bytes)
    return row


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


COLUMNS = (
    ("topology", 9),
    ("devices", 7),
    ("mesh", 5),
    ("attention", 9),
    ("optimizer", 9),
    ("batch/dev", 9),
    ("state GiB", 9),
    ("temp GiB", 8),
    ("peak GiB", 9),
    ("HBM GiB", 8),
    ("peak/HBM", 8),
    ("TFLOP/step", 10),
    ("model TFLOP", 11),
    ("ratio", 5),
    ("est. max", 8),
    ("max batch", 9),
    ("max (ckpt)", 10),
    ("compile s", 9),
)


def format_row(row: dict[str, Any]) -> str:
    """One line of the text table."""
    peak, flops = row["peak_bytes"], row["flops"]
    values = (
        row["topology"],
        row["devices"],
        row["mesh"],
        row["attention"],
        row["optimizer"],
        row["per_device_batch"],
        _gib(row["argument_bytes"]),
        _gib(row["temp_bytes"]),
        "no fit" if peak is None else _gib(peak),
        _gib(row["hbm_bytes"]),
        "-" if peak is None else f"{peak / row['hbm_bytes']:.0%}",
        "-" if flops is None else f"{flops / 1e12:.3f}",
        f"{row['model_flops'] / 1e12:.3f}",
        "-" if flops is None else f"{row['flops_ratio']:.2f}",
        row["max_batch_estimate"] or "-",
        row.get("max_batch", "-"),
        row.get("max_batch_gradient_checkpointing", "-"),
        row["compile_s"],
    )
    return "  ".join(f"{v!s:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="sd15", help=f"built-in model ({', '.join(MODELS)}) or a local diffusers pipeline folder"
    )
    parser.add_argument("--task", default=None, help=f"training task ({', '.join(TASKS)}); default: the pipeline's")
    parser.add_argument("--topology", default="v5p-8", help=f"comma-separated TPU slices: {topology_help()}")
    parser.add_argument("--per_device_batch", type=int, default=1, help="micro-batch per JAX device")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="remat the UNet blocks")
    parser.add_argument("--mesh", default=None, help="'DxM' data x fsdp (default: every device on the data axis)")
    parser.add_argument(
        "--resolution", default=None, help="image size, N or HxW (height x width; default: the VAE's sample_size)"
    )
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA copy")
    parser.add_argument("--cache_latents", action="store_true", help="train on cached latents and text states")
    parser.add_argument(
        "--attention_implementation",
        default="xla",
        help=f"comma-separated, one row each: {', '.join(ATTENTIONS)} (splash: the Pallas TPU kernel; v3: xla)",
    )
    parser.add_argument("--optimizer", default="adamw", help=f"comma-separated, one row each: {', '.join(OPTIMIZERS)}")
    parser.add_argument(
        "--max_batch", action="store_true", help="also find the largest per-device batch, with and without remat"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per topology instead of the table")
    parser.add_argument("--verbose", action="store_true", help="log each compile to stderr")
    args = parser.parse_args(argv)
    if args.per_device_batch < 1:
        raise ConfigError(f"--per_device_batch={args.per_device_batch}: must be at least 1")
    args.topologies = _names(args.topology)
    args.attentions, args.optimizers = _names(args.attention_implementation), _names(args.optimizer)
    for field, names, allowed in (
        ("attention_implementation", args.attentions, ATTENTIONS),
        ("optimizer", args.optimizers, OPTIMIZERS),
    ):
        if not names or set(names) - set(allowed):
            raise ConfigError(f"--{field}={','.join(names)!r}: allowed: {', '.join(allowed)} (comma-separated)")
    args.attention_implementation, args.use_8bit_adam = args.attentions[0], args.optimizers[0] == "adam8bit"
    for name in args.topologies:
        parse_topology(name)
    if args.model not in MODELS and not (Path(args.model) / "model_index.json").is_file():
        raise ConfigError(
            f"--model={args.model!r}: neither a built-in model ({', '.join(MODELS)}) nor a folder with a "
            "model_index.json"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        prepare_libtpu()
    except ConfigError as err:
        cli.exit_with(err)
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = write_pipeline(args.model, Path(scratch)) if args.model in MODELS else Path(args.model)
        try:
            train_config(args, pipeline, args.per_device_batch, args.gradient_checkpointing)
        except ConfigError as err:
            cli.exit_with(err)
        if not args.json:
            print(f"model {args.model}: train step compiled by libtpu for each topology")
            print("  ".join(f"{title:>{w}}" for title, w in COLUMNS), flush=True)
        variants = [(name, a, o) for name in args.topologies for a in args.attentions for o in args.optimizers]
        for name, attention, optimizer in variants:
            variant = argparse.Namespace(
                **{**vars(args), "attention_implementation": attention, "use_8bit_adam": optimizer == "adam8bit"}
            )
            try:
                row = run_topology(variant, pipeline, name)
            except ConfigError as err:  # e.g. a --mesh that does not fit this topology's devices
                row = {"topology": name, "error": str(err)}
            except Exception as err:  # one broken row must not end an unattended run over many topologies
                row = {"topology": name, "error": f"{type(err).__name__}: {err}"}
            failed = failed or "error" in row
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"{name:>9}  error: {row['error']}", flush=True)
            else:
                print(format_row(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
