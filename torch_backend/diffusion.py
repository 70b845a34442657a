"""Training-side diffusion math in torch, with jaxdiff.diffusion's semantics (tested equal to it), and
the pieces of LCM distillation's objective.

The noise schedule itself (add_noise, velocity, SNR) is diffusers' ``DDPMScheduler`` and ``compute_snr``; only what
diffusers' scripts compute inline is here.
"""

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from jaxdiff.diffusion.lcm import guidance_frequencies

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoising_draws(
    generator: torch.Generator,
    shape: tuple[int, ...],
    num_train_timesteps: int,
    timestep_weights: np.ndarray | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The draws of one denoising step for a batch of ``shape`` (B, C, h, w) on the generator's device
    (jaxdiff.diffusion.denoising_draws with torch's generator: same keys, distributions, noise offset and
    perturbation semantics)."""
    device = generator.device
    noise = torch.randn(shape, generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=device)
    noise_in = noise
    if input_perturbation:
        noise_in = noise + input_perturbation * torch.randn(shape, generator=generator, device=device)
    if timestep_weights is None:
        timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator, device=device)
    else:
        probs = torch.as_tensor(timestep_weights, dtype=torch.float32, device=device)
        timesteps = torch.multinomial(probs, shape[0], replacement=True, generator=generator)
    latent_eps = torch.randn(shape, generator=generator, device=device)
    return {"noise": noise, "noise_in": noise_in, "timesteps": timesteps, "latent_eps": latent_eps}


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model learns to output for the scheduler's prediction_type: the noise, the velocity or x_0."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.001
) -> torch.Tensor:
    """Loss averaged over all but the batch axis, shape (B,), in float32: squared error, or pseudo-Huber
    sqrt(d^2 + c^2) - c."""
    diff = prediction.float() - target.float()
    loss = diff**2 if loss_type == "l2" else torch.sqrt(diff**2 + huber_c**2) - huber_c
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def min_snr_loss_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights: epsilon min(snr, g) / snr (1 at snr = 0, its limit), v_prediction
    min(snr, g) / (snr + 1), sample min(snr, g)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}"
        )
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        positive = snr > 0
        return torch.where(positive, clipped / torch.where(positive, snr, torch.ones_like(snr)), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def snr_weighted_mean(
    scheduler: DDPMScheduler, losses: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None
) -> torch.Tensor:
    """The mean of per-sample losses (B,), Min-SNR weighted by their timesteps when ``snr_gamma`` is set."""
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps).float()
        losses = losses * min_snr_loss_weights(snr, snr_gamma, scheduler.config.prediction_type)
    return losses.mean()


def predicted_x0_and_noise(
    scheduler: DDPMScheduler, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The x_0 and the noise a model output at ``timesteps`` (B,) predicts for the scheduler's prediction_type."""
    alpha_bar = scheduler.alphas_cumprod.to(sample.device)[timesteps].float().reshape(-1, *(1,) * (sample.ndim - 1))
    alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    return output, (sample - alpha * output) / sigma


def boundary_scalings(
    timesteps: torch.Tensor, timestep_scaling: float, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip and c_out at ``timesteps`` (B,): c_skip(0) = 1 and c_out(0) = 0."""
    scaled = timestep_scaling * timesteps.float()
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """The sinusoidal embedding (B, dim) of guidance scales ``w`` (B,), with jaxdiff's shared frequencies."""
    freqs = torch.from_numpy(guidance_frequencies(embedding_dim)).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.nn.functional.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, embedding_dim % 2))
