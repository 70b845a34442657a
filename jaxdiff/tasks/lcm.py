"""Latent Consistency distillation in JAX: diffusers' train_lcm_distill_{sd,sdxl,lora_sd,lora_sdxl}_wds.py objective.

Each step noises the latents to a point ``start_t`` of the skipping-step DDIM grid; the student's consistency
output there, c_skip x + c_out x0(student), learns to match the target network's at the grid point below,
``t``, reached by one DDIM step of the teacher with classifier-free guidance ``w`` (x0 = c + w (c - u), the
teacher's conditional and unconditional outputs computed as one batch). The target's output is under stop-gradient.
What lives where (teacher, student, target; the LoRA variant) is `jaxdiff.objective.LCMRoles`.
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion
from jaxdiff.diffusion.lcm import DDIMSolver
from jaxdiff.models import nn
from jaxdiff.models.modeling import PretrainedWeights
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from jaxdiff.objective import LCMRoles, by_pipeline_kind
from jaxdiff.tasks.sdxl import SDXL
from jaxdiff.tasks.text_to_image import Batch, Models, TextToImage

#: Batch keys of SDXL's per-image size conditioning (doubled with the teacher's batch).
SIZE_KEYS = ("original_size", "crop_top_left")


class LCMDistillation(LCMRoles):
    """The JAX half of LCM distillation over a `TextToImage` (or `SDXL`) task: models, draws, loss, sampler."""

    def load_unet(self, root: Path, **kwargs: Any) -> tuple[UNet2DConditionModel, PretrainedWeights]:
        """The student (full distillation: the teacher's UNet with a guidance embedding, the teacher built beside
        it as ``teacher_unet``), or with LoRA the teacher's UNet itself (the adapters are added to it)."""
        if self.lora:
            return super().load_unet(root, **kwargs)
        teacher_dtype = kwargs["dtype"] if self.config.cast_teacher_unet else jnp.float32
        teacher_kwargs = {**kwargs, "param_dtype": teacher_dtype, "gradient_checkpointing": False}
        self.teacher_unet, self.pretrained["teacher_unet"] = super().load_unet(root, **teacher_kwargs)
        teacher_dim = self.teacher_unet.config.time_cond_proj_dim
        dim = self.guidance_dim(teacher_dim)
        student, weights_file = super().load_unet(root, config_updates={"time_cond_proj_dim": dim}, **kwargs)
        if teacher_dim is None:
            kernel = student.time_embedding.cond_proj.kernel.get_value()  # (in, out): torch's weight transposed
            cond_proj = self.initial_cond_proj((kernel.shape[1], kernel.shape[0]))
            weights_file = dataclasses.replace(weights_file, extra={"time_embedding.cond_proj.weight": cond_proj})
        return student, weights_file

    @functools.cached_property
    def solver(self) -> DDIMSolver:
        return DDIMSolver.create(np.asarray(self.schedule.alphas_cumprod), self.config.num_ddim_timesteps)

    @functools.cached_property
    def sampling_schedule(self) -> diffusion.NoiseSchedule:
        """The exported LCMScheduler's schedule (the teacher's noise schedule, the distillation's grid and scaling)."""
        return diffusion.NoiseSchedule.from_config(self.copied_components["scheduler"].config)

    def draw(self, rng: jax.Array, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample (the keys of `draw_host`)."""
        cfg = self.config
        keys = jax.random.split(rng, 4)
        shape = (batch_size, *self.latent_shape)
        draws = {
            "noise": jax.random.normal(keys[0], shape),
            "latent_eps": jax.random.normal(keys[1], shape),
            "index": jax.random.randint(keys[2], (batch_size,), 0, cfg.num_ddim_timesteps, jnp.int32),
            "w": jax.random.uniform(keys[3], (batch_size,), minval=cfg.w_min, maxval=cfg.w_max),
        }
        return {**draws, **self.draw_dropout_seeds(rng, batch_size)}

    def guidance_embedding(self, w: jax.Array) -> jax.Array | None:
        """The student's ``timestep_cond`` for guidance scales ``w`` (B,); None for LoRA (no embedding)."""
        dim = self.unet.config.time_cond_proj_dim
        return None if self.lora or dim is None else diffusion.guidance_scale_embedding(w, dim)

    def teacher(self, models: Models) -> Any:
        """The teacher's denoiser ``(x, t, **conditioning) -> output``: its own UNet, or with LoRA the student's
        without adapters."""
        if not self.lora:
            return models["teacher_unet"]
        unet = models["unet"]

        def base_unet(*args: Any, **kwargs: Any) -> Any:
            with nn.lora_disabled():
                return unet(*args, **kwargs)

        return base_unet

    def objective(self, models: Models, batch: Batch, randoms: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The consistency distillation loss (l2 or pseudo-Huber, mean over every element), and no further
        metrics."""
        cfg, schedule, solver = self.config, self.schedule, self.solver
        latents = self.latents(models["vae"], batch, randoms["latent_eps"])
        cached = self.text_keys[0] in batch
        text = {k: batch[k] for k in self.text_keys} if cached else self.encode_prompt(models, batch)
        index, w = randoms["index"], randoms["w"]
        start_t = solver.timesteps[index]
        t = jnp.maximum(start_t - solver.step_ratio, 0)
        scaling = cfg.timestep_scaling_factor
        c_skip_start, c_out_start = diffusion.scalings_for_boundary_conditions(start_t, timestep_scaling=scaling)
        c_skip, c_out = diffusion.scalings_for_boundary_conditions(t, timestep_scaling=scaling)
        ndim = latents.ndim
        noisy = diffusion.add_noise(schedule, latents, randoms["noise"], start_t)
        guidance = self.guidance_embedding(w)
        conditioning = self.unet_conditioning(text, batch)

        output = models["unet"](noisy, start_t, timestep_cond=guidance, **conditioning).sample.astype(jnp.float32)
        x0 = diffusion.get_predicted_original_sample(schedule, output, start_t, noisy)
        prediction = _append(c_skip_start, ndim) * noisy + _append(c_out_start, ndim) * x0

        # The teacher's guided DDIM step from start_t to t: conditional and unconditional rows in one batch.
        uncond = self.unconditional_text(models, text)
        both_text = {k: jnp.concatenate([text[k], uncond[k]]) for k in text}
        both_batch = {k: jnp.concatenate([batch[k], batch[k]]) for k in SIZE_KEYS if k in batch}
        both_x, both_t = jnp.concatenate([noisy, noisy]), jnp.concatenate([start_t, start_t])
        teacher_out = self.teacher(models)(both_x, both_t, **self.unet_conditioning(both_text, both_batch)).sample
        teacher_out = jax.lax.stop_gradient(teacher_out.astype(jnp.float32))
        x0_c, x0_u = jnp.split(diffusion.get_predicted_original_sample(schedule, teacher_out, both_t, both_x), 2)
        eps_c, eps_u = jnp.split(diffusion.get_predicted_noise(schedule, teacher_out, both_t, both_x), 2)
        w_ = _append(w, ndim)
        x_prev = solver.step(x0_c + w_ * (x0_c - x0_u), eps_c + w_ * (eps_c - eps_u), index)

        target_unet = models.get("unet_target", models["unet"])
        target_out = target_unet(x_prev, t, timestep_cond=guidance, **conditioning).sample.astype(jnp.float32)
        target_x0 = diffusion.get_predicted_original_sample(schedule, target_out, t, x_prev)
        target = jax.lax.stop_gradient(_append(c_skip, ndim) * x_prev + _append(c_out, ndim) * target_x0)
        return jnp.mean(diffusion.per_sample_loss(prediction, target, cfg.loss_type, cfg.huber_c)), {}

    def sampling_model(self, models: Models, prompt_ids: Batch) -> diffusion.ModelFn:
        """Full distillation: the student with the guidance embedding of w = scale - 1 and no classifier-free
        guidance (as diffusers' pipelines run a UNet with ``time_cond_proj_dim``); LoRA: the text-to-image one."""
        if self.lora:
            return super().sampling_model(models, prompt_ids)
        unet, text = models["unet"], self.encode_prompt(models, prompt_ids)
        rows = prompt_ids["input_ids"].shape[0]
        conditioning = self.unet_conditioning(text, self.sampling_batch(rows))
        w = jnp.full((rows,), self.config.validation_guidance_scale - 1.0)
        guidance = self.guidance_embedding(w)

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return unet(x, t, timestep_cond=guidance, **conditioning).sample.astype(jnp.float32)

        return model_fn

    def denoise(self, model_fn: diffusion.ModelFn, noise: jax.Array, rng: jax.Array) -> jax.Array:
        """LCM multistep sampling (the exported LCMScheduler's), --validation_num_inference_steps."""
        steps = self.config.validation_num_inference_steps
        return diffusion.lcm_sample(self.sampling_schedule, model_fn, noise, steps, rng)


def _append(x: jax.Array, ndim: int) -> jax.Array:
    return diffusion.append_dims(x, ndim)


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
