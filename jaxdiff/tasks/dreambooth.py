"""DreamBooth: diffusers' train_dreambooth.py objective in JAX, for SD 1.x/2.x and SDXL base models, full or LoRA.

The text-to-image (or SDXL) task with the instance images and prompt as data and, with prior preservation, a class
image beside each instance image: both go through the UNet in one batch [instances; classes], and the loss is the
instance loss (Min-SNR weighted with --snr_gamma) + prior_loss_weight x the prior loss (plain, as diffusers'), both
also logged. The class images missing from --class_data_dir are sampled by this task's own sampler first.
"""

import jax
import jax.numpy as jnp

from jaxdiff.data.dreambooth import CLASS_PREFIX
from jaxdiff.objective import DreamBoothRoles, by_pipeline_kind
from jaxdiff.tasks.sdxl import SDXL
from jaxdiff.tasks.text_to_image import Batch, Models, TextToImage


class DreamBoothLoss(DreamBoothRoles):
    """The JAX half of DreamBooth over a `TextToImage` (or `SDXL`) task: paired draws and the prior loss."""

    def draw(self, rng: jax.Array, batch_size: int) -> Batch:
        """The text-to-image draws of both images of each row (see `DreamBoothRoles`)."""
        return self.pair_draws(super().draw(rng, batch_size * self.images_per_row), batch_size)

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The text-to-image batch, and with prior preservation the same keys of the class images."""
        batch = super().abstract_batch(batch_size)
        if not self.prior_preservation:
            return batch
        return {**batch, **{CLASS_PREFIX + k: v for k, v in batch.items()}}

    def objective(self, models: Models, batch: Batch, randoms: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """instance loss + prior_loss_weight x prior loss, with both parts as metrics."""
        if not self.prior_preservation:
            return super().objective(models, batch, randoms)
        rows = batch["pixel_values"].shape[0]
        both = {
            k: jnp.concatenate([v, batch[CLASS_PREFIX + k]]) for k, v in batch.items() if CLASS_PREFIX + k in batch
        }
        draws = {k: jnp.concatenate([v[:, 0], v[:, 1]]) for k, v in randoms.items()}
        losses = self.denoising_losses(models, both, draws)
        instance = self.weighted_mean(losses[:rows], draws["timesteps"][:rows])
        prior = jnp.mean(losses[rows:])
        loss = instance + self.config.prior_loss_weight * prior
        return loss, {"instance_loss": instance, "prior_loss": prior}


class DreamBooth(DreamBoothLoss, TextToImage):
    """DreamBooth on an SD 1.x/2.x pipeline."""


class DreamBoothSDXL(DreamBoothLoss, SDXL):
    """DreamBooth on an SDXL pipeline (two text encoders, size conditioning of every image)."""


#: The task's constructor: the DreamBooth class of --pretrained_model_name_or_path's kind, SDXL or SD.
dreambooth = by_pipeline_kind(sd=DreamBooth, sdxl=DreamBoothSDXL)
