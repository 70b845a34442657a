"""CPU hosts split into one XLA device per core, with the batch still counted per host."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxdiff import cpu_devices
from jaxdiff.config import TrainConfig


@pytest.mark.parametrize(
    ("fields", "cores", "expected"),
    [
        ({"train_batch_size": 16}, 2, 2),
        ({"train_batch_size": 16}, 6, 2),  # as many as divide the batch
        ({"train_batch_size": 3}, 2, 1),
        ({"train_batch_size": 4, "global_batch_size": 12}, 6, 6),
        ({"train_batch_size": 16, "mesh": "1x1"}, 2, 1),  # --mesh says how many
        ({"train_batch_size": 16, "mesh": "2x2"}, 2, 4),
    ],
)
def test_device_count(fields, cores, expected):
    assert cpu_devices.device_count(TrainConfig(**fields), cores) == expected


def _split_in_subprocess(env: dict[str, str], argv: list[str]) -> list[str]:
    """Runs split_host on a fresh interpreter (jax not yet imported), then reports what jax and jaxdiff see."""
    script = textwrap.dedent(
        """
        import sys
        from jaxdiff import cpu_devices
        from jaxdiff.config import TrainConfig
        config = TrainConfig(train_batch_size=int(sys.argv[1]), mesh=sys.argv[2] if len(sys.argv) > 2 else None)
        asked = cpu_devices.split_host(config)
        import jax
        from jaxdiff import parallel
        mesh = parallel.make_mesh(config.mesh)
        print(asked, jax.device_count(), cpu_devices.split_count(),
              parallel.global_batch_size(config.train_batch_size, None, mesh))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def _env_without_device_count() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_devices.SPLIT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_split_host_keeps_the_batch_per_host():
    # 2 devices (as --mesh asks), and the global batch stays --train_batch_size, as on the torch backend.
    asked, devices, split, batch = _split_in_subprocess(_env_without_device_count(), ["16", "2x1"])
    assert (asked, devices, split, batch) == ("2", "2", "2", "16")


def test_split_host_leaves_a_user_device_count_alone():
    env = _env_without_device_count()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    asked, devices, split, batch = _split_in_subprocess(env, ["4"])
    # The user's 3 devices, and --train_batch_size per device as everywhere else.
    assert (asked, devices, split, batch) == ("1", "3", "0", "12")


def test_split_host_does_nothing_once_jax_runs():
    assert "jax" in sys.modules  # conftest imported it
    assert cpu_devices.split_host(TrainConfig(train_batch_size=16)) == 1
    assert cpu_devices.split_count() == 0


def test_auto_attention_is_chunked_on_cpu():
    from jaxdiff.models import nn

    assert TrainConfig().attention_implementation == "auto"
    assert nn.resolve_attention("auto") == "chunked"
    assert nn.resolve_attention("xla") == "xla"
