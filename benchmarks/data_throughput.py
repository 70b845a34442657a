"""Input pipeline throughput at 512 px: decode + augment with 0 and N workers, and reading the latent cache.

    python benchmarks/data_throughput.py [--images 64] [--workers 2] [--batches 16]

Generates `--images` JPEGs of about 600x700 px in a temporary imagefolder, then prints images/s for each setting
and the ratios to the single-process figure, measured side by side in one run.
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdiff.data.latent_cache import build_latent_cache
from jaxdiff.data.pipeline import make_train_iterator
from jaxdiff.data.sources import SourceSpec
from jaxdiff.data.streams import LoaderSpec
from jaxdiff.data.transforms import TransformSpec


def _write_jpegs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        height, width = int(rng.integers(580, 620)), int(rng.integers(680, 720))
        pixels = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (root / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
        rows.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def _images_per_second(make_iterator, batches: int, batch_size: int) -> float:
    with make_iterator() as it:
        next(it)  # start-up (worker processes, first decode) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        _write_jpegs(root, args.images)
        source = SourceSpec(train_data_dir=str(root))
        augment = TransformSpec(resolution=512, center_crop=False, random_flip=True)
        results = {}
        for workers in (0, args.workers):
            loader = LoaderSpec(global_batch_size=args.batch_size, seed=0, dataloader_num_workers=workers)
            results[f"decode+augment, {workers} workers"] = _images_per_second(
                lambda loader=loader: make_train_iterator(source, augment, loader, process_index=0, process_count=1),
                args.batches,
                args.batch_size,
            )

        def encode_images(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            b, c, h, w = pixels.shape  # an SD VAE's latent shape: 4 x H/8 x W/8
            mean = np.resize(pixels.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5)), (b, 4, h // 8, w // 8))
            return mean, np.zeros_like(mean)

        cached = TransformSpec(resolution=512, center_crop=True, random_flip=True)
        cache = build_latent_cache(
            source,
            cached,
            [],
            encode_images,
            None,
            model_fingerprint="benchmark",
            latent_cache_dir=Path(tmp) / "cache",
        )
        loader = LoaderSpec(global_batch_size=args.batch_size, seed=0)
        results["latent cache (read)"] = _images_per_second(
            lambda: make_train_iterator(source, cached, loader, latent_cache=cache, process_index=0, process_count=1),
            args.batches,
            args.batch_size,
        )
    baseline = next(iter(results.values()))
    for name, rate in results.items():
        print(f"{name:32s} {rate:9.1f} images/s  ({rate / baseline:5.2f}x)")


if __name__ == "__main__":
    main()
