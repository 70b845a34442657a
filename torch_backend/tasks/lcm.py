"""Latent Consistency distillation on torch: jaxdiff.tasks.lcm's objective (diffusers'
train_lcm_distill_{sd,sdxl,lora_sd,lora_sdxl}_wds.py) with diffusers' models, for SD 1.x/2.x and SDXL teachers, full
or LoRA. What lives where (teacher, student, target) is `jaxdiff.objective.LCMRoles`."""

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import LCMScheduler, UNet2DConditionModel

from jaxdiff.config import TrainConfig
from jaxdiff.diffusion.lcm import DDIMSolver
from jaxdiff.hub import HubOptions
from jaxdiff.objective import LCMRoles, by_pipeline_kind
from torch_backend.diffusion import (
    boundary_scalings,
    guidance_scale_embedding,
    per_sample_loss,
    predicted_x0_and_noise,
)
from torch_backend.lora import adapters_disabled
from torch_backend.tasks.sdxl import SDXL
from torch_backend.tasks.text_to_image import Batch, Models, TextToImage

#: Batch keys of SDXL's per-image size conditioning (doubled with the teacher's batch).
SIZE_KEYS = ("original_size", "crop_top_left")


class LCMDistillation(LCMRoles):
    """The torch half of LCM distillation over a `TextToImage` (or `SDXL`) task: models, draws, loss, sampler."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        if not self.lora:  # the teacher: frozen, in the compute dtype with --cast_teacher_unet
            self.teacher_unet.requires_grad_(False).eval().to(device)
            if config.cast_teacher_unet and self.weight_dtype != torch.float32:
                self.teacher_unet.to(dtype=self.weight_dtype)

    def load_unet(self, root: Path, options: HubOptions) -> UNet2DConditionModel:
        """The student (full distillation: the teacher's UNet with a guidance embedding, the teacher kept as
        ``teacher_unet``), or with LoRA the teacher's UNet itself (the adapters are added to it)."""
        teacher = super().load_unet(root, options)
        if self.lora:
            return teacher
        self.teacher_unet = teacher
        dim = self.guidance_dim(teacher.config.time_cond_proj_dim)
        student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
            raise RuntimeError(f"student UNet does not take the teacher's weights: {missing=} {unexpected=}")
        if missing:
            cond_proj = student.time_embedding.cond_proj.weight
            with torch.no_grad():
                cond_proj.copy_(torch.from_numpy(self.initial_cond_proj(tuple(cond_proj.shape))))
        return student

    @functools.cached_property
    def solver(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The DDIM grid (timesteps, alpha_bar one point below each, step ratio), as jaxdiff's `DDIMSolver`."""
        solver = DDIMSolver.create(self.scheduler.alphas_cumprod.numpy(), self.config.num_ddim_timesteps)
        timesteps = torch.from_numpy(np.array(solver.timesteps)).long().to(self.device)
        return timesteps, torch.from_numpy(np.array(solver.alphas_cumprod_prev)).to(self.device), solver.step_ratio

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample (the keys of `draw_host`)."""
        cfg, device = self.config, self.device
        shape = (batch_size, *self.latent_shape)
        w = torch.rand(batch_size, generator=generator, device=device) * (cfg.w_max - cfg.w_min) + cfg.w_min
        return {
            "noise": torch.randn(shape, generator=generator, device=device),
            "latent_eps": torch.randn(shape, generator=generator, device=device),
            "index": torch.randint(0, cfg.num_ddim_timesteps, (batch_size,), generator=generator, device=device),
            "w": w,
        }

    def guidance_embedding(self, w: torch.Tensor) -> torch.Tensor | None:
        """The student's ``timestep_cond`` for guidance scales ``w`` (B,); None for LoRA (no embedding)."""
        dim = self.unet.config.time_cond_proj_dim
        return None if self.lora or dim is None else guidance_scale_embedding(w, dim)

    def consistency(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """c_skip(t) x + c_out(t) x_0(unet(x, t)): a network's consistency output, in float32."""
        output = unet(x, t, **kwargs, return_dict=False)[0].float()
        x0, _ = predicted_x0_and_noise(self.scheduler, output, t, x)
        scalings = boundary_scalings(t, self.config.timestep_scaling_factor)
        c_skip, c_out = (c.reshape(-1, *(1,) * (x.ndim - 1)) for c in scalings)
        return c_skip * x + c_out * x0

    def loss(self, models: Models, batch: Batch, randoms: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The consistency distillation loss (l2 or pseudo-Huber, mean over every element), and no further metrics:
        the student at start_t against the target network at t, reached by the teacher's guided DDIM step."""
        cfg = self.config
        latents = self.latents(models["vae"], batch, randoms["latent_eps"])
        if self.text_keys[0] in batch:  # the latent cache's text states
            text = {k: batch[k] for k in self.text_keys}
        else:
            with torch.no_grad():
                text = self.encode_prompt(models, batch)
        grid, alphas_prev, step_ratio = self.solver
        index, w = randoms["index"].long(), randoms["w"].float()
        start_t = grid[index]
        t = torch.clamp(start_t - step_ratio, min=0)
        noisy = self.scheduler.add_noise(latents, randoms["noise"], start_t)
        guidance = self.guidance_embedding(w)
        conditioning = self.unet_conditioning(text, batch)
        prediction = self.consistency(models["unet"], noisy, start_t, timestep_cond=guidance, **conditioning)

        with torch.no_grad(), self.autocast():
            # The teacher's guided DDIM step from start_t to t: conditional and unconditional rows in one batch.
            uncond = self.unconditional_text(models, text)
            both_text = {k: torch.cat([text[k], uncond[k]]) for k in text}
            both_batch = {k: torch.cat([batch[k], batch[k]]) for k in SIZE_KEYS if k in batch}
            both_x, both_t = torch.cat([noisy, noisy]), torch.cat([start_t, start_t])
            with self.teacher(models) as teacher:
                output = teacher(both_x, both_t, **self.unet_conditioning(both_text, both_batch), return_dict=False)
            x0, eps = predicted_x0_and_noise(self.scheduler, output[0].float(), both_t, both_x)
            (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
            w_ = w.reshape(-1, *(1,) * (noisy.ndim - 1))
            alpha_prev = alphas_prev[index].reshape(w_.shape)
            x0, eps = x0_c + w_ * (x0_c - x0_u), eps_c + w_ * (eps_c - eps_u)
            x_prev = alpha_prev.sqrt() * x0 + (1.0 - alpha_prev).sqrt() * eps

            target_unet = models.get("unet_target", models["unet"])
            target = self.consistency(target_unet, x_prev, t, timestep_cond=guidance, **conditioning)
        return per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c).mean(), {}

    def teacher(self, models: Models) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The teacher UNet while inside: its own, or with LoRA the student with its adapters off."""
        return adapters_disabled(models["unet"]) if self.lora else contextlib.nullcontext(models["teacher_unet"])

    def sampling_scheduler(self) -> LCMScheduler:
        """The validation sampler: the exported LCMScheduler."""
        return LCMScheduler.from_config(self.copied_components["scheduler"].config)


class LCM(LCMDistillation, TextToImage):
    """LCM distillation of an SD 1.x/2.x teacher (``--task lcm``)."""

    name = "lcm"


class LCMSDXL(LCMDistillation, SDXL):
    """LCM distillation of an SDXL teacher (``--task lcm_sdxl``)."""

    name = "lcm_sdxl"


class LCMLoRA(LCMDistillation, TextToImage):
    """LCM-LoRA of an SD 1.x/2.x teacher (``--task lcm_lora``)."""

    name = "lcm_lora"


class LCMLoRASDXL(LCMDistillation, SDXL):
    """LCM-LoRA of an SDXL teacher (``--task lcm_lora``)."""

    name = "lcm_lora"


#: The tasks' constructors: lcm and lcm_sdxl refuse a teacher of the other kind; lcm_lora takes the teacher's kind.
lcm = by_pipeline_kind(sd=LCM)
lcm_sdxl = by_pipeline_kind(sdxl=LCMSDXL)
lcm_lora = by_pipeline_kind(sd=LCMLoRA, sdxl=LCMLoRASDXL)
