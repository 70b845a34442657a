"""The device mesh: built from 'DxM', checked against the devices, and the batch checked against it.

Axis ``data`` carries data parallelism; axis ``fsdp`` shards parameters, optimizer state and EMA
(FSDP-style). The global batch is split over all devices of both axes.
"""

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

from jaxdiff import cpu_devices
from jaxdiff.config import MESH_PATTERN, ConfigError, TrainConfig

log = logging.getLogger("jaxdiff")

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Logical axis names (declared where parameters are created, see jaxdiff.models.nn), in the order they are
# preferred for sharding over the fsdp axis. Each parameter shards its first preferred dimension that
# divides evenly; parameters with none (norm scales, odd sizes) are replicated.
FSDP_PREFERENCE: tuple[str, ...] = ("out", "vocab", "in", "embed")


def maybe_initialize_distributed(config: TrainConfig) -> None:
    """Join the multi-host job when launched as one: through --coordinator_address, --num_processes and
    --process_id when given, else as JAX detects it (TPU pod slices, ``JAX_COORDINATOR_ADDRESS``). Processes on
    CPU run their collectives over gloo unless another implementation was chosen."""
    if not cpu_devices.launched_multi_process(config) or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    except jax.errors.JaxRuntimeError as err:
        where = f"--coordinator_address={config.coordinator_address!r}" if config.coordinator_address else "JAX"
        raise ConfigError(f"{where}: could not join the multi-process job ({err})") from None
    log.info(
        "process %d of %d, %d of %d devices here",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def shared_seed(seed: int) -> int:
    """Process 0's ``seed`` on every process: each process drew its own when --seed was unset, and data order,
    augmentation and the replicated RNG must agree. Call it on all processes."""
    if jax.process_count() == 1:
        return seed
    high, low = multihost_utils.broadcast_one_to_all(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))
    return int(high) << 32 | int(low)


def process_zero_decides(flag: bool) -> bool:
    """Process 0's ``flag`` on every process, for a decision that leads into collectives (validation gathers) but
    rests on per-host counts (epochs read). Waits for the devices' queued work; call it on all processes."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


# A barrier may wait for another host's compile or export (minutes on a pod slice for SDXL).
BARRIER_TIMEOUT_S = 3600
_barriers_passed = itertools.count()


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (returns at once with one process).

    It is the coordination service's barrier, not a collective on the devices: CPU collectives (gloo) give up
    when a peer is 30 s late to a new communicator, and compiles or exports differ by more than that."""
    if jax.process_count() > 1:
        sync = ocp_multihost.get_barrier_sync_fn()
        sync(key=f"jaxdiff:{name}:{next(_barriers_passed)}", timeout_ms=BARRIER_TIMEOUT_S * 1000)


def to_host(tree: Any) -> Any:
    """``tree``'s arrays as NumPy on this process, whatever their sharding; arrays split over several hosts are
    gathered (one leaf at a time, so only one is ever replicated on the devices). Call it on all processes."""

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(fetch, tree)


def mesh_shape(spec: str | None, device_count: int) -> tuple[int, int]:
    """(data, fsdp) sizes for a 'DxM' spec, or 'data'/'fsdp' (every device on that axis); 'data' when None."""
    if spec in (None, "data"):
        return device_count, 1
    if spec == "fsdp":
        return 1, device_count
    match = MESH_PATTERN.match(spec)
    if not match:
        raise ConfigError(f"--mesh={spec!r}: must be 'DxM' with positive integers, e.g. {device_count}x1")
    data, fsdp = int(match.group(1)), int(match.group(2))
    if data * fsdp != device_count:
        fits = ", ".join(f"{d}x{device_count // d}" for d in range(device_count, 0, -1) if device_count % d == 0)
        raise ConfigError(
            f"--mesh={spec!r} needs {data * fsdp} devices but {device_count} are available; meshes that fit: {fits}"
        )
    return data, fsdp


def make_mesh(spec: str | None, devices: list[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp') mesh over all (or the given) devices."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto,) * 2)


def global_batch_size(train_batch_size: int, requested_global: int | None, mesh: Mesh) -> int:
    """The global batch: train_batch_size per device (per host on a CPU host jaxdiff split into one device per
    core, see `jaxdiff.cpu_devices`), or the requested global size if it divides evenly."""
    if requested_global is None:
        if not cpu_devices.split_count():
            return train_batch_size * mesh.size
        requested_global = train_batch_size * jax.process_count()
    if requested_global % mesh.size:
        raise ConfigError(
            f"--global_batch_size={requested_global} does not divide over the {mesh.size} devices of mesh "
            f"{mesh.shape[DATA_AXIS]}x{mesh.shape[FSDP_AXIS]}; use a multiple of {mesh.size}"
        )
    if requested_global % jax.process_count():
        raise ConfigError(f"--global_batch_size={requested_global} does not divide over {jax.process_count()} hosts")
    return requested_global


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """PartitionSpec for one parameter: shard its best-preferred evenly divisible logical axis over fsdp."""
    if not names or fsdp_size == 1:
        return PartitionSpec()
    for preferred in FSDP_PREFERENCE:
        for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
            if name == preferred and size % fsdp_size == 0:
                return PartitionSpec(*(FSDP_AXIS if i == dim else None for i in range(len(shape))))
    return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) nnx state, same tree structure, from the parameters' logical names."""
    fsdp_size = mesh.shape[FSDP_AXIS]

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, variable.get_value().shape, fsdp_size)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading axis over every device of both mesh axes."""
    return NamedSharding(mesh, PartitionSpec((DATA_AXIS, FSDP_AXIS)))
