"""The embedded demo: a tiny random SD pipeline and a tiny captioned shapes dataset, made locally, then training.

`python -m jaxdiff.demo [--root demo]` builds whatever is missing under ``root`` (no network, no torch) and
trains with ``configs/demo.yaml``. The tokenizer and the shapes dataset are also what the tests build on.
"""

import argparse
import csv
import dataclasses
import io
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from jaxdiff.models.autoencoder_kl import AutoencoderKL

# ---------------------------------------------------------------------------------------------------------
# A tiny CLIP BPE tokenizer: the layout of an SD repository's `tokenizer/` folder, from a small vocabulary.
# ---------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

#: Caption words that encode to one token each; dataset fixtures draw their captions from these.
TINY_VOCAB_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "star",
    "on",
    "background",
    "small",
    "large",
)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for bytes 0..255, in CLIP's order.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are shifted
    to code points from 256 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies merges to one word, lowest rank first (leftmost on ties), as CLIP's BPE does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(symbols)))
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that reduce every word to one token.

    Each new merge joins the first two symbols that the merges so far leave; as it ranks after all earlier
    merges, it cannot change how earlier words encode.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        initial = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols := _bpe(initial, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
    return list(ranks)


def save_tiny_clip_tokenizer(path: str | Path, model_max_length: int = 16, pad_token: str = EOS_TOKEN) -> Path:
    """Writes the tiny CLIP tokenizer to `path` and returns it.

    `pad_token` defaults to `<|endoftext|>` as in SD 1.x/2.x and SDXL's first tokenizer; SDXL's second
    tokenizer pads with `"!"`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _word_merges(TINY_VOCAB_WORDS)
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or pad_token not in vocab:
        raise ValueError(f"bad tiny vocabulary: {len(tokens) - len(vocab)} duplicates, pad_token {pad_token!r}")

    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special_tokens,
    }
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2))
    return path


# ---------------------------------------------------------------------------------------------------------
# Captioned shapes: a coloured shape on a coloured background, captioned with words of TINY_VOCAB_WORDS.
# ---------------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = (48, 40)  # (width, height), as PIL counts
NUM_SAMPLES = 12


def shape_image(
    colour: str, shape: str, background: str, offset: int = 0, size: tuple[int, int] = IMAGE_SIZE
) -> Image.Image:
    """A `colour` `shape` on a `background` in a (width, height) image, shifted right by `offset` (in 48 px
    units) so samples with one caption differ."""
    scale = size[0] / IMAGE_SIZE[0]
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    box = tuple(round(v * scale) for v in (10 + offset, 6, 34 + offset, 30))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


def shape_samples(num_samples: int = NUM_SAMPLES, size: tuple[int, int] = IMAGE_SIZE) -> list[tuple[bytes, str]]:
    """`num_samples` (PNG bytes, caption) pairs of (width, height) `size`, cycling through colours, shapes and
    backgrounds."""
    samples = []
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for i in range(num_samples):
        colour, shape = colours[i % len(colours)], SHAPES[i % len(SHAPES)]
        background = backgrounds[(i // len(colours)) % len(backgrounds)]
        buffer = io.BytesIO()
        shape_image(colour, shape, background, offset=i % 5, size=size).save(buffer, format="PNG")
        caption = f"a {colour} {shape} on {background} background"
        assert set(caption.split()) <= set(TINY_VOCAB_WORDS), caption
        samples.append((buffer.getvalue(), caption))
    return samples


#: The demo's (and benchmarks/prompt_following.py's) prompts: every caption of `prompt_images`.
PROMPT_COLOURS = ("red", "blue")
PROMPT_SHAPES = ("circle", "square")
PROMPT_SIZE = (32, 32)


def prompt_images(num_samples: int = 64) -> list[tuple[Image.Image, str]]:
    """`num_samples` (image, caption) pairs: one red or blue circle or square on white, 32 px, captioned
    "a {colour} {shape}"; every (colour, shape) equally often, at 8 horizontal positions 2 px apart."""
    combos = [(c, s) for s in PROMPT_SHAPES for c in PROMPT_COLOURS]
    samples = []
    for i in range(num_samples):
        colour, shape = combos[i % len(combos)]
        offset = 3 * ((i // len(combos)) % 8) - 9  # in shape_image's 48 px units: -6 to +8 px at 32 px
        image = shape_image(colour, shape, "white", offset=offset, size=PROMPT_SIZE)
        samples.append((image, f"a {colour} {shape}"))
    return samples


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(root: Path, samples: list[tuple[bytes, str]], metadata: str = "jsonl") -> Path:
    """An imagefolder as diffusers' guides describe: images plus metadata.jsonl or metadata.csv
    (`file_name` + `text`)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (png, caption) in enumerate(samples):
        name = f"{i:04d}.png"
        (root / name).write_bytes(png)
        rows.append({"file_name": name, "text": caption})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


# ---------------------------------------------------------------------------------------------------------
# A tiny random SD 1.x-shaped pipeline, written by jaxdiff's own models in diffusers format.
# ---------------------------------------------------------------------------------------------------------

DEMO_MAX_LENGTH = 16
VAE_FIT_STEPS = 150
DEMO_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
DEMO_VAE = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}
DEMO_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def fit_vae(
    vae: "AutoencoderKL",
    images: Sequence[Image.Image],
    *,
    steps: int = VAE_FIT_STEPS,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
) -> float:
    """Fits ``vae`` in place to reconstruct ``images`` (same-sized RGB) and returns its latent scaling factor.

    A random VAE decodes even perfect latents to noise, so a tiny pipeline only shows what its UNet learnt once
    its VAE reconstructs the data. The loss is SD's VAE objective without the perceptual and GAN terms: mean
    squared error through a posterior draw plus a small KL term. The scaling factor is 1 / std of the latents'
    means over ``images``, as SD chose 0.18215 for its VAE, so the UNet sees latents of unit variance.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    pixels = jnp.asarray(np.stack([np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1 for im in images]))
    pixels = pixels.transpose(0, 3, 1, 2)
    optimizer = nnx.Optimizer(vae, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(vae: "AutoencoderKL", optimizer: nnx.Optimizer, x: jax.Array, rng: jax.Array) -> None:
        def loss_fn(vae: "AutoencoderKL") -> jax.Array:
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(rng)).sample
            kl = 0.5 * jnp.mean(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar)
            return jnp.mean((reconstruction - x) ** 2) + kl_weight * kl

        optimizer.update(vae, nnx.grad(loss_fn)(vae))

    order = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    batch_size = min(batch_size, len(images))
    for i in range(steps):
        step(vae, optimizer, pixels[order.choice(len(images), batch_size, replace=False)], jax.random.fold_in(key, i))
    means = jax.jit(lambda x: vae.encode(x).latent_dist.mean)(pixels)
    return float(1.0 / jnp.std(means))


def build_tiny_sd_pipeline(
    path: Path,
    seed: int = 0,
    *,
    unet: dict[str, Any] = DEMO_UNET,
    vae: dict[str, Any] = DEMO_VAE,
    text: dict[str, Any] | None = None,
    max_length: int = DEMO_MAX_LENGTH,
    vae_train_images: Sequence[Image.Image] | None = None,
) -> Path:
    """A randomly initialised, SD 1.x-shaped pipeline folder that diffusers' StableDiffusionPipeline loads.

    ``unet``/``vae`` are diffusers config dicts; ``text`` overrides the CLIP text config (the token ids always
    come from the tiny tokenizer). With ``vae_train_images`` the VAE is first fitted to them (`fit_vae`), so the
    pipeline's decoded samples look like its training data; otherwise every model stays random.
    """
    from flax import nnx

    from jaxdiff.models.autoencoder_kl import AutoencoderKL
    from jaxdiff.models.clip import CLIPTextModel
    from jaxdiff.models.unet_2d_condition import UNet2DConditionModel

    tokenizer = save_tiny_clip_tokenizer(path / "tokenizer", model_max_length=max_length)
    vocab_size = len(json.loads((tokenizer / "vocab.json").read_text()))
    text_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **(text or {}),
        "vocab_size": vocab_size,
        "max_position_embeddings": max_length,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    rngs = nnx.Rngs(seed)
    CLIPTextModel.from_config(text_config, rngs=rngs).save_pretrained(path / "text_encoder")
    UNet2DConditionModel.from_config(unet, rngs=rngs).save_pretrained(path / "unet")
    autoencoder = AutoencoderKL.from_config(vae, rngs=rngs)
    if vae_train_images is not None:
        scaling_factor = fit_vae(autoencoder, vae_train_images, seed=seed)
        autoencoder.config = dataclasses.replace(autoencoder.config, scaling_factor=scaling_factor)
    autoencoder.save_pretrained(path / "vae")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEMO_SCHEDULER, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def build_demo(root: Path) -> tuple[Path, Path]:
    """The demo's pipeline (its VAE fitted to the data) and dataset under ``root``, built once; returns (model
    folder, data folder)."""
    model, data = root / "tiny-sd", root / "shapes"
    samples = prompt_images()
    if not (model / "model_index.json").is_file():
        build_tiny_sd_pipeline(model, vae_train_images=[image for image, _ in samples])
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(data, [(png_bytes(image), caption) for image, caption in samples], "jsonl")
    return model, data


def progress_grid(samples_dir: Path, since: float = 0.0, scale: int = 2) -> Image.Image:
    """One picture of training: a row per validation step, a column per prompt, from the grids in ``samples_dir``
    written after time ``since`` (`metrics.save_validation_images` names them ``step-<step>_<index>_<slug>.png``)."""
    from PIL import ImageFont

    rows: dict[int, list[Path]] = {}
    for path in sorted(p for p in samples_dir.glob("step-*_*_*.png") if p.stat().st_mtime >= since):
        rows.setdefault(int(path.name.split("_")[0].removeprefix("step-")), []).append(path)
    if not rows:
        raise FileNotFoundError(f"no validation samples in {samples_dir}")
    prompts = [path.stem.split("_", 2)[2].replace("-", " ") for path in rows[max(rows)]]
    cell = Image.open(rows[max(rows)][0]).size
    cell = (cell[0] * scale, cell[1] * scale)
    font = ImageFont.load_default()
    margin, header, gap = 72, 18, 4
    grid = Image.new("RGB", (margin + len(prompts) * (cell[0] + gap), header + len(rows) * (cell[1] + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for col, prompt in enumerate(prompts):
        draw.text((margin + col * (cell[0] + gap), 2), prompt, fill="black", font=font)
    for row, (step, paths) in enumerate(sorted(rows.items())):
        top = header + row * (cell[1] + gap)
        draw.text((4, top + cell[1] // 2 - 6), f"step {step}", fill="black", font=font)
        for col, path in enumerate(paths):
            image = Image.open(path).convert("RGB").resize(cell, Image.Resampling.NEAREST)
            grid.paste(image, (margin + col * (cell[0] + gap), top))
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    """Build the demo assets if needed, then train on them with configs/demo.yaml plus any extra flags."""
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.demo", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Path("demo"), help="Where the demo model and data live.")
    args, train_flags = parser.parse_known_args(argv)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not config_file.is_file():
        parser.error(f"{config_file} not found: run the demo from a source checkout (pip install -e .)")
    model, data = args.root / "tiny-sd", args.root / "shapes"
    flags = ["--config", str(config_file), "--pretrained_model_name_or_path", str(model), "--train_data_dir"]
    flags += [str(data), *train_flags]
    from jaxdiff import cli, cpu_devices, train
    from jaxdiff.config import ConfigError

    try:
        config, _ = cli.parse_args(flags)
    except ConfigError as err:
        cli.exit_with(err)
    if config.backend == "jax":
        cpu_devices.split_host(config)  # before building the demo starts jax
    print(f"building the demo model and data under {args.root} (once)", flush=True)
    build_demo(args.root)
    started = time.time()
    train.main(flags)
    try:
        grid = progress_grid(Path(config.output_dir) / "samples", since=started)
    except FileNotFoundError:  # no validation prompts, or no validation step in this run
        return
    progress = Path(config.output_dir) / "progress.png"
    grid.save(progress)
    print(f"samples over training: {progress}")


if __name__ == "__main__":
    main()
