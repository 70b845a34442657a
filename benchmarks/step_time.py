"""Training step time of the same SD-shaped model in jaxdiff and in diffusers (torch), side by side in one run.

    python benchmarks/step_time.py [--steps 20] [--warmup 3] [--batch_size 4] [--resolution 256]

Builds, in a temporary folder, a randomly initialised diffusers-format SD pipeline (a ~35M-parameter SD-shaped
UNet, a small 4-level VAE, a small CLIP text encoder) and an imagefolder of generated 256 px images. Then it
times one optimizer step of text-to-image fine-tuning on that pipeline:

* jaxdiff: the Trainer's AOT-compiled step (VAE encode, CLIP, noise, UNet, MSE, AdamW with grad clipping);
* torch: the step of diffusers' train_text_to_image.py on the same pipeline folder and the same batch;
* torch_backend: jaxdiff's torch backend (``--backend torch``): its Trainer's real step (the text_to_image task's
  draws and loss, accumulation loop, clipping, AdamW, LR schedule) on the same pipeline folder and batch.

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
from pathlib import Path

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

from jaxdiff.demo import build_tiny_sd_pipeline, shape_samples, write_imagefolder

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


# ---- jaxdiff ----------------------------------------------------------------------------------------------


def jaxdiff_step(model: Path, data: Path, out: Path, args: argparse.Namespace, gpu: bool):
    """(run one step and wait for it, the host batch, the config, the mesh) with jaxdiff's Trainer, compiled once."""
    import jax

    from jaxdiff import cli
    from jaxdiff.trainer import Trainer

    config = cli.resolve(
        cli.validate(
            {
                "pretrained_model_name_or_path": str(model),
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
    """One optimizer step of diffusers' train_text_to_image.py on the same pipeline and batch."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if gpu:  # mixed precision as accelerate does it: frozen models in bf16, the UNet in fp32 under autocast
        vae.to(dtype=torch.bfloat16)
        text_encoder.to(dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    weight_dtype = torch.bfloat16 if gpu else torch.float32
    pixel_values = torch.from_numpy(np.asarray(host_batch["pixel_values"])).to(device, weight_dtype)
    input_ids = torch.from_numpy(np.asarray(host_batch["input_ids"]).astype(np.int64)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def step() -> float:
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.item()  # the training script logs loss.detach().item() every step
        if gpu:
            torch.cuda.synchronize()
        return value

    return step, sum(p.numel() for p in unet.parameters())


# ---- jaxdiff's torch backend -------------------------------------------------------------------------------


def torch_backend_step(host_batch: dict, config, out: Path):
    """One optimizer step of torch_backend's Trainer (the loop's own train_step) on the same pipeline and batch."""
    import torch

    from jaxdiff import cli
    from torch_backend.trainer import Trainer, to_tensors

    values = {**config.model_dump(mode="json"), "backend": "torch", "output_dir": str(out)}
    trainer = Trainer(cli.validate(values))
    device = trainer.accelerator.device
    batch = to_tensors({k: np.asarray(v) for k, v in host_batch.items()}, device)
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
    parser.add_argument("--steps", type=int, default=20, help="Timed steps (rounds) of each framework.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps of each framework first.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: 4 on CPU, 16 on GPU.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 256 on CPU, 512 on GPU.")
    parser.add_argument("--device-kind", dest="device_kind", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="Device peak (dense bf16) for MFU.")
    parser.add_argument("--images", type=int, default=16, help="Images in the generated imagefolder.")
    parser.add_argument(
        "--attention",
        choices=("xla", "cudnn", "chunked"),
        default=None,
        help="jaxdiff's attention_implementation. Default: chunked on CPU (XLA:CPU has no fused attention "
        "kernel), xla on GPU (cudnn's fused kernel is worth a run too; it requires head dims it supports).",
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
    logging.basicConfig(level=logging.WARNING)
    if args.tiny_run:
        tiny_runs(args)
        return

    gpu = detect_gpu(args.device_kind)
    args.batch_size = args.batch_size or (16 if gpu else 4)
    args.resolution = args.resolution or (512 if gpu else 256)
    args.attention = args.attention or ("xla" if gpu else "chunked")
    unet_config = SD15_UNET if gpu else CPU_UNET

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        width = unet_config["cross_attention_dim"]
        model = build_tiny_sd_pipeline(
            root / "sd",
            unet={"sample_size": args.resolution // 8, **unet_config},
            vae={"sample_size": args.resolution, **SMALL_VAE},
            text={
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "projection_dim": width,
                "num_hidden_layers": 4,
                "num_attention_heads": width // 64,
            },
            max_length=MAX_LENGTH,
        )
        size = (args.resolution, args.resolution)
        data = write_imagefolder(root / "images", shape_samples(args.images, size=size), "jsonl")
        print(f"built pipeline and {args.images} images in {time.perf_counter() - start:.1f} s")

        jax_fn, host_batch, config, mesh = jaxdiff_step(model, data, root / "out", args, gpu)
        torch_fn, params = torch_step(model, host_batch, config, gpu)
        backend_fn = torch_backend_step(host_batch, config, root / "out_torch")
        print(f"UNet parameters: {params:,}")
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
    rows = [
        ("device", device),
        ("UNet parameters", f"{params:,}"),
        ("batch", f"{args.batch_size} x 3 x {args.resolution} x {args.resolution}"),
        ("jaxdiff ms/step (median)", spread(jax_times)),
        ("torch ms/step (median)", spread(torch_times)),
        ("torch_backend ms/step (median)", spread(backend_times)),
        ("ratio jaxdiff / torch", f"{ratio:.3f}  (of the medians: {jax_ms / torch_ms:.3f})"),
        ("ratio torch_backend / torch", f"{backend_ratio:.3f}  (of the medians: {backend_ms / torch_ms:.3f})"),
    ]
    if gpu:
        flop = SD_TRAIN_TFLOP_PER_512PX_IMAGE * 1e12 * args.batch_size * (args.resolution / 512) ** 2
        for name, ms in (("jaxdiff", jax_ms), ("torch", torch_ms), ("torch_backend", backend_ms)):
            mfu = flop / (ms / 1000) / (args.peak_tflops * 1e12)
            rows.append((f"{name} UNet MFU", f"{100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s"))
    else:
        verdict = "meets" if ratio <= CPU_TARGET else "misses"
        rows.append(("CPU target", f"ratio <= {CPU_TARGET} ({verdict} it)"))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
