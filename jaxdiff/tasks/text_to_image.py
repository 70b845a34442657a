"""Text-to-image fine-tuning of SD 1.x/2.x: the diffusers train_text_to_image.py objective, in JAX.

The task owns what is specific to it: which models load and which train, the per-sample random draws, the
loss, and the validation sampler. The trainer owns everything else.
"""

import functools
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from jaxdiff import diffusion
from jaxdiff.config import ConfigError, TrainConfig
from jaxdiff.data import fingerprint_files
from jaxdiff.data.fingerprint import hash_json
from jaxdiff.data.transforms import INPUT_IDS_KEYS, tokenize
from jaxdiff.hub import HubOptions, resolve_model, resolve_pipeline
from jaxdiff.models import nn
from jaxdiff.models.autoencoder_kl import AutoencoderKL
from jaxdiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.models.lora import add_lora
from jaxdiff.models.modeling import PretrainedWeights
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from jaxdiff.objective import TextToImageRoles

log = logging.getLogger("jaxdiff")

COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}

Batch = dict[str, jax.Array]
Models = dict[str, nnx.Module]


class TextToImage(TextToImageRoles):
    """UNet (and optionally the text encoder) trained on (image, caption) pairs; VAE frozen."""

    name = "text_to_image"

    #: The class of each text encoder folder (`text_encoder_names` of the roles), in conditioning order.
    text_encoder_classes: ClassVar[dict[str, type[CLIPTextModel | CLIPTextModelWithProjection]]] = {
        "text_encoder": CLIPTextModel
    }
    #: Batch keys of the text conditioning (`encode_prompt`'s outputs, also what the latent cache stores).
    text_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)

    def __init__(self, config: TrainConfig) -> None:
        """Reads the pipeline's configs and builds its models abstractly; `pretrained` says where the weights are
        (the trainer loads them into their sharded arrays)."""
        self.config = config
        options = HubOptions.from_config(config)
        vae_id = config.pretrained_vae_model_name_or_path
        models = ("unet", *self.text_encoder_names, *(() if vae_id else ("vae",)))
        root = resolve_pipeline(config.pretrained_model_name_or_path, models, options)
        self.root = root  # local files: tokenizers, scheduler, weights
        self.model_path = config.pretrained_model_name_or_path  # what the export copies from (id or folder)
        compute = COMPUTE_DTYPES[config.mixed_precision]
        load = {"variant": options.variant, "allow_pickle": options.allow_pickle}
        runtime = {
            "attention_impl": nn.resolve_attention(
                config.attention_implementation, half_precision=config.mixed_precision != "no"
            )
        }
        log.info("attention implementation: %s", runtime["attention_impl"])
        self.pretrained: dict[str, PretrainedWeights] = {}
        # Trained weights are float32 (trained text encoders remat with the UNet); frozen ones, LoRA's base weights
        # included, are stored in the compute dtype; adapters are float32.
        trained_dtype = compute if self.lora else jnp.float32
        self.unet, self.pretrained["unet"] = self.load_unet(
            root,
            dtype=compute,
            param_dtype=trained_dtype,
            gradient_checkpointing=config.gradient_checkpointing,
            **load,
            **runtime,
        )
        train_text = config.train_text_encoder
        for name in self.text_encoder_names:
            module, self.pretrained[name] = self.text_encoder_classes[name].abstract_from_pretrained(
                root,
                name,
                dtype=compute,
                param_dtype=trained_dtype if train_text else compute,
                gradient_checkpointing=train_text and config.gradient_checkpointing,
                **load,
                **runtime,
            )
            setattr(self, name, module)
        if self.lora:
            for name, module in self.trainable.items():
                try:
                    add_lora(module, self.lora, name, abstract=True)
                except ValueError as err:
                    raise ConfigError(f"--lora_target_modules={list(self.lora.targets(name))}: {err}") from None
        vae_options = options.for_other_repo() if vae_id else options
        vae_folder = resolve_model(vae_id, None, AutoencoderKL.weights_name, vae_options) if vae_id else root / "vae"
        self.vae_folder = vae_folder
        self.frozen_folders = [vae_folder] + ([] if train_text else [root / n for n in self.text_encoder_names])
        self.vae_dtype = COMPUTE_DTYPES[self.vae_precision]
        self.vae, self.pretrained["vae"] = AutoencoderKL.abstract_from_pretrained(
            vae_folder,
            dtype=self.vae_dtype,
            param_dtype=self.vae_dtype,
            variant=vae_options.variant,
            allow_pickle=vae_options.allow_pickle,
            **runtime,
        )
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        if config.prediction_type:
            scheduler["prediction_type"] = config.prediction_type
        self.schedule = diffusion.NoiseSchedule.from_config(scheduler)
        self._common(
            self.schedule.num_train_timesteps,
            self.unet.config.in_channels,
            len(self.vae.config.block_out_channels),
            len(self.unet.config.block_out_channels),
        )

    def load_unet(self, root: Path, **kwargs: Any) -> tuple[UNet2DConditionModel, PretrainedWeights]:
        """The trained UNet built abstractly from the pipeline's ``unet/`` (`abstract_from_pretrained`'s keyword
        arguments), and where its weights are."""
        return UNet2DConditionModel.abstract_from_pretrained(root, "unet", **kwargs)

    @functools.cached_property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """The pipeline's tokenizer(s), one per text encoder, read when first needed (compiling a step needs none)."""
        return tuple(CLIPTokenizer.from_pretrained(self.root / folder) for folder in self.tokenizer_folders)

    @property
    def train_filter(self) -> type[nnx.Variable]:
        """The variables of the `trainable` modules that train: LoRA adapters, or every parameter."""
        return nn.LoRAParam if self.lora else nnx.Param

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a batch of ``batch_size`` as the data pipeline delivers it (images, token ids and
        SDXL's sizes, or with --cache_latents the cached latent distribution and text states)."""
        sizes = {key: jax.ShapeDtypeStruct((batch_size, 2), jnp.int32) for key in ("original_size", "crop_top_left")}
        if not self.config.cache_latents:
            ids = {
                key: jax.ShapeDtypeStruct((batch_size, getattr(self, name).config.max_position_embeddings), jnp.int32)
                for key, name in zip(INPUT_IDS_KEYS, self.text_encoder_names, strict=False)
            }
            pixels = jax.ShapeDtypeStruct((batch_size, 3, *self.config.image_size), jnp.float32)
            return {"pixel_values": pixels, **ids, **sizes}
        latent = jax.ShapeDtypeStruct(
            (batch_size, self.vae.config.latent_channels, *self.latent_shape[1:]), jnp.float32
        )
        return {"latent_mean": latent, "latent_logvar": latent, **self.abstract_text(batch_size), **sizes}

    def abstract_text(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of `encode_prompt`'s outputs (cached text states) for ``batch_size`` prompts."""
        config = self.text_encoder.config
        shape = (batch_size, config.max_position_embeddings, config.hidden_size)
        return {"encoder_hidden_states": jax.ShapeDtypeStruct(shape, COMPUTE_DTYPES[self.config.mixed_precision])}

    def draw(self, rng: jax.Array, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample, drawn for the whole global batch.

        Drawing before the batch is split into micro-batches makes accumulation equal to a larger batch, and
        with partitionable threefry the numbers do not depend on the mesh.
        """
        cfg = self.config
        draws = diffusion.denoising_draws(
            rng,
            (batch_size, *self.latent_shape),
            self.num_train_timesteps,
            self.timestep_weights,
            cfg.noise_offset,
            cfg.input_perturbation,
        )
        return {**draws, **self.draw_dropout_seeds(rng, batch_size)}

    def draw_dropout_seeds(self, rng: jax.Array, batch_size: int) -> Batch:
        """With LoRA dropout one seed per row (a micro-batch's masks come from its first row's); else nothing."""
        if not (self.lora and self.lora.dropout):
            return {}
        return {"dropout_seed": jax.random.randint(jax.random.fold_in(rng, 5), (batch_size,), 0, 2**31 - 1)}

    def encode_images(self, pixel_values: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the frozen VAE's latent distribution, for the latent cache."""
        return _encode_images(self.vae, jnp.asarray(pixel_values, self.vae_dtype))

    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The frozen text encoder(s)' conditioning (`text_keys`), for the latent cache."""
        return self._encode_prompt_jit(self._text_encoders, {k: jnp.asarray(v) for k, v in ids.items()})

    @functools.cached_property
    def _encode_prompt_jit(self) -> Any:
        return nnx.jit(self.encode_prompt)

    def encode_prompt(self, models: Models, ids: Batch) -> Batch:
        """The text conditioning (`text_keys`) of token ids (`input_ids`, ...): the text encoder's last states."""
        return {"encoder_hidden_states": models["text_encoder"](ids["input_ids"]).last_hidden_state}

    def unet_conditioning(self, text: Batch, batch: Batch) -> dict[str, Any]:
        """The UNet's keyword arguments besides sample and timestep, from the text conditioning (and for SDXL the
        batch's sizes)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def cache_fingerprint(self) -> str:
        """Identifies what the cache's encoders compute: their weight files and dtypes."""
        return hash_json(
            [[fingerprint_files(f) for f in self.frozen_folders], str(self.vae_dtype), self.config.mixed_precision]
        )

    def latents(self, vae: AutoencoderKL, batch: Batch, latent_eps: jax.Array) -> jax.Array:
        """Scaled latents drawn from the posterior (cached, or encoded now by the frozen VAE)."""
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            dist = vae.encode(batch["pixel_values"].astype(self.vae_dtype)).latent_dist
            mean, logvar = dist.mean, dist.logvar
        mean, std = mean.astype(jnp.float32), jnp.exp(0.5 * logvar.astype(jnp.float32))
        return jax.lax.stop_gradient((mean + std * latent_eps) * vae.config.scaling_factor)

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The task's `objective` on one micro-batch, LoRA adapters dropping their inputs in it (keyed by the
        micro-batch's first dropout seed)."""
        seed = randoms.get("dropout_seed")
        dropout = nn.lora_dropout(jax.random.PRNGKey(seed.reshape(-1)[0])) if seed is not None else nullcontext()
        with dropout:
            return self.objective(models, batch, randoms)

    def objective(self, models: Models, batch: Batch, randoms: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The mean (Min-SNR weighted) denoising loss, and no further metrics."""
        return self.weighted_mean(self.denoising_losses(models, batch, randoms), randoms["timesteps"]), {}

    def denoising_losses(self, models: Models, batch: Batch, randoms: Batch) -> jax.Array:
        """Each sample's loss (B,) between the UNet's prediction on the noised latents and the training target."""
        cfg = self.config
        latents = self.latents(models["vae"], batch, randoms["latent_eps"])
        cached = self.text_keys[0] in batch  # the latent cache's text states
        text = {k: batch[k] for k in self.text_keys} if cached else self.encode_prompt(models, batch)
        t = randoms["timesteps"]
        noisy = diffusion.add_noise(self.schedule, latents, randoms["noise_in"], t)
        target = diffusion.training_target(self.schedule, latents, randoms["noise"], t)
        prediction = models["unet"](noisy, t, **self.unet_conditioning(text, batch)).sample
        return diffusion.per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c)

    def weighted_mean(self, losses: jax.Array, timesteps: jax.Array) -> jax.Array:
        """The mean of per-sample losses, Min-SNR weighted by their timesteps with --snr_gamma."""
        gamma = self.config.snr_gamma
        if gamma is not None:
            snr = diffusion.compute_snr(self.schedule, timesteps)
            losses = losses * diffusion.min_snr_loss_weights(snr, gamma, self.schedule.prediction_type)
        return jnp.mean(losses)

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids per tokenizer (`input_ids`, ...), each (len(prompts), max_length), padded as in training."""
        return tokenize(self.tokenizers, prompts)

    def unconditional_text(self, models: Models, text: Batch) -> Batch:
        """The unconditional counterpart of ``text`` (rows of `encode_prompt`'s outputs): the encoding of "", as
        diffusers' StableDiffusionPipeline uses without a negative prompt."""
        empty = self.encode_prompt(models, {k: jnp.asarray(v) for k, v in self.tokenize([""]).items()})
        return {k: jnp.broadcast_to(empty[k], text[k].shape).astype(text[k].dtype) for k in text}

    def sampling_batch(self, rows: int) -> Batch:
        """What `unet_conditioning` reads from the batch besides text, for ``rows`` generated images: nothing."""
        return {}

    def sampling_model(self, models: Models, prompt_ids: Batch) -> diffusion.ModelFn:
        """The denoiser the sampler calls for tokenized prompts: with classifier-free guidance at the validation
        guidance scale when it is above 1 (as diffusers' pipelines), over the batch [unconditional; prompts]."""
        scale = self.config.validation_guidance_scale
        unet, text = models["unet"], self.encode_prompt(models, prompt_ids)
        rows = prompt_ids["input_ids"].shape[0]
        if scale > 1:
            uncond = self.unconditional_text(models, text)
            text, rows = {k: jnp.concatenate([uncond[k], text[k]]) for k in text}, 2 * rows
        conditioning = self.unet_conditioning(text, self.sampling_batch(rows))

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return unet(x, t, **conditioning).sample.astype(jnp.float32)

        return diffusion.classifier_free_guidance(model_fn, scale) if scale > 1 else model_fn

    def denoise(self, model_fn: diffusion.ModelFn, noise: jax.Array, rng: jax.Array) -> jax.Array:
        """The validation sampler from unit-Gaussian latents: DDIM, --validation_num_inference_steps."""
        return diffusion.ddim_sample(self.schedule, model_fn, noise, self.config.validation_num_inference_steps)

    def sample(self, models: Models, prompt_ids: Batch, rng: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] for prompt token ids (`tokenize`'s, B each), from the task's sampler
        (`denoise`) and denoiser (`sampling_model`)."""
        batch = prompt_ids["input_ids"].shape[0]
        noise = jax.random.normal(rng, (batch, *self.latent_shape))
        latents = self.denoise(self.sampling_model(models, prompt_ids), noise, jax.random.fold_in(rng, 1))
        vae = models["vae"]
        images = vae.decode((latents / vae.config.scaling_factor).astype(self.vae_dtype)).sample
        return jnp.clip(jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)


@nnx.jit
def _encode_images(vae: AutoencoderKL, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.logvar
