"""Unconditional image generation on torch: jaxdiff.tasks.unconditional's objective (diffusers'
train_unconditional.py) with diffusers' UNet2DModel, sampled by DDPMPipeline (or DDIMPipeline)."""

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from jaxdiff.config import TrainConfig
from jaxdiff.hub import HubOptions
from jaxdiff.objective import UnconditionalRoles
from torch_backend.diffusion import denoising_draws, min_snr_loss_weights, per_sample_loss, training_target
from torch_backend.tasks.text_to_image import Batch, Models, load_pretrained, weight_kwargs


class Unconditional(UnconditionalRoles):
    """A UNet2DModel trained from scratch (torch's initialisation, seeded) or fine-tuned, on images without
    captions."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self._setup()
        if self.unet_folder is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.unet = UNet2DModel.from_config(self.unet_config)
        else:
            weights = weight_kwargs(HubOptions.from_config(config))
            self.unet = load_pretrained(UNet2DModel, self.unet_folder, sample_size=self.sample_size, **weights)
        self.unet.to(device).train()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scheduler = DDPMScheduler.from_config(self.scheduler_config)

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """The step's noise (and noise_in) and timesteps, as the JAX task's `draw` with torch's generator."""
        cfg = self.config
        shape = (batch_size, *self.latent_shape)
        return denoising_draws(
            generator, shape, self.num_train_timesteps, self.timestep_weights, cfg.noise_offset, cfg.input_perturbation
        )

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean weighted denoising loss of the UNet on the noised images, and no further metrics."""
        cfg = self.config
        images, timesteps = batch["pixel_values"].float(), randoms["timesteps"].long()
        noisy = self.scheduler.add_noise(images, randoms["noise_in"], timesteps)
        target = training_target(self.scheduler, images, randoms["noise"], timesteps)
        prediction = models["unet"](noisy, timesteps, return_dict=False)[0]
        losses = per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c)
        return (losses * self.loss_weights(timesteps)).mean(), {}

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | float:
        """Each sample's loss weight: Min-SNR with --snr_gamma, else SNR for x_0 prediction (the script's
        ``alpha_t / (1 - alpha_t)``), else 1."""
        if self.config.snr_gamma is None and self.prediction_type != "sample":
            return 1.0
        alpha_bar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alpha_bar / (1.0 - alpha_bar)
        if self.config.snr_gamma is None:
            return snr
        return min_snr_loss_weights(snr, self.config.snr_gamma, self.prediction_type)

    def sample(self, models: Models, prompt: str, num_images: int, generator: torch.Generator) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1] from diffusers' DDPMPipeline (or DDIMPipeline, eta 0) of the in-memory
        UNet over --validation_num_inference_steps (the prompt, "", is not used)."""
        cfg = self.config
        if cfg.validation_scheduler == "ddim":
            pipeline = DDIMPipeline(unet=models["unet"], scheduler=DDIMScheduler.from_config(self.scheduler_config))
        else:
            pipeline = DDPMPipeline(unet=models["unet"], scheduler=DDPMScheduler.from_config(self.scheduler_config))
        pipeline.set_progress_bar_config(disable=True)
        steps = cfg.validation_num_inference_steps
        return pipeline(batch_size=num_images, generator=generator, num_inference_steps=steps, output_type="np").images
