"""Test setup: 8 simulated CPU devices, no hub access, a persistent compilation cache.

Everything here runs before jax is imported by any test module.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

_CACHE = pathlib.Path(os.environ.get("JAXDIFF_TEST_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_threefry_partitionable", True)
# Parity tests compare against torch float32: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

pytest_plugins = ["tests.fixtures.pipelines", "tests.fixtures.datasets"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state (mixed precision, ...) in process-wide singletons that a later `Accelerator`
    with other settings refuses: after any test that imported it (diffusers loads do too), reset them, as
    accelerate's own test cases do."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()
