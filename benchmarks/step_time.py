"""Training step time of the same SD-, SDXL- or DDPM-shaped model in jaxdiff and in diffusers (torch), side by side.

    python benchmarks/step_time.py [--task text_to_image|sdxl|lcm|unconditional] [--[no-]cache_latents]
        [--steps 20] [--warmup 3] [--batch_size 4] [--resolution 256] [--lora_rank 4]

Builds, in a temporary folder, a randomly initialised diffusers-format SD pipeline (a ~35M-parameter SD-shaped
UNet, a small 4-level VAE, a small CLIP text encoder) and an imagefolder of generated 256 px images. Then it
times one optimizer step of text-to-image fine-tuning on that pipeline:

* jaxdiff: the Trainer's AOT-compiled step (VAE encode, CLIP, noise, UNet, MSE, AdamW with grad clipping);
* torch: the step of diffusers' train_text_to_image.py on the same pipeline folder and the same batch;
* torch_backend: jaxdiff's torch backend (``--backend torch``): its Trainer's real step (the text_to_image task's
  draws and loss, accumulation loop, clipping, AdamW, LR schedule) on the same pipeline folder and batch.

``--lora_rank N`` times LoRA training instead (rank N adapters on the UNet's attention projections, alpha = rank,
the base weights frozen): jaxdiff's ``--lora_rank``, against diffusers' train_text_to_image_lora.py
(train_text_to_image_lora_sdxl.py for SDXL) recipe with peft, ``unet.add_adapter(LoraConfig(...))``.

``--task lcm`` times LCM distillation of the SD-shaped pipeline (teacher x2, student forward and backward,
target network, its EMA update; l2, guidance scale drawn in [5, 15]): jaxdiff's ``--task lcm``, against the step of
diffusers' train_lcm_distill_sd_wds.py written out on the same pipeline and batch (its teacher called once on the
conditional and once on the unconditional text; jaxdiff batches the two).

``--task sdxl`` does the same for SDXL fine-tuning on an SDXL-shaped pipeline (a ~50M-parameter UNet without attention
at its first level, linear projections and ``text_time`` conditioning; two text encoders, the second with
projection; the SD VAE's shape with SDXL's scaling factor), the reference being diffusers'
train_text_to_image_sdxl.py. That script encodes the dataset before training, so by default the SDXL steps train
on cached latents and text states (jaxdiff's and torch_backend's ``--cache_latents``); ``--no-cache_latents`` encodes
every step, as train_text_to_image.py does (``--cache_latents`` gives it the SD case).

``--task unconditional`` times unconditional image generation: the butterflies tutorial's UNet2DModel
(``jaxdiff.objective.TUTORIAL_UNET``, ~114M parameters, written as a config.json and trained from its random
initialisation) on the pixels themselves, by default at train_unconditional.py's 64 px with a batch of 4 on CPU (16,
the script's, on GPU); DDPM schedule of 1000 linear-beta steps, epsilon MSE, AdamW (0.95, 0.999, weight decay 1e-6,
the script's) with grad clipping, no EMA. jaxdiff's ``--task unconditional --model_config_name_or_path``, against
the step of diffusers' train_unconditional.py written out on the same UNet config and batch.

Warmup steps run first for each; the timed steps alternate jaxdiff / torch / torch_backend so that load from other
processes on the machine falls on all alike. Prints the median ms/step, the ratio jaxdiff / torch (CPU target
<= 1.25; the median of the per-round ratios) and the ratio torch_backend / torch (the backend's overhead over
diffusers' reference loop).

On CPU, jaxdiff runs one XLA:CPU device per core (``--xla_force_host_platform_device_count``, set here before jax
is imported) and its default mesh puts them all on the data axis: the batch is split over the cores, as a TPU VM
splits it over its chips. ``XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/step_time.py``
times a single device instead.

``python benchmarks/step_time.py --tiny_run [--tiny_steps 1200] [--tiny_no_cache] [--tiny_jax_flag=...]`` times
whole runs instead, as a user starts them: ``python -m jaxdiff.train`` on both backends with the tiny pipeline and
hyperparameters of ``benchmarks/prompt_following.py``, and prints the wall-time ratio JAX / torch backend (target
<= 1.25) with each run's steady step time and time outside the loop. The JAX run picks its CPU devices itself
(``jaxdiff.cpu_devices``); ``XLA_FLAGS=--xla_force_host_platform_device_count=1`` and
``--tiny_jax_flag=--attention_implementation=xla`` reproduce the earlier defaults.

With a GPU visible to both JAX and torch (``--device-kind auto``), the UNet is SD 1.5's at 512 px (64x64
latents) in bf16, and the UNet model-FLOPs utilization is printed too (2.35 TFLOP per 512 px image per step).
"""

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One XLA:CPU device per core, set before jax is imported: jaxdiff's default mesh then runs one shard of the batch
# per core. XLA:CPU parallelizes a single device's ops poorly over two cores; torch's oneDNN kernels do it well
# (measured: VAE encode on 2 cores, 1 device 574 ms, 2 devices 309 ms, torch 415 ms). The flag only adds host CPU
# devices: on a GPU, jax's default devices (and so the mesh) stay the GPUs.
# --tiny_run's training processes get the user's XLA_FLAGS: jaxdiff chooses their CPU devices itself.
os.environ["STEP_TIME_USER_XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
    ).strip()

import numpy as np

from jaxdiff.demo import build_tiny_sd_pipeline, save_tiny_clip_tokenizer, shape_samples, write_imagefolder
from jaxdiff.objective import TUTORIAL_UNET

CPU_TARGET = 1.25
SD_TRAIN_TFLOP_PER_512PX_IMAGE = 2.35  # UNet forward + backward, one 512 px image (64x64 latents)
MAX_LENGTH = 77

# ~35M parameters, SD-shaped: two cross-attention levels and one plain one, 2 resnets per level, 64-dim heads as
# in SD 2.x and SDXL (diffusers reads an SD-style attention_head_dim as the number of heads).
CPU_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [128, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 384,
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 32,
}
# The UNet of runwayml/stable-diffusion-v1-5.
SD15_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# SDXL-shaped, ~50M parameters: no attention at the first level, then 1 and 2 transformer layers per block (SDXL: 1,
# 2, 10) with 64-dim heads and linear projections, cross-attention over both text encoders' states concatenated, and
# the text_time added conditioning (the 6 time ids, each embedded in addition_time_embed_dim, plus the second
# encoder's pooled projection).
CPU_SDXL_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2}
CPU_SDXL_TEXT_2 = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 256,
}
CPU_SDXL_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [128, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": CPU_SDXL_TEXT["hidden_size"] + CPU_SDXL_TEXT_2["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 64,
    "projection_class_embeddings_input_dim": 6 * 64 + CPU_SDXL_TEXT_2["projection_dim"],
    "norm_num_groups": 32,
}
# Four levels (8x downsampling, as SD's VAE) with small channels.
SMALL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}


# ---- the pipeline ---------------------------------------------------------------------------------------


def build_pipeline(folder: Path, task: str, resolution: int, gpu: bool) -> Path:
    """The benchmark's randomly initialised pipeline: SD-shaped (SD 1.5's UNet on a GPU) or SDXL-shaped; for
    unconditional, a folder with the tutorial UNet2DModel's config.json at ``resolution`` (trained from scratch)."""
    if task == "unconditional":
        folder.mkdir(parents=True)
        config = {"_class_name": "UNet2DModel", **TUTORIAL_UNET, "sample_size": resolution}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder
    if task == "sdxl":
        unet, vae, text = CPU_SDXL_UNET, {**SMALL_VAE, "scaling_factor": 0.13025}, CPU_SDXL_TEXT
    else:
        unet, vae = (SD15_UNET if gpu else CPU_UNET), SMALL_VAE
        width = unet["cross_attention_dim"]
        text = {
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "projection_dim": width,
            "num_hidden_layers": 4,
            "num_attention_heads": width // 64,
        }
    model = build_tiny_sd_pipeline(
        folder,
        unet={"sample_size": resolution // 8, **unet},
        vae={"sample_size": resolution, **vae},
        text=text,
        max_length=MAX_LENGTH,
    )
    return add_second_text_encoder(model, CPU_SDXL_TEXT_2) if task == "sdxl" else model


def add_second_text_encoder(model: Path, text: dict[str, Any]) -> Path:
    """Makes an SD pipeline folder an SDXL one: a second, random text encoder with projection (``text`` overrides
    the first one's config), its tokenizer (the tiny one, padding with "!" as SDXL's second) and the SDXL index."""
    from flax import nnx

    from jaxdiff.models.clip import CLIPTextModelWithProjection

    first = json.loads((model / "text_encoder" / "config.json").read_text())
    encoder = CLIPTextModelWithProjection.from_config({**first, **text}, rngs=nnx.Rngs(1))
    encoder.save_pretrained(model / "text_encoder_2")
    save_tiny_clip_tokenizer(model / "tokenizer_2", MAX_LENGTH, pad_token="!")
    index = json.loads((model / "model_index.json").read_text())
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key)
    index |= {
        "_class_name": "StableDiffusionXLPipeline",
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "force_zeros_for_empty_prompt": True,
    }
    (model / "model_index.json").write_text(json.dumps(index, indent=2))
    return model


# ---- jaxdiff ----------------------------------------------------------------------------------------------


def jaxdiff_step(model: Path, data: Path, out: Path, args: argparse.Namespace, gpu: bool):
    """(run one step and wait for it, the host batch, the config, the mesh) with jaxdiff's Trainer, compiled once."""
    import jax

    from jaxdiff import cli
    from jaxdiff.trainer import Trainer

    unconditional = args.task == "unconditional"  # a UNet2DModel config, no VAE, no latents to cache
    config = cli.resolve(
        cli.validate(
            {
                ("model_config_name_or_path" if unconditional else "pretrained_model_name_or_path"): str(model),
                "task": args.task,
                **({"lora_rank": args.lora_rank} if args.lora_rank else {}),
                **({} if unconditional else {"cache_latents": args.cache_latents}),
                "train_data_dir": str(data),
                "output_dir": str(out),
                "resolution": args.resolution,
                "center_crop": True,
                "global_batch_size": args.batch_size,
                "mesh": args.mesh,
                "mixed_precision": "bf16" if gpu else "no",
                "attention_implementation": args.attention,
                "report_to": "none",
                "seed": 0,
                "max_train_steps": 1000,
                "dataloader_num_workers": 0,
            }
        )
    )
    trainer = Trainer(config)
    host_batch = next(trainer.data)
    batch = trainer.global_batch(host_batch)
    start = time.perf_counter()
    compiled = trainer.compile_step(batch)
    print(f"jaxdiff: step compiled in {time.perf_counter() - start:.1f} s")
    holder = {"state": trainer.state}

    def step() -> dict:
        holder["state"], metrics = compiled(holder["state"], trainer.frozen, batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    mesh = "x".join(str(n) for n in trainer.mesh.devices.shape)
    return step, host_batch, config, f"{mesh} over {trainer.mesh.devices.size} {jax.devices()[0].platform} devices"


# ---- diffusers torch --------------------------------------------------------------------------------------


def torch_step(model: Path, host_batch: dict, config, gpu: bool):
    """One optimizer step of diffusers' train_text_to_image.py (SD) or train_text_to_image_sdxl.py (SDXL) on the
    same pipeline and batch; with --lora_rank of their _lora variants (peft adapters on the frozen UNet); for
    unconditional, of train_unconditional.py (a UNet2DModel from the config, denoising the images themselves)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    if config.task == "unconditional":  # the script's DDPMScheduler(--ddpm_num_steps, --ddpm_beta_schedule)
        scheduler = DDPMScheduler(num_train_timesteps=config.ddpm_num_steps, beta_schedule=config.ddpm_beta_schedule)
        unet = UNet2DModel.from_config(UNet2DModel.load_config(model)).to(device)
    else:
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    # Mixed precision as accelerate does it: frozen models in bf16, the UNet in fp32 under autocast.
    weight_dtype = torch.bfloat16 if gpu else torch.float32
    if config.lora_rank:  # the LoRA scripts: frozen UNet in the weight dtype, float32 adapters
        from peft import LoraConfig

        unet.requires_grad_(False).to(dtype=weight_dtype) if gpu else unet.requires_grad_(False)
        rank = config.lora_rank
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, inputs, autocast = reference_setup(model, host_batch, config, params, device, weight_dtype)

    def step() -> float:
        with torch.no_grad():
            latents, conditioning = inputs()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            model_pred = unet(noisy_latents, timesteps, **conditioning, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.item()  # the training scripts log loss.detach().item() every step
        if gpu:
            torch.cuda.synchronize()
        return value

    return step, sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in params)


def torch_lcm_step(model: Path, host_batch: dict, config, gpu: bool):
    """One optimizer step of diffusers' train_lcm_distill_sd_wds.py on the same pipeline and batch: the student (the
    teacher's UNet with a guidance embedding) trains; the frozen teacher (in the weight dtype) is called on the
    conditional and on the unconditional text ("", encoded once), one DDIM solver step, the target network (an EMA
    copy of the student) at the grid point below; l2 loss; the target's EMA update."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    weight_dtype = torch.bfloat16 if gpu else torch.float32
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    teacher = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False)
    dim = config.unet_time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.to(device).train()
    target = copy.deepcopy(student).requires_grad_(False)
    teacher.to(device, weight_dtype)
    params = list(student.parameters())
    optimizer, inputs, autocast = reference_setup(model, host_batch, config, params, device, weight_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    rows = len(host_batch["input_ids"])
    empty = tokenizer([""] * rows, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device, weight_dtype)
    with torch.no_grad():
        uncond = encoder(empty.input_ids.to(device), return_dict=False)[0]
    alphas = scheduler.alphas_cumprod.to(device)
    ratio = scheduler.config.num_train_timesteps // config.num_ddim_timesteps
    grid = torch.arange(1, config.num_ddim_timesteps + 1, device=device) * ratio - 1
    alphas_prev = torch.cat([alphas[:1], alphas[grid[:-1]]])
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=device) * -(np.log(10000.0) / (half - 1)))

    def column(values: Any) -> Any:
        return values.reshape(-1, 1, 1, 1)

    def consistency(output: Any, x: Any, t: Any) -> Any:
        alpha_bar, scaled = column(alphas[t]), column(config.timestep_scaling_factor * t.float())
        x0 = (x - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
        return 0.25 / (scaled**2 + 0.25) * x + scaled / (scaled**2 + 0.25).sqrt() * x0

    def step() -> float:
        with torch.no_grad():
            latents, conditioning = inputs()
        noise = torch.randn_like(latents)
        index = torch.randint(0, config.num_ddim_timesteps, (rows,), device=device)
        start = grid[index]
        t = (start - ratio).clamp(min=0)
        noisy = scheduler.add_noise(latents, noise, start)
        w = (config.w_max - config.w_min) * torch.rand(rows, device=device) + config.w_min
        args = 1000.0 * w[:, None] * freqs[None]
        guidance = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        with autocast:
            output = student(noisy, start, timestep_cond=guidance, **conditioning, return_dict=False)[0]
        prediction = consistency(output.float(), noisy, start)
        with torch.no_grad():
            with autocast:
                cond = teacher(noisy, start, **conditioning, return_dict=False)[0].float()
                free = teacher(noisy, start, encoder_hidden_states=uncond, return_dict=False)[0].float()
            alpha_bar = column(alphas[start])
            x0_c, x0_u = ((noisy - (1 - alpha_bar).sqrt() * e) / alpha_bar.sqrt() for e in (cond, free))
            x0 = x0_c + column(w) * (x0_c - x0_u)
            eps = cond + column(w) * (cond - free)
            alpha_prev = column(alphas_prev[index])
            x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
            with autocast:
                target_output = target(x_prev, t, timestep_cond=guidance, **conditioning, return_dict=False)[0]
            target_value = consistency(target_output.float(), x_prev, t)
        loss = F.mse_loss(prediction, target_value, reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # the script's update_ema(target_unet.parameters(), unet.parameters(), ema_decay)
            for ema, param in zip(target.parameters(), student.parameters(), strict=True):
                ema.mul_(0.95).add_(param, alpha=0.05)
        value = loss.item()
        if gpu:
            torch.cuda.synchronize()
        return value

    return step, sum(p.numel() for p in student.parameters()), sum(p.numel() for p in params)


def reference_setup(model: Path, host_batch: dict, config, params: list, device, weight_dtype) -> tuple:
    """(AdamW over ``params`` with the config's hyperparameters, `reference_inputs` of the batch on ``device``, the
    UNet's autocast context (bf16 on GPU)) for a diffusers reference step."""
    import torch

    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    batch = {k: torch.from_numpy(v).to(device) for k, v in torch_arrays(host_batch).items()}
    inputs = reference_inputs(model, batch, config, device, weight_dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    return optimizer, inputs, autocast


def torch_arrays(host_batch: dict) -> dict[str, np.ndarray]:
    """The host batch as arrays torch reads: floating point ones (bf16 cached text states too) as float32."""
    arrays = {k: np.asarray(v) for k, v in host_batch.items()}
    return {k: v.astype(np.float32) if v.dtype.kind in "fV" else v for k, v in arrays.items()}


def reference_inputs(model: Path, batch: dict, config, device, weight_dtype) -> Callable[[], tuple[Any, dict]]:
    """A function giving (scaled latents, the UNet's conditioning keywords) as the diffusers scripts compute them.

    Encoded each call by the frozen VAE and text encoder(s) (train_text_to_image.py), or, for a --cache_latents
    batch, one latent draw and the cached text states, made once (train_text_to_image_sdxl.py encodes the dataset
    before training). SDXL: each encoder's penultimate hidden state, concatenated, the second one's projected pooled
    state, and per-step time ids (original h, w, crop top, left, target h, w) as the script's compute_time_ids.
    Unconditional: the images themselves and no conditioning (train_unconditional.py's clean_images).
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if config.task == "unconditional":
        images = batch["pixel_values"].to(weight_dtype)
        return lambda: (images, {})
    sdxl = config.task == "sdxl"
    scaling_factor = AutoencoderKL.load_config(model, subfolder="vae")["scaling_factor"]

    def added_conditioning(pooled: Any) -> dict:
        if not sdxl:
            return {}
        target = torch.tensor([config.resolution] * 2, device=device).expand(len(pooled), 2)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).to(weight_dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    if "latent_mean" in batch:
        std = torch.exp(0.5 * batch["latent_logvar"])
        latents = (batch["latent_mean"] + std * torch.randn_like(std)) * scaling_factor
        states, pooled = batch["encoder_hidden_states"].to(weight_dtype), batch.get("text_embeds")
        pooled = None if pooled is None else pooled.to(weight_dtype)
        return lambda: (latents, {"encoder_hidden_states": states, **added_conditioning(pooled)})

    # The SDXL script keeps its VAE in float32; train_text_to_image.py casts it with the other frozen models.
    vae_dtype = torch.float32 if sdxl else weight_dtype
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device, vae_dtype)
    classes = {"text_encoder": CLIPTextModel, **({"text_encoder_2": CLIPTextModelWithProjection} if sdxl else {})}
    encoders = [cls.from_pretrained(model, subfolder=name).to(device, weight_dtype) for name, cls in classes.items()]
    ids = [batch[key].long() for key in ("input_ids", "input_ids_2")[: len(encoders)]]
    pixel_values = batch["pixel_values"].to(vae_dtype)

    def inputs() -> tuple[Any, dict]:
        latents = vae.encode(pixel_values).latent_dist.sample() * scaling_factor
        if not sdxl:
            return latents, {"encoder_hidden_states": encoders[0](ids[0], return_dict=False)[0]}
        states = []
        for encoder, token_ids in zip(encoders, ids, strict=True):  # the SDXL script's encode_prompt
            output = encoder(token_ids, output_hidden_states=True, return_dict=False)
            pooled = output[0]
            states.append(output[-1][-2])
        return latents, {"encoder_hidden_states": torch.cat(states, dim=-1), **added_conditioning(pooled)}

    return inputs


# ---- jaxdiff's torch backend -------------------------------------------------------------------------------


def torch_backend_step(host_batch: dict, config, out: Path):
    """One optimizer step of torch_backend's Trainer (the loop's own train_step) on the same pipeline and batch."""
    import torch

    from jaxdiff import cli
    from torch_backend.trainer import Trainer, to_tensors

    values = {**config.model_dump(mode="json"), "backend": "torch", "output_dir": str(out)}
    trainer = Trainer(cli.validate(values))
    device = trainer.accelerator.device
    batch = to_tensors(torch_arrays(host_batch), device)
    rows = len(next(iter(batch.values())))
    generator = torch.Generator(device).manual_seed(0)

    def step() -> float:
        metrics = trainer.train_step(batch, trainer.task.draw(generator, rows))
        return metrics["loss"].item()  # one sync per step, as the reference

    return step


# ---- the benchmark ----------------------------------------------------------------------------------------


def detect_gpu(kind: str) -> bool:
    if kind == "cpu":
        return False
    import jax
    import torch

    found = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    if kind == "gpu" and not found:
        raise SystemExit("--device-kind gpu: JAX and torch do not both see a GPU")
    return found


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tiny_runs(args: argparse.Namespace) -> None:
    """Whole runs of prompt_following.py's tiny config as a user starts them (`python -m jaxdiff.train`), on both
    backends, alternating: wall time, steady step time from metrics.jsonl, and the time outside the loop (start-up,
    model loading, latent cache, compile, export)."""
    import prompt_following

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data, _, _ = prompt_following.build_data(root)
        hyper = argparse.Namespace(
            batch_size=16, steps=args.tiny_steps, learning_rate=1e-3, proportion_empty_prompts=0
        )
        env = {**os.environ, "XLA_FLAGS": os.environ["STEP_TIME_USER_XLA_FLAGS"]}
        extra = {"torch": [], "jax": list(args.tiny_jax_flag)}
        results: dict[str, list[tuple[float, float]]] = {"torch": [], "jax": []}
        for round_index in range(args.tiny_rounds):
            for backend in ("torch", "jax"):
                out = root / f"{backend}-{round_index}" / "pipeline"
                out.parent.mkdir()
                flags = [*extra[backend], *([] if args.tiny_no_cache else ["--cache_latents"])]
                start = time.perf_counter()
                prompt_following.train_jaxdiff(backend, model, data, out, 0, hyper, extra_flags=flags, env=env)
                wall = time.perf_counter() - start
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                step_s = statistics.median(row["step_time_s"] for row in rows[len(rows) // 4 :])
                results[backend].append((wall, step_s))
                print(f"{backend:<6} run {round_index}: {wall:.1f} s wall, {1000 * step_s:.1f} ms/step", flush=True)
    print(f"\n{args.tiny_steps} steps, batch 16, 32 px, {'no ' if args.tiny_no_cache else ''}latent cache")
    for backend, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        step = statistics.median(s for _, s in runs)
        print(
            f"{backend:<6} wall {wall:7.1f} s   steady {1000 * step:6.1f} ms/step   outside the loop "
            f"{wall - args.tiny_steps * step:5.1f} s"
        )
    ratio = statistics.median(j[0] / t[0] for j, t in zip(results["jax"], results["torch"], strict=True))
    verdict = "meets" if ratio <= CPU_TARGET else "misses"
    print(f"wall-time ratio jax / torch backend: {ratio:.3f} (target <= {CPU_TARGET}: {verdict} it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task",
        choices=("text_to_image", "sdxl", "lcm", "unconditional"),
        default="text_to_image",
        help="The pipeline and its objective (lcm: LCM distillation of the SD-shaped pipeline; unconditional: the "
        "tutorial UNet2DModel on the pixels, train_unconditional.py).",
    )
    parser.add_argument(
        "--cache_latents",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Train on cached latents and text states. Default: as the diffusers script does, off for text_to_image "
        "(train_text_to_image.py encodes every step), on for sdxl (train_text_to_image_sdxl.py encodes the "
        "dataset before training).",
    )
    parser.add_argument(
        "--lora_rank", type=int, default=None, help="Time LoRA training of this rank (default: full fine-tuning)."
    )
    parser.add_argument("--steps", type=int, default=20, help="Timed steps (rounds) of each framework.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps of each framework first.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: 4 on CPU, 16 on GPU.")
    parser.add_argument(
        "--resolution", type=int, default=None, help="Default: 256 on CPU, 512 on GPU; unconditional: 64."
    )
    parser.add_argument("--device-kind", dest="device_kind", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="Device peak (dense bf16) for MFU.")
    parser.add_argument("--images", type=int, default=16, help="Images in the generated imagefolder.")
    parser.add_argument(
        "--attention",
        choices=("auto", "xla", "cudnn", "chunked", "splash"),
        default=None,
        help="jaxdiff's attention_implementation. Default: chunked on CPU (XLA:CPU has no fused attention "
        "kernel), xla on GPU (cudnn: its fused kernel, XLA's for layers it cannot run; auto: the trainer's choice).",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="jaxdiff's --mesh. Default: every device on the data axis (on CPU, one device per core).",
    )
    parser.add_argument(
        "--tiny_run",
        action="store_true",
        help="Instead: time whole training runs of benchmarks/prompt_following.py's tiny pipeline, both backends.",
    )
    parser.add_argument("--tiny_steps", type=int, default=1200, help="--tiny_run: optimizer steps per run.")
    parser.add_argument("--tiny_rounds", type=int, default=1, help="--tiny_run: runs per backend, alternating.")
    parser.add_argument("--tiny_no_cache", action="store_true", help="--tiny_run: encode with the VAE every step.")
    parser.add_argument(
        "--tiny_jax_flag", action="append", default=[], help="--tiny_run: extra flag of the JAX run (repeatable)."
    )
    args = parser.parse_args()
    if args.task == "unconditional" and (args.cache_latents or args.lora_rank):
        parser.error("--task unconditional trains the whole UNet on the pixels: no --cache_latents, no --lora_rank")
    logging.basicConfig(level=logging.WARNING)
    if args.tiny_run:
        tiny_runs(args)
        return

    gpu = detect_gpu(args.device_kind)
    args.batch_size = args.batch_size or (16 if gpu else 4)
    args.resolution = args.resolution or (64 if args.task == "unconditional" else 512 if gpu else 256)
    args.attention = args.attention or ("xla" if gpu else "chunked")
    if args.cache_latents is None:
        args.cache_latents = args.task == "sdxl"

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model = build_pipeline(root / args.task, args.task, args.resolution, gpu)
        size = (args.resolution, args.resolution)
        data = write_imagefolder(root / "images", shape_samples(args.images, size=size), "jsonl")
        print(f"built pipeline and {args.images} images in {time.perf_counter() - start:.1f} s")

        jax_fn, host_batch, config, mesh = jaxdiff_step(model, data, root / "out", args, gpu)
        reference = torch_lcm_step if args.task == "lcm" else torch_step
        torch_fn, params, trained = reference(model, host_batch, config, gpu)
        backend_fn = torch_backend_step(host_batch, config, root / "out_torch")
        print(f"UNet parameters: {params:,} ({trained:,} trained)")
        print(
            f"warmup: {args.warmup} steps each; timing {args.steps} steps each, alternating jaxdiff / torch / "
            "torch_backend"
        )
        for _ in range(args.warmup):
            jax_fn()
            torch_fn()
            backend_fn()
        jax_times, torch_times, backend_times = [], [], []
        for _ in range(args.steps):
            jax_times.append(timed(jax_fn))
            torch_times.append(timed(torch_fn))
            backend_times.append(timed(backend_fn))

    def spread(times: list[float]) -> str:
        return f"{1000 * statistics.median(times):.1f}  [min {1000 * min(times):.1f}, max {1000 * max(times):.1f}]"

    jax_ms = 1000 * statistics.median(jax_times)
    torch_ms = 1000 * statistics.median(torch_times)
    backend_ms = 1000 * statistics.median(backend_times)
    # Each round times jaxdiff, torch and torch_backend back to back; the median of the per-round ratios is less
    # moved by load from other processes that comes and goes than the ratio of the medians (also printed).
    ratio = statistics.median(j / t for j, t in zip(jax_times, torch_times, strict=True))
    backend_ratio = statistics.median(b / t for b, t in zip(backend_times, torch_times, strict=True))
    device = "GPU, bf16" if gpu else f"CPU ({os.cpu_count()} cores), float32"
    device += f"; jaxdiff attention: {args.attention}, mesh: {mesh}"
    encoded = "cached latents and text states" if args.cache_latents else "VAE and text encoder(s) every step"
    if args.task == "unconditional":
        encoded = "the pixels; no VAE, no text encoder"
    rows = [
        ("device", device),
        ("task", f"{args.task}{f' LoRA rank {args.lora_rank}' if args.lora_rank else ''} ({encoded})"),
        ("UNet parameters", f"{params:,} ({trained:,} trained)"),
        ("batch", f"{args.batch_size} x 3 x {args.resolution} x {args.resolution}"),
        ("jaxdiff ms/step (median)", spread(jax_times)),
        ("torch ms/step (median)", spread(torch_times)),
        ("torch_backend ms/step (median)", spread(backend_times)),
        ("ratio jaxdiff / torch", f"{ratio:.3f}  (of the medians: {jax_ms / torch_ms:.3f})"),
        ("ratio torch_backend / torch", f"{backend_ratio:.3f}  (of the medians: {backend_ms / torch_ms:.3f})"),
    ]
    if not gpu:
        verdict = "meets" if ratio <= CPU_TARGET else "misses"
        rows.append(("CPU target", f"ratio <= {CPU_TARGET} ({verdict} it)"))
    elif args.task == "text_to_image" and not args.lora_rank:  # the FLOP count: SD 1.5 UNet full fine-tuning
        flop = SD_TRAIN_TFLOP_PER_512PX_IMAGE * 1e12 * args.batch_size * (args.resolution / 512) ** 2
        for name, ms in (("jaxdiff", jax_ms), ("torch", torch_ms), ("torch_backend", backend_ms)):
            mfu = flop / (ms / 1000) / (args.peak_tflops * 1e12)
            rows.append((f"{name} UNet MFU", f"{100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s"))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
