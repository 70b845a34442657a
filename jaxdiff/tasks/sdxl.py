"""SDXL fine-tuning: the diffusers train_text_to_image_sdxl.py objective, in JAX.

What differs from text_to_image: two text encoders whose penultimate hidden states are concatenated, the second
one's projected pooled state, and the six micro-conditioning numbers (original size, crop, target size) of each
sample; both encoders can train (`--train_text_encoder`), which diffusers' script does not allow.
"""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxdiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.objective import SDXLRoles
from jaxdiff.tasks.text_to_image import COMPUTE_DTYPES, Batch, Models, TextToImage


class SDXL(SDXLRoles, TextToImage):
    """SDXL's UNet (and optionally both text encoders) trained on (image, caption) pairs; VAE frozen."""

    name = "sdxl"
    text_encoder_classes: ClassVar[dict[str, type[CLIPTextModel | CLIPTextModelWithProjection]]] = {
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    text_keys = ("encoder_hidden_states", "text_embeds")

    def abstract_text(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of `encode_prompt`'s outputs for ``batch_size`` prompts."""
        dtype = COMPUTE_DTYPES[self.config.mixed_precision]
        first, second = self.text_encoder.config, self.text_encoder_2.config
        width = first.hidden_size + second.hidden_size
        return {
            "encoder_hidden_states": jax.ShapeDtypeStruct((batch_size, first.max_position_embeddings, width), dtype),
            "text_embeds": jax.ShapeDtypeStruct((batch_size, second.projection_dim), dtype),
        }

    def encode_prompt(self, models: Models, ids: Batch) -> Batch:
        """diffusers' SDXL conditioning: each encoder's penultimate hidden state (no final layer norm),
        concatenated on the feature axis, and the second encoder's projected pooled state (`text_embeds`)."""
        first = models["text_encoder"](ids["input_ids"], output_hidden_states=True)
        second = models["text_encoder_2"](ids["input_ids_2"], output_hidden_states=True)
        states = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
        return {"encoder_hidden_states": states, "text_embeds": second.text_embeds}

    def unet_conditioning(self, text: Batch, batch: Batch) -> dict[str, Any]:
        """Text states, plus the pooled embedding and the time ids (original h, w, crop top, left, target h, w)
        of the pixels each sample was cut from."""
        rows = batch["original_size"].shape[0]
        target = jnp.broadcast_to(jnp.asarray(self.target_size, jnp.float32), (rows, 2))
        time_ids = jnp.concatenate(
            [batch["original_size"].astype(jnp.float32), batch["crop_top_left"].astype(jnp.float32), target], axis=-1
        )
        return {
            "encoder_hidden_states": text["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids},
        }

    def unconditional_text(self, models: Models, text: Batch) -> Batch:
        """What StableDiffusionXLPipeline uses without a negative prompt: zeros when the pipeline sets
        `force_zeros_for_empty_prompt` (LCM-SDXL distillation's unconditional input too), else the encoding of ""."""
        if not self.force_zeros_for_empty_prompt:
            return super().unconditional_text(models, text)
        return {k: jnp.zeros_like(v) for k, v in text.items()}

    def sampling_batch(self, rows: int) -> Batch:
        """Generated images' size conditioning, as the pipeline's defaults: uncropped, at the training size."""
        return {
            "original_size": jnp.broadcast_to(jnp.asarray(self.target_size, jnp.int32), (rows, 2)),
            "crop_top_left": jnp.zeros((rows, 2), jnp.int32),
        }
