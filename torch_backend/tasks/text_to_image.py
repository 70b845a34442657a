"""Text-to-image fine-tuning of SD 1.x/2.x on torch: jaxdiff.tasks.text_to_image's objective with diffusers' models.

As in the JAX task, the task owns which models load and which train, the per-sample random draws, the loss and the
validation sampler; the trainer owns everything else.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from jaxdiff.config import TrainConfig
from jaxdiff.data import fingerprint_files
from jaxdiff.data.fingerprint import hash_json
from jaxdiff.hub import HubOptions, ModelFilesNotFoundError, resolve_model, resolve_pipeline
from jaxdiff.objective import TextToImageRoles
from torch_backend.diffusion import snr_weighted_loss, training_target

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


def _weights(options: HubOptions) -> dict[str, Any]:
    """from_pretrained arguments choosing the weight files the resolver fetched."""
    return {
        "variant": options.variant,
        "use_safetensors": None if options.allow_pickle else True,
        "allow_pickle": options.allow_pickle,
    }


class TextToImage(TextToImageRoles):
    """UNet (and optionally the text encoder) trained on (image, caption) pairs; VAE frozen."""

    name = "text_to_image"

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model_path = config.pretrained_model_name_or_path
        weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        # The files the JAX task reads, fetched by the shared resolver; every model loads from a local folder.
        options = HubOptions.from_config(config)
        vae_path = config.pretrained_vae_model_name_or_path
        models = ("unet", "text_encoder") if vae_path else ("unet", "vae", "text_encoder")
        root = resolve_pipeline(self.model_path, models, options)
        vae_options = options.for_other_repo() if vae_path else options
        self.vae_folder = resolve_model(vae_path, None, VAE_WEIGHTS, vae_options) if vae_path else root / "vae"
        self.text_encoder_folder = root / "text_encoder"
        self.tokenizer = load_pretrained(CLIPTokenizer, root / "tokenizer")
        self.scheduler = load_pretrained(DDPMScheduler, root / "scheduler")
        if config.prediction_type:
            self.scheduler.register_to_config(prediction_type=config.prediction_type)
        self.unet = load_pretrained(UNet2DConditionModel, root / "unet", **_weights(options))
        self.text_encoder = load_pretrained(CLIPTextModel, self.text_encoder_folder, **_weights(options))
        self.vae = load_pretrained(AutoencoderKL, self.vae_folder, **_weights(vae_options))

        # Trained weights in float32; frozen ones in the compute dtype, except a VAE marked force_upcast (as in
        # the JAX task, which keeps such a VAE, e.g. SDXL's, in float32 whatever the training precision).
        self.vae_dtype = torch.float32 if getattr(self.vae.config, "force_upcast", True) else weight_dtype
        self.vae.requires_grad_(False).to(device)
        if self.vae_dtype != torch.float32:
            self.vae.to(dtype=self.vae_dtype)
        self.unet.to(device).train()
        self.text_encoder.to(device)
        if config.train_text_encoder:
            self.text_encoder.train()
        else:
            self.text_encoder.requires_grad_(False)
            if weight_dtype != torch.float32:
                self.text_encoder.to(dtype=weight_dtype)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                # activation_checkpointing_enable replaces the deprecated name in later transformers 5 releases.
                enable = getattr(self.text_encoder, "activation_checkpointing_enable", None)
                (enable or self.text_encoder.gradient_checkpointing_enable)()

        self._common(
            self.scheduler.config.num_train_timesteps,
            self.unet.config.in_channels,
            len(self.vae.config.block_out_channels),
        )

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample, for ``batch_size`` samples (the JAX task's
        ``draw`` with torch's generator: same keys, distributions, noise offset and perturbation semantics)."""
        cfg, device = self.config, self.device
        shape = (batch_size, *self.latent_shape)
        noise = torch.randn(shape, generator=generator, device=device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=device)
        noise_in = noise
        if cfg.input_perturbation:
            noise_in = noise + cfg.input_perturbation * torch.randn(shape, generator=generator, device=device)
        num_timesteps = self.num_train_timesteps
        if self.timestep_weights is None:
            timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
        else:
            probs = torch.as_tensor(self.timestep_weights, dtype=torch.float32, device=device)
            timesteps = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        latent_eps = torch.randn(shape, generator=generator, device=device)
        return {"noise": noise, "noise_in": noise_in, "timesteps": timesteps, "latent_eps": latent_eps}

    def encode_images(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of the frozen VAE's latent distribution, for the latent cache."""
        dist = self.vae.encode(torch.from_numpy(pixel_values).to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy()

    @torch.no_grad()
    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The frozen text encoder's hidden states, for the latent cache (batch key `encoder_hidden_states`)."""
        input_ids = torch.from_numpy(ids["input_ids"]).to(self.device).long()
        return {"encoder_hidden_states": self.text_encoder(input_ids, return_dict=False)[0].float().cpu().numpy()}

    def cache_fingerprint(self) -> str:
        """Identifies what the cache's encoders compute: their weight files, dtypes and this backend."""
        cfg = self.config
        folders = [self.vae_folder] + ([] if cfg.train_text_encoder else [self.text_encoder_folder])
        dtypes = [str(self.vae_dtype), str(self.text_encoder.dtype)]
        return hash_json(["torch", [fingerprint_files(f) for f in folders], dtypes, cfg.mixed_precision])

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

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> torch.Tensor:
        """Mean (Min-SNR weighted) denoising loss of one micro-batch."""
        cfg = self.config
        latents = self.latents(models["vae"], batch, randoms["latent_eps"])
        if "encoder_hidden_states" in batch:  # from the latent cache
            text_states = batch["encoder_hidden_states"]
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder and torch.is_grad_enabled()):
                text_states = models["text_encoder"](batch["input_ids"].long(), return_dict=False)[0]
        timesteps = randoms["timesteps"].long()
        noisy = self.scheduler.add_noise(latents, randoms["noise_in"], timesteps)
        target = training_target(self.scheduler, latents, randoms["noise"], timesteps)
        prediction = models["unet"](noisy, timesteps, text_states, return_dict=False)[0]
        return snr_weighted_loss(
            self.scheduler,
            prediction,
            target,
            timesteps,
            loss_type=cfg.loss_type,
            huber_c=cfg.huber_c,
            snr_gamma=cfg.snr_gamma,
        )

    def sample(self, models: Models, prompt: str, num_images: int, generator: torch.Generator) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1] for one prompt: DDIM with classifier-free guidance, via diffusers'
        StableDiffusionPipeline built from the in-memory (unwrapped) models."""
        cfg = self.config
        pipeline = StableDiffusionPipeline(
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            tokenizer=self.tokenizer,
            unet=models["unet"],
            scheduler=DDIMScheduler.from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            prompt,
            height=cfg.resolution,
            width=cfg.resolution,
            num_images_per_prompt=num_images,
            num_inference_steps=cfg.validation_num_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
            generator=generator,
            output_type="np",
        ).images
