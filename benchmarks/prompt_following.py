"""How well text-to-image training follows prompts: diffusers' reference loop vs jaxdiff's torch and JAX backends.

    python benchmarks/prompt_following.py [--seeds 0 1 2] [--steps 1000] [--batch_size 16] [--learning_rate 1e-3]
        [--trainers diffusers torch jax] [--num_samples 16] [--guidance_scale 3.0] [--num_inference_steps 25]
        [--proportion_empty_prompts 0.0] [--workdir DIR] [--keep]

Builds, once, an imagefolder of 64 images of 32x32 px, each one red or blue circle or square on white, captioned
"a {colour} {shape}", and the tiny SD pipeline of jaxdiff.demo with its VAE fitted to those images. Then, per seed,
fine-tunes the UNet with each trainer under the same hyperparameters (constant LR, AdamW, grad clipping, float32,
no EMA, flip + center crop, epsilon prediction):

* diffusers: the loop of diffusers' examples/text_to_image/train_text_to_image.py, written out here;
* torch / jax: ``python -m jaxdiff.train --backend torch|jax`` in a subprocess, with cached latents.

Each run's pipeline folder is measured the same way:

* colour and shape accuracy: images sampled with DDIM and classifier-free guidance for the four prompts, classified
  by the pixel rules below (checked first on the training images, where they must be exact);
* caption-swap loss gap: the relative rise of the UNet's epsilon MSE on fixed draws (the 64 training latents x 8
  timesteps x fixed noise) when the caption's colour (or shape) word is swapped. It needs no sampling, so it is far
  less noisy than the accuracies; higher means the model uses the caption more.

Prints one line per run, mean and sd over seeds per trainer, and whether each jaxdiff backend's mean colour
accuracy and colour gap lie within one sd of the diffusers loop's. Writes results.json and one sample grid per run
(prompts as rows) to the workdir. At the defaults it runs about 50 minutes on 2 quiet CPU cores.
"""

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import load_dataset
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from jaxdiff.demo import (
    PROMPT_COLOURS,
    PROMPT_SHAPES,
    build_tiny_sd_pipeline,
    png_bytes,
    prompt_images,
    write_imagefolder,
)

RESOLUTION = 32
NUM_IMAGES = 64
PROMPTS = tuple(f"a {colour} {shape}" for colour in PROMPT_COLOURS for shape in PROMPT_SHAPES)
SWAPS = {"colour": {"red": "blue", "blue": "red"}, "shape": {"circle": "square", "square": "circle"}}
SAMPLE_SEED = 1000  # prompt i samples with torch.Generator().manual_seed(SAMPLE_SEED + i), in every run
GAP_SEED = 2000
GAP_TIMESTEPS = 8
FOREGROUND_BELOW = 0.5  # a pixel whose darkest channel is below this is not background (white is 0.96)
MIN_FOREGROUND = 20  # pixels; the training shapes have 221 (circle) or 289 (square) of 1024
MAX_FOREGROUND = 0.5  # share of the image; more is noise, not a shape
SQUARE_FILL = (1 + math.pi / 4) / 2  # bounding-box fill between a disc's (pi/4) and a square's (1)
TRAINERS = ("diffusers", "torch", "jax")
MEASURES = ("colour_acc", "shape_acc", "colour_gap", "shape_gap", "train_seconds", "final_loss")


def foreground(image: np.ndarray) -> np.ndarray | None:
    """The mask of pixels clearly away from the white background in an HWC image in [0, 1]; None if almost none,
    or if it covers most of the image (noise, which would otherwise be classified right half the time)."""
    mask = image.min(axis=-1) < FOREGROUND_BELOW
    return mask if MIN_FOREGROUND <= mask.sum() <= MAX_FOREGROUND * mask.size else None


def colour_of(image: np.ndarray) -> str | None:
    """'red' or 'blue': the sign of mean(R - B) over the foreground; None without a foreground."""
    mask = foreground(image)
    if mask is None:
        return None
    return "red" if (image[..., 0] - image[..., 2])[mask].mean() > 0 else "blue"


def shape_of(image: np.ndarray) -> str | None:
    """'square' or 'circle': how much of its bounding box the foreground fills (1 vs pi/4); None without one."""
    mask = foreground(image)
    if mask is None:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return "square" if mask.sum() / box >= SQUARE_FILL else "circle"


def accuracy(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Share of images whose classified colour / shape is the caption's ("a {colour} {shape}")."""
    words = [caption.split() for caption in captions]
    return {
        "colour_acc": float(np.mean([colour_of(im) == w[1] for im, w in zip(images, words, strict=True)])),
        "shape_acc": float(np.mean([shape_of(im) == w[2] for im, w in zip(images, words, strict=True)])),
    }


def pixel_values(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """diffusers' train transforms without torchvision: bilinear resize of the shorter side, center crop,
    optional horizontal flip, CHW in [-1, 1]."""
    image = image.convert("RGB")
    scale = RESOLUTION / min(image.size)
    image = image.resize([max(RESOLUTION, round(s * scale)) for s in image.size], Image.Resampling.BILINEAR)
    left, top = round((image.width - RESOLUTION) / 2), round((image.height - RESOLUTION) / 2)
    image = image.crop((left, top, left + RESOLUTION, top + RESOLUTION))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


@torch.no_grad()
def reconstruction_accuracy(model: Path, images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """Classifier accuracy on the pipeline VAE's reconstructions (latent mean, decoded) of the training images: the
    most that sampling can reach, as every sample is decoded by that VAE."""
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    pixels = torch.stack([pixel_values(image) for image in images])
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean, return_dict=False)[0]
    return accuracy(list((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()), captions)


def build_data(workdir: Path) -> tuple[Path, Path, list[Image.Image], list[str]]:
    """(model folder, imagefolder, images, captions): the demo's shapes data and tiny pipeline, built if missing."""
    samples = prompt_images(NUM_IMAGES)
    images, captions = [image for image, _ in samples], [caption for _, caption in samples]
    data, model = workdir / "data", workdir / "tiny-sd"
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(data, [(png_bytes(image), caption) for image, caption in samples], "jsonl")
    if not (model / "model_index.json").is_file():
        build_tiny_sd_pipeline(model, vae_train_images=images)
    return model, data, images, captions


def train_diffusers(model: Path, data: Path, out: Path, seed: int, args: argparse.Namespace) -> float:
    """Fine-tunes the UNet as diffusers' train_text_to_image.py does (one process, float32) and saves the pipeline
    to ``out``; returns the mean loss of the last 100 steps."""
    torch.manual_seed(seed)
    random.seed(seed)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )

    def preprocess_train(examples: dict) -> dict:
        # Caption dropout as diffusers' SDXL script does it; flips as torchvision's RandomHorizontalFlip draws them.
        captions = ["" if random.random() < args.proportion_empty_prompts else c for c in examples["text"]]
        examples["pixel_values"] = [pixel_values(im, flip=bool(torch.rand(1) < 0.5)) for im in examples["image"]]
        examples["input_ids"] = tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        return examples

    def collate_fn(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    dataset = load_dataset("imagefolder", data_dir=str(data))["train"].with_transform(preprocess_train)
    loader = torch.utils.data.DataLoader(
        dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    losses: list[float] = []
    while len(losses) < args.steps:
        for batch in loader:
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) >= args.steps:
                break
    pipeline = StableDiffusionPipeline.from_pretrained(
        model, text_encoder=text_encoder, vae=vae, unet=unet, safety_checker=None
    )
    pipeline.save_pretrained(out)
    return statistics.fmean(losses[-100:])


def train_jaxdiff(
    backend: str,
    model: Path,
    data: Path,
    out: Path,
    seed: int,
    args: argparse.Namespace,
    *,
    extra_flags: Sequence[str] = ("--cache_latents",),
    env: dict[str, str] | None = None,
) -> float:
    """Trains with ``python -m jaxdiff.train --backend {backend}`` (plus ``extra_flags``, in ``env``) into ``out``
    (log: ``out``/../train.log); returns the mean loss of the last 100 steps from its metrics.jsonl. Exits with the
    log's tail if training fails."""
    flags = {
        "backend": backend,
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": RESOLUTION,
        "image_interpolation_mode": "bilinear",
        "train_batch_size": args.batch_size,
        "max_train_steps": args.steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",
        "prediction_type": "epsilon",
        "proportion_empty_prompts": args.proportion_empty_prompts,
        "seed": seed,
        "checkpointing_steps": args.steps + 1,
        "logging_steps": 100,
        "report_to": "none",
    }
    command = [sys.executable, "-m", "jaxdiff.train", "--center_crop", "--random_flip", *extra_flags]
    command += [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    log = out.parent / "train.log"
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"{backend} training failed with exit code {code}; full log: {log}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.fmean(row["loss"] for row in rows[-100:])


def sample_run(folder: Path, args: argparse.Namespace) -> list[list[np.ndarray]]:
    """``num_samples`` HWC images in [0, 1] per prompt of PROMPTS, DDIM with guidance, from fixed generators."""
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return [
        list(
            pipeline(
                prompt,
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                num_images_per_prompt=args.num_samples,
                generator=torch.Generator().manual_seed(SAMPLE_SEED + i),
                output_type="np",
            ).images
        )
        for i, prompt in enumerate(PROMPTS)
    ]


@torch.no_grad()
def caption_swap_gap(folder: Path, images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """Mean of (mse_swapped - mse_true) / mse_true of the UNet's epsilon prediction, over the same draws in every
    run (each image's VAE latent mean x GAP_TIMESTEPS timesteps x fixed noise), with the colour word (colour_gap)
    or the shape word (shape_gap) of the true caption swapped."""
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids, return_dict=False)[0]

    variants = {"true": captions}
    for name, swap in SWAPS.items():
        variants[name] = [" ".join(swap.get(word, word) for word in c.split()) for c in captions]
    states = {name: encode(texts) for name, texts in variants.items()}
    pixels = torch.stack([pixel_values(image) for image in images])
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn((GAP_TIMESTEPS, *latents.shape), generator=torch.Generator().manual_seed(GAP_SEED))
    steps = scheduler.config.num_train_timesteps
    mse: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    for k in range(GAP_TIMESTEPS):
        timesteps = torch.full((len(images),), (2 * k + 1) * steps // (2 * GAP_TIMESTEPS), dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise[k], timesteps)
        for name, hidden in states.items():
            prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
            mse[name].append(((prediction - noise[k]) ** 2).mean(dim=(1, 2, 3)))
    true = torch.cat(mse["true"])
    return {f"{name}_gap": ((torch.cat(mse[name]) - true) / true).mean().item() for name in SWAPS}


def evaluate(
    folder: Path, grid: Path, images: list[Image.Image], captions: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Sample accuracies and caption-swap gaps of the pipeline at ``folder``; saves its sample grid to ``grid``."""
    samples = sample_run(folder, args)
    rows = [np.concatenate(per_prompt[:4], axis=1) for per_prompt in samples]
    Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save(grid)
    flat = [image for per_prompt in samples for image in per_prompt]
    prompts = [prompt for prompt in PROMPTS for _ in range(args.num_samples)]
    return {**accuracy(flat, prompts), **caption_swap_gap(folder, images, captions)}


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample sd) of the values that are not None; None where undefined."""
    values = [v for v in values if v is not None]
    mean = statistics.fmean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Per trainer {measure: (mean, sd)}, and per jaxdiff trainer whether its mean colour accuracy and colour gap
    lie within one sd of the diffusers loop's (None when that sd is undefined)."""
    trainers = list(dict.fromkeys(run["trainer"] for run in runs))
    summary = {
        trainer: {m: mean_sd([run[m] for run in runs if run["trainer"] == trainer]) for m in MEASURES}
        for trainer in trainers
    }
    comparison = {}
    if "diffusers" in summary:
        for trainer in (t for t in trainers if t != "diffusers"):
            comparison[trainer] = {}
            for measure in ("colour_acc", "colour_gap"):
                reference, sd = summary["diffusers"][measure]
                within = None if sd is None else abs(summary[trainer][measure][0] - reference) <= sd
                comparison[trainer][measure] = within
    return summary, comparison


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or 'n/a'."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_line(name: str, result: dict) -> str:
    """One printed line of a run's measures."""
    measures = "  ".join(f"{m} {fmt(result.get(m))}" for m in MEASURES[:4])
    return (
        f"{name:<18} {measures}  train_s {fmt(result.get('train_seconds'), 1)}  loss {fmt(result.get('final_loss'))}"
    )


def print_summary(summary: dict, comparison: dict) -> None:
    """Prints summarize()'s table of mean (sd) per trainer and measure, then its within-1-sd verdicts."""
    print(f"{'trainer':<10}" + "".join(f"{m:>20}" for m in MEASURES))
    for trainer, stats in summary.items():
        cells = [f"{fmt(mean, 1 if m == 'train_seconds' else 3)} ({fmt(sd)})" for m, (mean, sd) in stats.items()]
        print(f"{trainer:<10}" + "".join(f"{cell:>20}" for cell in cells))
    verdicts = {True: "within 1 sd", False: "OUTSIDE 1 sd", None: "n/a (one seed: no sd)"}
    for trainer, checks in comparison.items():
        print(f"{trainer} vs diffusers: " + ", ".join(f"mean {m} {verdicts[v]}" for m, v in checks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds (runs per trainer).")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps per run.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--num_samples", type=int, default=16, help="Sampled images per prompt and run.")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0)
    parser.add_argument("--workdir", type=Path, default=None, help="Where data, runs and results go (kept).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary workdir.")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prompt_following-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}")

    model, data, images, captions = build_data(workdir)
    check = accuracy([np.asarray(image, dtype=np.float32) / 255 for image in images], captions)
    print(
        f"classifiers on the {len(images)} training images: colour {check['colour_acc']:.3f}  shape "
        f"{check['shape_acc']:.3f}"
    )
    if min(check.values()) < 1:
        raise SystemExit("the colour/shape classifiers misread training images: fix the thresholds first")
    reconstructed = reconstruction_accuracy(model, images, captions)
    print(
        f"classifiers on their VAE reconstructions: colour {reconstructed['colour_acc']:.3f}  shape "
        f"{reconstructed['shape_acc']:.3f}"
    )

    untrained = evaluate(model, workdir / "samples-untrained.png", images, captions, args)
    print(run_line("untrained", untrained))
    runs = []
    for seed in args.seeds:
        for trainer in args.trainers:
            run_dir = workdir / f"{trainer}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            out = run_dir / "pipeline"
            tick = time.perf_counter()
            if trainer == "diffusers":
                final_loss = train_diffusers(model, data, out, seed, args)
            else:
                final_loss = train_jaxdiff(trainer, model, data, out, seed, args)
            seconds = time.perf_counter() - tick
            measures = evaluate(out, workdir / f"samples-{trainer}-seed{seed}.png", images, captions, args)
            runs.append(
                {"trainer": trainer, "seed": seed, **measures, "train_seconds": seconds, "final_loss": final_loss}
            )
            print(run_line(f"{trainer} seed {seed}", runs[-1]), flush=True)

    summary, comparison = summarize(runs)
    print(
        f"\nmean (sd) over seeds {args.seeds}, {args.steps} steps, batch {args.batch_size}, lr {args.learning_rate:g}"
    )
    print_summary(summary, comparison)
    wall = time.perf_counter() - start
    print(f"benchmark wall time: {wall:.0f} s")

    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "classifier_check": check,
        "vae_reconstructions": reconstructed,
        "untrained": untrained,
        "runs": runs,
        "summary": {t: {m: {"mean": v[0], "sd": v[1]} for m, v in s.items()} for t, s in summary.items()},
        "within_1_sd_of_diffusers": comparison,
        "wall_seconds": wall,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir)
        print("workdir removed (--keep or --workdir keeps it)")
    else:
        print(f"results: {workdir / 'results.json'}; sample grids: {workdir}/samples-*.png")


if __name__ == "__main__":
    main()
