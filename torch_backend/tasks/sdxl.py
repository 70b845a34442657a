"""SDXL fine-tuning on torch: jaxdiff.tasks.sdxl's objective (diffusers' train_text_to_image_sdxl.py) with diffusers'
models.

What differs from text_to_image: two text encoders whose penultimate hidden states are concatenated, the second
one's projected pooled state, and the six micro-conditioning numbers (original size, crop, target size) of each
sample; both encoders can train (`--train_text_encoder`), which diffusers' script does not allow.
"""

from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from jaxdiff.objective import SDXLRoles
from torch_backend.tasks.text_to_image import Batch, Models, TextToImage


class SDXL(SDXLRoles, TextToImage):
    """SDXL's UNet (and optionally both text encoders) trained on (image, caption) pairs; VAE frozen."""

    name = "sdxl"
    text_encoder_classes: ClassVar[dict[str, type[torch.nn.Module]]] = {
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    text_keys = ("encoder_hidden_states", "text_embeds")

    def encode_prompt(self, models: Models, ids: Batch) -> Batch:
        """diffusers' SDXL conditioning: each encoder's penultimate hidden state (no final layer norm),
        concatenated on the feature axis, and the second encoder's projected pooled state (`text_embeds`)."""
        first = models["text_encoder"](ids["input_ids"].long(), output_hidden_states=True)
        second = models["text_encoder_2"](ids["input_ids_2"].long(), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": states, "text_embeds": second.text_embeds}

    def unet_conditioning(self, text: Batch, batch: Batch) -> dict[str, Any]:
        """Text states, plus the pooled embedding and the float32 time ids (original h, w, crop top, left, target
        h, w) of the pixels each sample was cut from."""
        sizes = batch["original_size"]
        target = torch.tensor(self.target_size, dtype=torch.float32, device=sizes.device).expand(len(sizes), 2)
        time_ids = torch.cat([sizes.float(), batch["crop_top_left"].float(), target], dim=-1)
        return {
            "encoder_hidden_states": text["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids},
        }

    def unconditional_text(self, models: Models, text: Batch) -> Batch:
        """What StableDiffusionXLPipeline uses without a negative prompt: zeros when the pipeline sets
        `force_zeros_for_empty_prompt` (LCM-SDXL distillation's unconditional input too), else the encoding of ""."""
        if not self.force_zeros_for_empty_prompt:
            return super().unconditional_text(models, text)
        return {k: torch.zeros_like(v) for k, v in text.items()}

    def sampling_pipeline(self, models: Models) -> StableDiffusionXLPipeline:
        """diffusers' StableDiffusionXLPipeline of the in-memory (unwrapped) models, with `sampling_scheduler`; its
        unconditional embedding is zeros when the pipeline sets `force_zeros_for_empty_prompt`."""
        return StableDiffusionXLPipeline(
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            text_encoder_2=models["text_encoder_2"],
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=models["unet"],
            scheduler=self.sampling_scheduler(),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
