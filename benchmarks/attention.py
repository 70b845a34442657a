"""Attention forward+backward time of jaxdiff's implementations and torch SDPA, side by side in one run.

    python benchmarks/attention.py [--batch 4] [--tokens 1024] [--heads 2] [--head_dim 64] [--steps 10]
        [--dtype float32|bfloat16]

Times `jaxdiff.models.nn.attention` with each implementation that runs here (xla; chunked, the
memory-efficient one; cudnn on a GPU, which takes bfloat16 only; splash on a TPU) and torch's
`scaled_dot_product_attention` on the same inputs, as the gradient of sum(out**2) with respect to queries, keys and
values. Prints the median ms and the ratio to torch.
The defaults are the first self-attention level of `benchmarks/step_time.py`'s CPU UNet (32x32 latents).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import nn


def median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), args.dtype) for _ in "qkv")
    platform = jax.devices()[0].platform
    results = {}
    for impl in ("xla", "chunked", *{"gpu": ("cudnn",), "tpu": ("splash",)}.get(platform, ())):
        grad = jax.jit(
            jax.grad(lambda q, k, v, impl=impl: jnp.sum(nn.attention(q, k, v, implementation=impl) ** 2), (0, 1, 2))
        )
        results[f"jaxdiff {impl}"] = median_ms(lambda grad=grad: jax.block_until_ready(grad(q, k, v)), args.steps)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tq, tk, tv = (
        torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2).contiguous().to(device, getattr(torch, args.dtype))
        for x in (q, k, v)
    )
    tq, tk, tv = (x.requires_grad_() for x in (tq, tk, tv))

    def torch_step() -> None:
        (F.scaled_dot_product_attention(tq, tk, tv) ** 2).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    torch_ms = median_ms(torch_step, args.steps)
    shape = f"batch {args.batch}, {args.tokens} tokens, {args.heads} heads x {args.head_dim}, {args.dtype}"
    print(f"attention forward+backward ({shape}) on {platform}")
    for name, ms in results.items():
        print(f"  {name:<16} {ms:8.1f} ms   ratio to torch {ms / torch_ms:.2f}")
    print(f"  {'torch sdpa':<16} {torch_ms:8.1f} ms")


if __name__ == "__main__":
    main()
