"""DreamBooth on torch: jaxdiff.tasks.dreambooth's objective (diffusers' train_dreambooth.py) with diffusers' models,
for SD 1.x/2.x and SDXL base models, full or LoRA."""

import torch

from jaxdiff.data.dreambooth import CLASS_PREFIX
from jaxdiff.objective import DreamBoothRoles, by_pipeline_kind
from torch_backend.diffusion import snr_weighted_mean
from torch_backend.tasks.sdxl import SDXL
from torch_backend.tasks.text_to_image import Batch, Models, TextToImage


class DreamBoothLoss(DreamBoothRoles):
    """The torch half of DreamBooth over a `TextToImage` (or `SDXL`) task: paired draws and the prior loss."""

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """The text-to-image draws of both images of each row (see `DreamBoothRoles`)."""
        return self.pair_draws(super().draw(generator, batch_size * self.images_per_row), batch_size)

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """instance loss + prior_loss_weight x prior loss, with both parts as metrics: instances and class images
        go through the UNet as one batch [instances; classes]."""
        if not self.prior_preservation:
            return super().loss(models, batch, randoms)
        rows = len(batch["pixel_values"])
        both = {k: torch.cat([v, batch[CLASS_PREFIX + k]]) for k, v in batch.items() if CLASS_PREFIX + k in batch}
        draws = {k: torch.cat([v[:, 0], v[:, 1]]) for k, v in randoms.items()}
        losses = self.denoising_losses(models, both, draws)
        timesteps = draws["timesteps"][:rows].long()
        instance = snr_weighted_mean(self.scheduler, losses[:rows], timesteps, self.config.snr_gamma)
        prior = losses[rows:].mean()
        loss = instance + self.config.prior_loss_weight * prior
        return loss, {"instance_loss": instance, "prior_loss": prior}


class DreamBooth(DreamBoothLoss, TextToImage):
    """DreamBooth on an SD 1.x/2.x pipeline."""


class DreamBoothSDXL(DreamBoothLoss, SDXL):
    """DreamBooth on an SDXL pipeline (two text encoders, size conditioning of every image)."""


#: The task's constructor: the DreamBooth class of --pretrained_model_name_or_path's kind, SDXL or SD.
dreambooth = by_pipeline_kind(sd=DreamBooth, sdxl=DreamBoothSDXL)
