"""Unconditional image generation: diffusers' train_unconditional.py objective in JAX (the roles are in
jaxdiff.objective.UnconditionalRoles).

A UNet2DModel learns to denoise the training images themselves; validation samples it with DDPM (or DDIM) as
diffusers' DDPMPipeline does, and the export is a DDPMPipeline folder.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import diffusion
from jaxdiff.config import TrainConfig
from jaxdiff.models import nn
from jaxdiff.models.modeling import PretrainedWeights, RandomInit
from jaxdiff.models.unet_2d import UNet2DModel
from jaxdiff.objective import UnconditionalRoles
from jaxdiff.tasks.text_to_image import COMPUTE_DTYPES

log = logging.getLogger("jaxdiff")

Batch = dict[str, jax.Array]
Models = dict[str, nnx.Module]


class Unconditional(UnconditionalRoles):
    """A UNet2DModel trained from scratch (or fine-tuned) on images without captions."""

    train_filter = nnx.Param

    def __init__(self, config: TrainConfig) -> None:
        """Reads the UNet's config and builds it abstractly; `pretrained` says where its weights come from (its
        files, or a random initialisation the trainer draws on the devices, sharded)."""
        self.config = config
        self._setup()
        kwargs = {
            "dtype": COMPUTE_DTYPES[config.mixed_precision],
            "param_dtype": jnp.float32,
            "gradient_checkpointing": config.gradient_checkpointing,
            "attention_impl": nn.resolve_attention(
                config.attention_implementation, half_precision=config.mixed_precision != "no"
            ),
        }
        log.info("attention implementation: %s", kwargs["attention_impl"])
        weights: PretrainedWeights | RandomInit
        if self.unet_folder is None:
            log.info("training a UNet2DModel from scratch (torch's default initialisation, seed %d)", config.seed)
            self.unet, weights = UNet2DModel.abstract_from_config(self.unet_config, seed=config.seed, **kwargs)
        else:
            log.info("fine-tuning the UNet2DModel of %s", self.unet_folder)
            self.unet, weights = UNet2DModel.abstract_from_pretrained(
                self.unet_folder,
                variant=config.variant,
                allow_pickle=config.allow_pickled_weights,
                config_updates={"sample_size": self.sample_size},
                **kwargs,
            )
        self.pretrained = {"unet": weights}
        self.schedule = diffusion.NoiseSchedule.from_config(self.scheduler_config)

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a batch: the images."""
        return {"pixel_values": jax.ShapeDtypeStruct((batch_size, *self.latent_shape), jnp.float32)}

    def draw(self, rng: jax.Array, batch_size: int) -> Batch:
        """The step's noise (and noise_in) and timesteps for the whole global batch, as `draw_host`'s keys."""
        cfg = self.config
        shape = (batch_size, *self.latent_shape)
        return diffusion.denoising_draws(
            rng, shape, self.num_train_timesteps, self.timestep_weights, cfg.noise_offset, cfg.input_perturbation
        )

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The mean weighted denoising loss of the UNet on the noised images, and no further metrics."""
        cfg = self.config
        images, noise, t = batch["pixel_values"].astype(jnp.float32), randoms["noise"], randoms["timesteps"]
        noisy = diffusion.add_noise(self.schedule, images, randoms["noise_in"], t)
        target = diffusion.training_target(self.schedule, images, noise, t)
        prediction = models["unet"](noisy, t).sample
        losses = diffusion.per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c)
        return jnp.mean(losses * self.loss_weights(t)), {}

    def loss_weights(self, timesteps: jax.Array) -> jax.Array | float:
        """Each sample's loss weight: Min-SNR with --snr_gamma, else SNR for x_0 prediction, else 1."""
        if self.config.snr_gamma is None and self.prediction_type != "sample":
            return 1.0
        snr = diffusion.compute_snr(self.schedule, timesteps)
        if self.config.snr_gamma is None:
            return snr
        return diffusion.min_snr_loss_weights(snr, self.config.snr_gamma, self.prediction_type)

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """One row per image to sample (the prompts, all "", carry nothing else)."""
        return {"image_index": np.arange(len(prompts), dtype=np.int32)}

    def sample(self, models: Models, prompt_ids: Batch, rng: jax.Array) -> jax.Array:
        """Images (N, H, W, 3) in [0, 1], one per row of ``prompt_ids``: DDPM (or DDIM) from unit-Gaussian noise
        over --validation_num_inference_steps, as diffusers' DDPMPipeline (DDIMPipeline)."""
        cfg, unet = self.config, models["unet"]
        noise = jax.random.normal(rng, (prompt_ids["image_index"].shape[0], *self.latent_shape))

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return unet(x, t).sample.astype(jnp.float32)

        steps = cfg.validation_num_inference_steps
        if cfg.validation_scheduler == "ddim":
            images = diffusion.ddim_sample(self.schedule, model_fn, noise, steps)
        else:
            images = diffusion.ddpm_sample(self.schedule, model_fn, noise, steps, jax.random.fold_in(rng, 1))
        return jnp.clip(jnp.transpose(images, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)
