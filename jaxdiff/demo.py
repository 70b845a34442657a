"""The embedded demo: a tiny random SD pipeline and a tiny captioned shapes dataset, made locally, then training.

`python -m jaxdiff.demo [--root demo]` builds whatever is missing under ``root`` (no network, no torch) and
trains with ``configs/demo.yaml``. The tokenizer and the shapes dataset are also what the tests build on.
"""

import argparse
import csv
import io
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

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


def build_tiny_sd_pipeline(
    path: Path,
    seed: int = 0,
    *,
    unet: dict[str, Any] = DEMO_UNET,
    vae: dict[str, Any] = DEMO_VAE,
    text: dict[str, Any] | None = None,
    max_length: int = DEMO_MAX_LENGTH,
) -> Path:
    """A randomly initialised, SD 1.x-shaped pipeline folder that diffusers' StableDiffusionPipeline loads.

    ``unet``/``vae`` are diffusers config dicts; ``text`` overrides the CLIP text config (the token ids always
    come from the tiny tokenizer).
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
    AutoencoderKL.from_config(vae, rngs=rngs).save_pretrained(path / "vae")
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
    """The demo's pipeline and dataset under ``root``, built once; returns (model folder, data folder)."""
    model, data = root / "tiny-sd", root / "shapes"
    if not (model / "model_index.json").is_file():
        build_tiny_sd_pipeline(model)
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(data, shape_samples(48), "jsonl")
    return model, data


def main(argv: Sequence[str] | None = None) -> None:
    """Build the demo assets if needed, then train on them with configs/demo.yaml plus any extra flags."""
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.demo", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Path("demo"), help="Where the demo model and data live.")
    args, train_flags = parser.parse_known_args(argv)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not config.is_file():
        parser.error(f"{config} not found: run the demo from a source checkout (pip install -e .)")
    model, data = build_demo(args.root)
    print(f"demo model: {model}\ndemo data:  {data}")
    from jaxdiff import train

    flags = ["--config", str(config), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    train.main([*flags, *train_flags])


if __name__ == "__main__":
    main()
