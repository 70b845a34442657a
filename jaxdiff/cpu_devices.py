"""CPU-only hosts: one XLA:CPU device per core, asked for before jax starts.

XLA:CPU spreads the ops of one device over several cores poorly, where torch's oneDNN kernels do it well (on 2
cores a VAE encode took 574 ms on one device, 309 ms on two, 415 ms in torch). So a JAX run on a CPU host asks XLA
for one device per core, as many as divide the host's batch, and the default mesh splits the batch over them as it
splits it over a TPU VM's chips. The batch keeps its meaning: on a CPU host ``--train_batch_size`` counts per host,
as in the torch backend (one process per CPU host), not per split device.

Nothing changes when the user set the device count (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``),
when jax was imported already, or for a multi-process run; on a GPU or TPU the extra CPU devices are unused.
"""

import math
import os
import sys

from jaxdiff.config import TrainConfig

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
#: Set to the device count when jaxdiff split the host (read back by `split_count` once jax runs).
SPLIT_ENV = "JAXDIFF_CPU_SPLIT"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launched_multi_process(config: TrainConfig) -> bool:
    """Whether this process is one of a multi-host job: --coordinator_address given, a TPU pod slice, or a
    coordinator named in the environment (``JAX_COORDINATOR_ADDRESS``)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return bool(config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")) or len(hosts) > 1


def device_count(config: TrainConfig, cores: int) -> int:
    """Devices to split a host of ``cores`` into: the --mesh size when given, else the most (up to one per core)
    that divide the host's batch."""
    if config.mesh:
        data, fsdp = (int(n) for n in config.mesh.split("x"))
        return data * fsdp
    return math.gcd(config.global_batch_size or config.train_batch_size, cores)


def split_host(config: TrainConfig) -> int:
    """Before jax starts, asks XLA for `device_count` CPU devices; returns that count, 1 when nothing changed."""
    if SPLIT_ENV in os.environ:
        return int(os.environ[SPLIT_ENV])
    if "jax" in sys.modules or DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or launched_multi_process(config):
        return 1
    count = device_count(config, _cores())
    if count <= 1:
        return 1
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={count}".strip()
    os.environ[SPLIT_ENV] = str(count)
    return count


def split_count() -> int:
    """The number of devices jaxdiff split this CPU host into, 0 if it did not (or jax runs on an accelerator)."""
    import jax

    if SPLIT_ENV not in os.environ or jax.default_backend() != "cpu":
        return 0
    return int(os.environ[SPLIT_ENV])
