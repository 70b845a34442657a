"""The optimizer update alone, compiled for a TPU slice on this CPU machine: AdamW against 8-bit AdamW, side by side.

    python benchmarks/optimizer_memory.py --model sd15|sdxl|tiny|PIPELINE_FOLDER --topology v5p-8 [--mesh 1x4]
        [--json]

What the update needs, apart from the backward pass that comes before it in the train step: the trainer's own
optimizer (gradient clipping, AdamW or `jaxdiff.adam8bit`, the schedule) applied to the trained parameters, with the
parameters, optimizer state and gradients sharded as the train step shards them and donated, compiled by libtpu as
``benchmarks/tpu_compile.py`` compiles the step (same models, same topologies). Per optimizer: the optimizer state,
the update's temporaries, its peak and the bytes it moves (XLA's count), per device; then the 8-bit / AdamW ratios.
An update whose temporaries hold every parameter's float32 moments at once shows here as temporaries near twice the
parameters' float32 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import optax
import tpu_compile as tc  # sets JAX_PLATFORMS=cpu (before any backend starts): jax runs on the host CPU

from jaxdiff import cli
from jaxdiff.config import ConfigError


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of ``tree``'s leaves on one device under ``shardings``."""
    sizes = jax.tree.map(lambda leaf, s: leaf.dtype.itemsize * math.prod(s.shard_shape(leaf.shape)), tree, shardings)
    return sum(jax.tree.leaves(sizes))


def compile_update(args: argparse.Namespace, pipeline: Path, devices: Sequence[Any], optimizer: str) -> dict[str, Any]:
    """One row: the update of ``optimizer`` compiled for ``devices`` (``args.topology``'s), bytes per device."""
    variant = tc.parse_args(
        ["--model", args.model, "--topology", args.topology, "--no-use_ema", "--optimizer", optimizer]
        + (["--mesh", args.mesh] if args.mesh else [])
    )
    config = tc.train_config(variant, pipeline, 1, False)
    program, _ = tc.build_program(config, devices)
    state, shardings = program.abstract_state, program.state_shardings

    def update(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = program.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(
        update,
        in_shardings=(shardings["params"], shardings["opt_state"], shardings["params"]),
        out_shardings=(shardings["params"], shardings["opt_state"]),
        donate_argnums=(0, 1, 2),
    )
    start = time.perf_counter()
    compiled = update.lower(state["params"], state["opt_state"], state["params"]).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "topology": args.topology,
        "mesh": "x".join(str(n) for n in program.mesh.devices.shape),
        "optimizer": optimizer,
        "param_bytes": shard_bytes(state["params"], shardings["params"]),
        "state_bytes": shard_bytes(state["opt_state"], shardings["opt_state"]),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes": int(memory.peak_memory_in_bytes),
        "bytes_accessed": int(cost["bytes accessed"]),  # XLA's count of HBM traffic: the update is bandwidth-bound
        "compile_s": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help=f"built-in ({', '.join(tc.MODELS)}) or a pipeline folder")
    parser.add_argument("--topology", default="v5p-8", help=f"one TPU slice: {tc.topology_help()}")
    parser.add_argument("--mesh", default=None, help="'DxM' data x fsdp (default: every device on the data axis)")
    parser.add_argument("--json", action="store_true", help="one JSON object per optimizer instead of the table")
    args = parser.parse_args(argv)
    tc.parse_args(["--model", args.model, "--topology", args.topology])  # the same checks, the same messages
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        tc.prepare_libtpu()
        with tempfile.TemporaryDirectory() as scratch:
            pipeline = tc.write_pipeline(args.model, Path(scratch)) if args.model in tc.MODELS else Path(args.model)
            devices = tc.make_topology(args.topology).devices
            rows = [compile_update(args, pipeline, devices, optimizer) for optimizer in ("adamw", "adam8bit")]
    except ConfigError as err:
        cli.exit_with(err)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    columns = ("param_bytes", "state_bytes", "temp_bytes", "peak_bytes", "bytes_accessed")
    print(f"model {args.model}, {args.topology} ({rows[0]['mesh']}): optimizer update alone, GiB per device")
    print(f"{'optimizer':>9}  " + "  ".join(f"{c.removesuffix('_bytes'):>14}" for c in columns) + "  compile_s")
    for row in rows:
        values = "  ".join(f"{row[c] / tc.GIB:14.3f}" for c in columns)
        print(f"{row['optimizer']:>9}  {values}  {row['compile_s']:9}")
    adamw, ours = rows
    print(
        f"8-bit / AdamW: state {ours['state_bytes'] / adamw['state_bytes']:.2f}, "
        f"peak {ours['peak_bytes'] / adamw['peak_bytes']:.2f}, "
        f"bytes accessed {ours['bytes_accessed'] / adamw['bytes_accessed']:.2f}; "
        f"8-bit temporaries / float32 parameter bytes {ours['temp_bytes'] / ours['param_bytes']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
