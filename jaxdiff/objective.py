"""The framework-free half of the text-to-image, SDXL, DreamBooth, LCM and unconditional tasks, shared by the JAX and
torch tasks.

Which models train and which stay frozen, the tokenizers, the latent shape, the timestep bias, SDXL's
micro-conditioning, and the host-drawn randoms of `--random_source host`. Each backend's task sets the attributes
below and adds its models, on-device draws, loss and sampler.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.adapters import LoRASettings
from jaxdiff.config import ConfigError, TrainConfig
from jaxdiff.data.dreambooth import ClassImageRequest
from jaxdiff.diffusion.lcm import lcm_origin_timesteps, lcm_scheduler_config
from jaxdiff.diffusion.training import host_draws, timestep_bias_weights
from jaxdiff.hub import (
    MODEL_INDEX,
    HubOptions,
    ModelFilesNotFoundError,
    find_weight_files,
    pipeline_class,
    resolve_model_config,
    resolve_pipeline,
)
from jaxdiff.publish import SchedulerConfig

#: Seed streams of the host-drawn LoRA dropout seeds, of LCM's host draws and of the LCM student's new guidance
#: projection (numbers no other draw uses).
DROPOUT_STREAM = 7
LCM_STREAM = 8
COND_PROJ_STREAM = 9
#: The decay of LCM's target network when --ema_decay is not given (diffusers' LCM scripts' default).
LCM_TARGET_DEFAULT_DECAY = 0.95


class DenoisingRoles:
    """Mixin of every task trained with the denoising loss: the timestep distribution (`_set_timesteps` at init),
    the host draws over `latent_shape` (C, h, w), no LoRA unless configured, no target network, no images to
    generate first."""

    config: TrainConfig
    latent_shape: tuple[int, ...]
    #: The ``_class_name`` of an export without a base pipeline (None: the base's model_index.json names it).
    export_pipeline_class: str | None = None

    def _set_timesteps(self, num_train_timesteps: int) -> None:
        """Sets `num_train_timesteps` and `timestep_weights` (None: uniform; else the --timestep_bias_* bias)."""
        cfg = self.config
        self.num_train_timesteps = num_train_timesteps
        self.timestep_weights = (
            None
            if cfg.timestep_bias_strategy == "none"
            else timestep_bias_weights(
                num_train_timesteps,
                cfg.timestep_bias_strategy,
                cfg.timestep_bias_multiplier,
                cfg.timestep_bias_begin,
                cfg.timestep_bias_end,
                cfg.timestep_bias_portion,
            )
        )

    @functools.cached_property
    def lora(self) -> LoRASettings | None:
        """The run's LoRA adapters (then only they train, in every trainable module), or None: full weights."""
        return LoRASettings.from_config(self.config)

    @property
    def images_to_generate(self) -> ClassImageRequest | None:
        """Images the run samples from the base model before its data loads: none."""
        return None

    @property
    def target_decay(self) -> float | None:
        """The decay of a target network the loss reads (an EMA of the trained modules): none."""
        return None

    def dropout_seeds(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """With LoRA dropout, the JAX backend's per-row `dropout_seed` of the host draws; else nothing."""
        if not (self.lora and self.lora.dropout):
            return {}
        rng = np.random.default_rng([self.config.seed, step, DROPOUT_STREAM])
        return {"dropout_seed": rng.integers(0, 2**31, batch_size, dtype=np.int32)}

    def draw_host(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The step's randoms drawn with NumPy from (seed, step) (`--random_source host`), identical in both
        backends: `noise`, `noise_in`, `timesteps`, `latent_eps`, as each task's on-device `draw` (and with LoRA
        dropout the JAX backend's `dropout_seed`)."""
        cfg = self.config
        draws = host_draws(
            cfg.seed,
            step,
            batch_size,
            self.latent_shape,
            self.num_train_timesteps,
            self.timestep_weights,
            cfg.noise_offset,
            cfg.input_perturbation,
        )
        return {**draws, **self.dropout_seeds(step, batch_size)}


#: --vae_dtype -> the --mixed_precision value of that dtype.
VAE_DTYPES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class TextToImageRoles(DenoisingRoles):
    """Mixin: needs `config`, `unet`, one attribute per name of `text_encoder_names`, `vae`, `vae_folder`,
    `tokenizers` and a `_common(...)` call at init."""

    #: The pipeline's text encoder folders (and attributes), in the order their states are concatenated.
    text_encoder_names: tuple[str, ...] = ("text_encoder",)

    unet: Any
    vae: Any
    vae_folder: Any

    def _common(
        self, num_train_timesteps: int, unet_in_channels: int, vae_block_out_channels: int, unet_levels: int
    ) -> None:
        """Sets `num_train_timesteps`, `timestep_weights` (None: uniform) and `latent_shape` (C, h, w); refuses a
        resolution the VAE and the UNet's down/up sampling cannot map back to itself."""
        cfg = self.config
        vae_factor = 2 ** (vae_block_out_channels - 1)
        multiple = vae_factor * 2 ** (unet_levels - 1)
        if any(side % multiple for side in cfg.image_size):
            raise ConfigError(
                f"--resolution={cfg.resolution}: each side must be a multiple of {multiple} for this model (the VAE "
                f"downsamples {vae_factor}x, the UNet {2 ** (unet_levels - 1)}x more)"
            )
        self._set_timesteps(num_train_timesteps)
        self.latent_shape = (unet_in_channels, *(side // vae_factor for side in cfg.image_size))

    @property
    def vae_precision(self) -> str:
        """The frozen VAE's precision, as a --mixed_precision value: --vae_dtype when given, else float32 for a VAE
        whose config.json sets ``force_upcast`` (SDXL's: it overflows in half precision) and the compute dtype for
        one without it (SD 1.5's: diffusers' scripts cast it to the weight dtype)."""
        if self.config.vae_dtype is not None:
            return VAE_DTYPES[self.config.vae_dtype]
        file = Path(self.vae_folder) / "config.json"
        if not file.is_file():  # as `jaxdiff.weights.read_config` says it (that module needs jax)
            raise ModelFilesNotFoundError(f"no config.json in {self.vae_folder}")
        vae_config = json.loads(file.read_text())
        return "no" if vae_config.get("force_upcast", False) else self.config.mixed_precision

    @property
    def _text_encoders(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.text_encoder_names}

    @property
    def trainable(self) -> dict[str, Any]:
        """Modules whose parameters (with LoRA: whose adapters) are optimised, and exported."""
        return {"unet": self.unet, **(self._text_encoders if self.config.train_text_encoder else {})}

    @property
    def frozen(self) -> dict[str, Any]:
        """Modules used but not trained."""
        return {"vae": self.vae, **({} if self.config.train_text_encoder else self._text_encoders)}

    @property
    def tokenizer_folders(self) -> tuple[str, ...]:
        """The tokenizer folder of each text encoder (``tokenizer``, ``tokenizer_2``), the data's tokenizers."""
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoder_names)

    @property
    def copied_components(self) -> dict[str, Any]:
        """Pipeline folders the export copies from elsewhere than the base pipeline: a separate VAE's."""
        return {"vae": Path(self.vae_folder)} if self.config.pretrained_vae_model_name_or_path else {}


#: diffusers' train_unconditional.py's UNet2DModel when --model_config_name_or_path is not given (the butterflies
#: tutorial's), its sample_size set to --resolution.
TUTORIAL_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
#: The DDPMScheduler train_unconditional.py builds, besides what the flags set (its constructor's defaults).
DDPM_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
#: The scheduler config key each --ddpm_* flag sets.
DDPM_FLAGS = {"ddpm_num_steps": "num_train_timesteps", "ddpm_beta_schedule": "beta_schedule"}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class UnconditionalRoles(DenoisingRoles):
    """Mixin for unconditional image generation with the semantics of diffusers' ``train_unconditional.py``: a
    ``UNet2DModel`` denoises the RGB images themselves (no VAE, no text) under a DDPM schedule, exported as a
    ``DDPMPipeline``.

    The UNet is --pretrained_model_name_or_path's (a DDPM pipeline: its unet/ and scheduler are fine-tuned from),
    else --model_config_name_or_path's (a config.json, trained from scratch, or a model folder with weights,
    fine-tuned), else the tutorial's (`TUTORIAL_UNET`) at --resolution. The schedule is
    DDPMScheduler(--ddpm_num_steps, --ddpm_beta_schedule, --prediction_type), or a pipeline's own scheduler with
    the flags the user set applied over it. `sample` prediction weights each sample's x_0 loss by its SNR, as the
    script does; --snr_gamma clips that weight (Min-SNR) for every prediction type.

    Needs `config` and a `_setup()` call at init.
    """

    name = "unconditional"
    export_pipeline_class = "DDPMPipeline"
    tokenizers: tuple[Any, ...] = ()
    config: TrainConfig

    def _setup(self) -> None:
        """Sets `model_path`, `unet_config`, `unet_folder` (None: from scratch), `scheduler_config`, the timesteps
        and `latent_shape` (3, H, W); refuses a model that is not RGB to RGB or a resolution it cannot map back."""
        cfg = self.config
        options = HubOptions.from_config(cfg)
        #: The base pipeline the export copies from: --pretrained_model_name_or_path's, or none.
        self.model_path = cfg.pretrained_model_name_or_path
        base_scheduler: dict[str, Any] = {}
        if self.model_path:
            if cfg.model_config_name_or_path:
                raise ConfigError(
                    "--pretrained_model_name_or_path and --model_config_name_or_path both name the UNet to train; "
                    "give one"
                )
            root = resolve_pipeline(self.model_path, ("unet",), options)
            folder: Path | None = root / "unet"
            scheduler_file = root / "scheduler" / "scheduler_config.json"
            base_scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        elif cfg.model_config_name_or_path:
            folder = resolve_model_config(cfg.model_config_name_or_path, UNET_WEIGHTS, options)
            if (folder / MODEL_INDEX).is_file():  # a pipeline folder: its UNet
                folder = folder / "unet"
        else:
            folder = None
        size = cfg.image_size
        #: The UNet's config.json sample_size: the training resolution (what DDPMPipeline then generates).
        self.sample_size = size[0] if size[0] == size[1] else list(size)
        if folder is None:
            self.unet_config = {**TUTORIAL_UNET, "sample_size": self.sample_size}
        else:
            config_file = folder if folder.is_file() else folder / "config.json"
            if not config_file.is_file():
                source = "pretrained_model_name_or_path" if self.model_path else "model_config_name_or_path"
                raise ConfigError(
                    f"--{source}={getattr(cfg, source)!r} has no {'unet/' if self.model_path else ''}config.json; "
                    "unconditional training needs a UNet2DModel config (a config.json, a UNet folder or a "
                    "DDPMPipeline)"
                )
            self.unet_config = json.loads(config_file.read_text())
            kind = self.unet_config.get("_class_name", "UNet2DModel")
            if kind != "UNet2DModel":
                raise ConfigError(f"{config_file} is a {kind} config; unconditional training trains a UNet2DModel")
            self.unet_config["sample_size"] = self.sample_size
        self.unet_folder = folder if folder is not None and folder.is_dir() and self._has_weights(folder) else None
        channels = (self.unet_config.get("in_channels", 3), self.unet_config.get("out_channels", 3))
        if channels != (3, 3):
            raise ConfigError(
                f"the UNet2DModel has in_channels={channels[0]}, out_channels={channels[1]}; unconditional training "
                "denoises RGB images: both must be 3"
            )
        levels = len(self.unet_config.get("block_out_channels", (224, 448, 672, 896)))
        multiple = 2 ** (levels - 1)
        if any(side % multiple for side in cfg.image_size):
            raise ConfigError(
                f"--resolution={cfg.resolution}: each side must be a multiple of {multiple} for this UNet (it "
                f"downsamples {multiple}x)"
            )
        flags = {key: getattr(cfg, flag) for flag, key in DDPM_FLAGS.items()}
        if base_scheduler:  # a pipeline's scheduler: the flags the user set apply over it
            flags = {DDPM_FLAGS[f]: getattr(cfg, f) for f in DDPM_FLAGS if f in cfg.model_fields_set}
        prediction = {"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}
        base = {k: v for k, v in base_scheduler.items() if not k.startswith("_")}
        self.scheduler_config = {**DDPM_SCHEDULER, **base, **flags, **prediction}
        self._set_timesteps(int(self.scheduler_config["num_train_timesteps"]))
        if cfg.validation_num_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"--validation_num_inference_steps={cfg.validation_num_inference_steps} (--ddpm_num_inference_steps) "
                f"must be at most the schedule's {self.num_train_timesteps} training timesteps"
            )
        self.latent_shape = (3, *cfg.image_size)

    def _has_weights(self, folder: Path) -> bool:
        try:
            find_weight_files(
                folder, UNET_WEIGHTS, variant=self.config.variant, allow_pickle=self.config.allow_pickled_weights
            )
        except ModelFilesNotFoundError:
            return False
        return True

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config["prediction_type"]

    @property
    def trainable(self) -> dict[str, Any]:
        """The UNet."""
        return {"unet": self.unet}

    @property
    def frozen(self) -> dict[str, Any]:
        """Nothing: no VAE, no text encoder."""
        return {}

    @property
    def copied_components(self) -> dict[str, Any]:
        """The DDPMScheduler of the training schedule."""
        return {"scheduler": SchedulerConfig("DDPMScheduler", self.scheduler_config)}


class SDXLRoles(TextToImageRoles):
    """Mixin for SDXL: two text encoders (the second with projection, whose pooled ``text_embeds`` condition the
    UNet) and the six micro-conditioning numbers. Also needs `root`, the local pipeline folder."""

    text_encoder_names = ("text_encoder", "text_encoder_2")
    root: Path

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) of the training images: the last two of the time ids (original h, w, crop top, left,
        target h, w) that diffusers' ``compute_time_ids`` builds from each sample's original size and crop."""
        return self.config.image_size

    @functools.cached_property
    def force_zeros_for_empty_prompt(self) -> bool:
        """Whether the pipeline's unconditional embedding is zeros rather than the encoding of "" (SDXL base: yes;
        diffusers' StableDiffusionXLPipeline defaults to it when model_index.json does not say)."""
        index = json.loads((self.root / "model_index.json").read_text())
        return bool(index.get("force_zeros_for_empty_prompt", True))


class DreamBoothRoles:
    """Mixin for DreamBooth over a text-to-image or SDXL task (before it in the bases): the instance prompt's
    images, and with --with_prior_preservation class images paired with them, generated first where missing.

    With prior preservation each data row carries two images (instance, class), so every per-sample draw is made
    for both: the draws have shape (rows, 2, ...), made as for 2 x rows samples (row r's are samples 2r and 2r+1),
    and split with the data rows (micro-batches, processes) like any per-row value."""

    name = "dreambooth"
    config: TrainConfig

    @property
    def prior_preservation(self) -> bool:
        return self.config.with_prior_preservation

    @property
    def images_to_generate(self) -> ClassImageRequest | None:
        """The class images missing from --class_data_dir (with prior preservation)."""
        return ClassImageRequest.from_config(self.config)

    @property
    def images_per_row(self) -> int:
        """Images of one data row: the instance, and with prior preservation its class image."""
        return 2 if self.prior_preservation else 1

    def pair_draws(self, draws: dict[str, Any], rows: int) -> dict[str, Any]:
        """Draws made for 2 x ``rows`` samples as (rows, 2, ...) (NumPy, jax and torch arrays alike); unchanged
        without prior preservation."""
        if not self.prior_preservation:
            return draws
        return {k: v.reshape(rows, 2, *v.shape[1:]) for k, v in draws.items()}

    def draw_host(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The host draws (`--random_source host`) of both images of each row."""
        return self.pair_draws(super().draw_host(step, batch_size * self.images_per_row), batch_size)


class LCMRoles:
    """Mixin for Latent Consistency distillation over a text-to-image or SDXL task (before it in the bases), with the
    semantics of diffusers' ``train_lcm_distill_{sd,sdxl,lora_sd,lora_sdxl}_wds.py``.

    The pipeline is the teacher's. Full distillation (lcm, lcm_sdxl) trains a student UNet built from the teacher's
    config with a guidance-scale embedding (``time_cond_proj_dim``: the teacher's, else --unet_time_cond_proj_dim)
    and the teacher's weights, its new ``time_embedding.cond_proj`` drawn as torch initialises a Linear; its target
    network is an EMA of it (`target_decay`). lcm_lora trains LoRA adapters on the teacher's UNet: the teacher is
    that UNet without its adapters and the target is the adapted UNet itself, under stop-gradient.

    Draws per sample: the solver grid `index` (uniform), the guidance scale `w` ~ U[w_min, w_max], the noise and the
    VAE posterior's `latent_eps`. Needs `config`, `lora`, `latent_shape`, `num_train_timesteps`, `root` and, for
    full distillation, `teacher_unet`.
    """

    config: TrainConfig
    latent_shape: tuple[int, ...]
    num_train_timesteps: int
    root: Path
    teacher_unet: Any

    @property
    def frozen(self) -> dict[str, Any]:
        """The pipeline's frozen modules and, for full distillation, the teacher UNet (``teacher_unet``)."""
        return {**super().frozen, **({} if self.lora else {"teacher_unet": self.teacher_unet})}

    @property
    def target_decay(self) -> float | None:
        """The target network's EMA decay (--ema_decay, default 0.95); None for LoRA (the student is the target)."""
        return None if self.lora else (self.config.ema_decay or LCM_TARGET_DEFAULT_DECAY)

    @functools.cached_property
    def solver_timesteps(self) -> np.ndarray:
        """The skipping-step DDIM grid k * (T // N) - 1, k = 1..N, of --num_ddim_timesteps N (ascending)."""
        return lcm_origin_timesteps(self.num_train_timesteps, self.config.num_ddim_timesteps)

    def guidance_dim(self, teacher_time_cond_proj_dim: int | None) -> int | None:
        """The student's guidance-embedding width: the teacher's, else --unet_time_cond_proj_dim; None for LoRA."""
        if self.lora:
            return None
        return teacher_time_cond_proj_dim or self.config.unet_time_cond_proj_dim

    def initial_cond_proj(self, shape: tuple[int, int]) -> np.ndarray:
        """The student's new ``time_embedding.cond_proj.weight`` (out, in), torch's Linear initialisation
        U(-1/sqrt(in), 1/sqrt(in)) drawn with NumPy from the seed, so both backends start from the same student."""
        bound = 1.0 / np.sqrt(shape[1])
        rng = np.random.default_rng([self.config.seed, COND_PROJ_STREAM])
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    @property
    def copied_components(self) -> dict[str, Any]:
        """The base's, and an LCMScheduler of the teacher's noise schedule and the distillation's grid and scaling
        (the pipeline then samples in a few LCM steps)."""
        cfg = self.config
        base = json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())
        scheduler = lcm_scheduler_config(
            base, original_inference_steps=cfg.num_ddim_timesteps, timestep_scaling=cfg.timestep_scaling_factor
        )
        return {**super().copied_components, "scheduler": SchedulerConfig("LCMScheduler", scheduler)}

    def draw_host(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The step's randoms drawn with NumPy from (seed, step) (`--random_source host`), identical in both
        backends: `noise`, `latent_eps`, `index` (int32) and `w`, as each task's on-device `draw`."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step, LCM_STREAM])
        shape = (batch_size, *self.latent_shape)
        draws = {
            "noise": rng.standard_normal(shape, np.float32),
            "latent_eps": rng.standard_normal(shape, np.float32),
            "index": rng.integers(0, cfg.num_ddim_timesteps, batch_size).astype(np.int32),
            "w": rng.uniform(cfg.w_min, cfg.w_max, batch_size).astype(np.float32),
        }
        return {**draws, **self.dropout_seeds(step, batch_size)}


def is_sdxl_pipeline(config: TrainConfig) -> bool:
    """Whether --pretrained_model_name_or_path is an SDXL pipeline (its model_index.json says so)."""
    options = HubOptions.from_config(config)
    return pipeline_class(config.pretrained_model_name_or_path, options) == "StableDiffusionXLPipeline"


def check_pipeline_kind(config: TrainConfig, *, sdxl: bool) -> None:
    """Refuses a pipeline of the other kind than the task's (SD 1.x/2.x or SDXL), naming the task that fits."""
    if is_sdxl_pipeline(config) != sdxl:
        task = config.task or ""
        kind, fits = ("an SD 1.x/2.x", task.removesuffix("_sdxl")) if sdxl else ("an SDXL", f"{task}_sdxl")
        raise ConfigError(
            f"--pretrained_model_name_or_path={config.pretrained_model_name_or_path!r} is {kind} pipeline, which "
            f"task {config.task} does not train; use --task {fits}"
        )


def by_pipeline_kind(*, sd: type | None = None, sdxl: type | None = None) -> Callable[..., Any]:
    """A task constructor ``(config, *backend_args)`` over a backend's task classes: with both, the class of
    --pretrained_model_name_or_path's kind (lcm_lora); with one, that class after `check_pipeline_kind` (lcm,
    lcm_sdxl)."""

    def construct(config: TrainConfig, *args: Any) -> Any:
        if sd is not None and sdxl is not None:
            return (sdxl if is_sdxl_pipeline(config) else sd)(config, *args)
        check_pipeline_kind(config, sdxl=sd is None)
        return (sd or sdxl)(config, *args)

    return construct
