"""Text-to-image fine-tuning of SD 1.x/2.x on torch: jaxdiff.tasks.text_to_image's objective with diffusers' models.

As in the JAX task, the task owns which models load and which train, the per-sample random draws, the loss and the
validation sampler; the trainer owns everything else. The text conditioning goes through the same hooks as the JAX
task's (`encode_prompt`, `unet_conditioning`, `text_keys`), which the SDXL task overrides.
"""

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from jaxdiff.config import ConfigError, TrainConfig
from jaxdiff.data import fingerprint_files
from jaxdiff.data.fingerprint import hash_json
from jaxdiff.data.transforms import tokenize
from jaxdiff.hub import HubOptions, ModelFilesNotFoundError, resolve_model, resolve_pipeline
from jaxdiff.objective import TextToImageRoles
from torch_backend.diffusion import denoising_draws, per_sample_loss, snr_weighted_mean, training_target
from torch_backend.lora import add_lora

#: Dtype of the frozen models (and of autocast) per --mixed_precision; trained weights stay float32.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"

Batch = dict[str, torch.Tensor]
Models = dict[str, torch.nn.Module]


def load_pretrained(cls: Any, path: Path, *, allow_pickle: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` from a local folder, with a missing or unreadable file as one clear
    error."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:  # what diffusers and transformers raise for missing files
        hint = "" if allow_pickle else " (pickled .bin weights are only read with --allow_pickled_weights)"
        raise ModelFilesNotFoundError(f"cannot load {cls.__name__} from {os.fspath(path)!r}{hint}: {err}") from None


def weight_kwargs(options: HubOptions) -> dict[str, Any]:
    """from_pretrained arguments choosing the weight files the resolver fetched."""
    return {
        "variant": options.variant,
        "use_safetensors": None if options.allow_pickle else True,
        "allow_pickle": options.allow_pickle,
    }


class TextToImage(TextToImageRoles):
    """UNet (and optionally the text encoder) trained on (image, caption) pairs; VAE frozen."""

    name = "text_to_image"

    #: The transformers class of each text encoder folder (`text_encoder_names` of the roles).
    text_encoder_classes: ClassVar[dict[str, type[torch.nn.Module]]] = {"text_encoder": CLIPTextModel}
    #: Batch keys of the text conditioning (`encode_prompt`'s outputs, also what the latent cache stores).
    text_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model_path = config.pretrained_model_name_or_path
        weight_dtype = self.weight_dtype
        # The files the JAX task reads, fetched by the shared resolver; every model loads from a local folder.
        options = HubOptions.from_config(config)
        vae_path = config.pretrained_vae_model_name_or_path
        models = ("unet", *self.text_encoder_names, *(() if vae_path else ("vae",)))
        self.root = root = resolve_pipeline(self.model_path, models, options)
        vae_options = options.for_other_repo() if vae_path else options
        self.vae_folder = resolve_model(vae_path, None, VAE_WEIGHTS, vae_options) if vae_path else root / "vae"
        train_text = config.train_text_encoder
        self.frozen_folders = [self.vae_folder] + ([] if train_text else [root / n for n in self.text_encoder_names])
        self.tokenizers = tuple(load_pretrained(CLIPTokenizer, root / folder) for folder in self.tokenizer_folders)
        self.scheduler = load_pretrained(DDPMScheduler, root / "scheduler")
        if config.prediction_type:
            self.scheduler.register_to_config(prediction_type=config.prediction_type)
        self.unet = self.load_unet(root, options)
        for name in self.text_encoder_names:
            encoder = load_pretrained(self.text_encoder_classes[name], root / name, **weight_kwargs(options))
            setattr(self, name, encoder)
        self.vae = load_pretrained(AutoencoderKL, self.vae_folder, **weight_kwargs(vae_options))

        # Trained weights in float32; frozen ones (with LoRA the adapted modules' base weights too) in the compute
        # dtype, the VAE in `vae_precision`'s (as in the JAX task); LoRA adapters in float32.
        self.vae_dtype = WEIGHT_DTYPES[self.vae_precision]
        self.vae.requires_grad_(False).to(device)
        if self.vae_dtype != torch.float32:
            self.vae.to(dtype=self.vae_dtype)
        for name, module in {"unet": self.unet, **self._text_encoders}.items():
            module.to(device)
            if name not in self.trainable or self.lora:
                module.requires_grad_(False)
                if weight_dtype != torch.float32:
                    module.to(dtype=weight_dtype)
        if self.lora:
            for name, module in self.trainable.items():
                try:
                    add_lora(module, self.lora, name, seed=config.seed)
                except ValueError as err:
                    raise ConfigError(f"--lora_target_modules={list(self.lora.targets(name))}: {err}") from None
        for module in self.trainable.values():
            module.train()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self._text_encoders.values() if train_text else ():
                # activation_checkpointing_enable replaces the deprecated name in later transformers 5 releases.
                enable = getattr(encoder, "activation_checkpointing_enable", None)
                (enable or encoder.gradient_checkpointing_enable)()

        self._common(
            self.scheduler.config.num_train_timesteps,
            self.unet.config.in_channels,
            len(self.vae.config.block_out_channels),
            len(self.unet.config.block_out_channels),
        )

    def load_unet(self, root: Path, options: HubOptions) -> UNet2DConditionModel:
        """The UNet that trains (or gets the adapters), loaded from the pipeline's ``unet/``."""
        return load_pretrained(UNet2DConditionModel, root / "unet", **weight_kwargs(options))

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of frozen weights and of autocast (--mixed_precision)."""
        return WEIGHT_DTYPES[self.config.mixed_precision]

    def autocast(self) -> Any:
        """Autocast to the compute dtype for the frozen models' calls (a no-op in float32)."""
        dtype = self.weight_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample, for ``batch_size`` samples (the JAX task's
        ``draw`` with torch's generator: same keys, distributions, noise offset and perturbation semantics)."""
        cfg = self.config
        shape = (batch_size, *self.latent_shape)
        return denoising_draws(
            generator, shape, self.num_train_timesteps, self.timestep_weights, cfg.noise_offset, cfg.input_perturbation
        )

    def encode_images(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of the frozen VAE's latent distribution, for the latent cache."""
        dist = self.vae.encode(torch.from_numpy(pixel_values).to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy()

    @torch.no_grad()
    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The frozen text encoder(s)' conditioning (`text_keys`) as float32, for the latent cache."""
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in ids.items()}
        return {k: v.float().cpu().numpy() for k, v in self.encode_prompt(self._text_encoders, tensors).items()}

    def encode_prompt(self, models: Models, ids: Batch) -> Batch:
        """The text conditioning (`text_keys`) of token ids (`input_ids`, ...): the text encoder's last states."""
        return {"encoder_hidden_states": models["text_encoder"](ids["input_ids"].long(), return_dict=False)[0]}

    def unet_conditioning(self, text: Batch, batch: Batch) -> dict[str, Any]:
        """The UNet's keyword arguments besides sample and timestep, from the text conditioning (and for SDXL the
        batch's sizes)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def cache_fingerprint(self) -> str:
        """Identifies what the cache's encoders compute: their weight files, dtypes and this backend."""
        dtypes = [str(self.vae_dtype), *(str(m.dtype) for m in self._text_encoders.values())]
        folders = [fingerprint_files(f) for f in self.frozen_folders]
        return hash_json(["torch", folders, dtypes, self.config.mixed_precision])

    def latents(self, vae: AutoencoderKL, batch: Batch, latent_eps: torch.Tensor) -> torch.Tensor:
        """Scaled float32 latents drawn from the posterior (cached, or encoded now by the frozen VAE):
        (mean + std * eps) * scaling_factor."""
        with torch.no_grad():
            if "latent_mean" in batch:
                mean, logvar = batch["latent_mean"], batch["latent_logvar"]
            else:
                dist = vae.encode(batch["pixel_values"].to(self.vae_dtype)).latent_dist
                mean, logvar = dist.mean, dist.logvar
            mean, std = mean.float(), torch.exp(0.5 * logvar.float())
            return (mean + std * latent_eps) * vae.config.scaling_factor

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean (Min-SNR weighted) denoising loss of one micro-batch, and no further metrics."""
        losses = self.denoising_losses(models, batch, randoms)
        return snr_weighted_mean(self.scheduler, losses, randoms["timesteps"].long(), self.config.snr_gamma), {}

    def denoising_losses(self, models: Models, batch: Batch, randoms: Batch) -> torch.Tensor:
        """Each sample's loss (B,) between the UNet's prediction on the noised latents and the training target."""
        cfg = self.config
        latents = self.latents(models["vae"], batch, randoms["latent_eps"])
        if self.text_keys[0] in batch:  # the latent cache's text states
            text = {k: batch[k] for k in self.text_keys}
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder and torch.is_grad_enabled()):
                text = self.encode_prompt(models, batch)
        timesteps = randoms["timesteps"].long()
        noisy = self.scheduler.add_noise(latents, randoms["noise_in"], timesteps)
        target = training_target(self.scheduler, latents, randoms["noise"], timesteps)
        prediction = models["unet"](noisy, timesteps, **self.unet_conditioning(text, batch), return_dict=False)[0]
        return per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c)

    def unconditional_text(self, models: Models, text: Batch) -> Batch:
        """The unconditional counterpart of ``text`` (rows of `encode_prompt`'s outputs): the encoding of "", as
        diffusers' StableDiffusionPipeline uses without a negative prompt."""
        ids = {k: torch.from_numpy(v).to(self.device) for k, v in tokenize(self.tokenizers, [""]).items()}
        empty = self.encode_prompt(models, ids)
        return {k: empty[k].expand_as(text[k]).to(text[k].dtype) for k in text}

    def sampling_scheduler(self) -> Any:
        """The validation sampler: DDIM, from the pipeline's scheduler config."""
        return DDIMScheduler.from_config(self.scheduler.config)

    def sampling_pipeline(self, models: Models) -> DiffusionPipeline:
        """diffusers' StableDiffusionPipeline of the in-memory (unwrapped) models, with `sampling_scheduler`."""
        return StableDiffusionPipeline(
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            tokenizer=self.tokenizers[0],
            unet=models["unet"],
            scheduler=self.sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def sample(self, models: Models, prompt: str, num_images: int, generator: torch.Generator) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1] for one prompt: DDIM with classifier-free guidance, via diffusers'
        pipeline of the task (`sampling_pipeline`)."""
        cfg = self.config
        pipeline = self.sampling_pipeline(models)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            prompt,
            height=cfg.image_size[0],
            width=cfg.image_size[1],
            num_images_per_prompt=num_images,
            num_inference_steps=cfg.validation_num_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
            generator=generator,
            output_type="np",
        ).images
