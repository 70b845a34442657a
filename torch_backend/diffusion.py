"""Training-side diffusion math in torch, with jaxdiff.diffusion's semantics (tested equal to it).

The noise schedule itself (add_noise, velocity, SNR) is diffusers' ``DDPMScheduler`` and ``compute_snr``; only what
diffusers' scripts compute inline is here.
"""

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
