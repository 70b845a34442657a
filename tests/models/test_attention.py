"""nn.attention's kernels: splash (Pallas interpret mode on CPU) against torch's SDPA, sharded and in a UNet; the
auto and cuDNN rules; splash compiled for a TPU v5e and skipped on a TPU v3."""

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh

from jaxdiff import parallel
from jaxdiff.config import TrainConfig
from jaxdiff.models import nn
from jaxdiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from tests.models import jit_call, max_abs_diff
from tests.models.test_unet_2d_condition import SD1

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


def _qkv(q_len: int, kv_len: int, head_dim: int, batch: int = 1, heads: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(head_dim + q_len + kv_len)
    shapes = [(batch, q_len, heads, head_dim), *[(batch, kv_len, heads, head_dim)] * 2]
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def _torch_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cotangent: np.ndarray) -> list[np.ndarray]:
    """torch SDPA's output and its (dq, dk, dv) for the loss sum(out * cotangent)."""
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    (out * torch.tensor(cotangent)).sum().backward()
    return [x.detach().numpy() for x in (out, *(t.grad.transpose(1, 2) for t in (tq, tk, tv)))]


@jax.jit
def _splash_and_grads(q: jax.Array, k: jax.Array, v: jax.Array, cotangent: jax.Array) -> list[jax.Array]:
    out, vjp = jax.vjp(nn.splash_attention, q, k, v)
    return [out, *vjp(cotangent)]


@pytest.mark.parametrize(
    "head_dim, q_len, kv_len",
    [
        (40, 96, 96),  # SD 1.x's first level on an 8x12 latent
        (80, 384, 384),  # its second level on a 16x24 latent
        (160, 96, 96),
        (64, 96, 96),
        (40, 96, 77),  # cross-attention over CLIP's 77 tokens
        (160, 96, 77),
    ],
)
def test_splash_matches_torch(head_dim, q_len, kv_len):
    q, k, v = _qkv(q_len, kv_len, head_dim)
    cotangent = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    expected = _torch_attention(q, k, v, cotangent)

    got = _splash_and_grads(q, k, v, cotangent)
    errors = [max_abs_diff(a, b) for a, b in zip(got, expected, strict=True)]
    print(
        f"splash d={head_dim} q={q_len} kv={kv_len}: forward {errors[0]:.2e}, dq/dk/dv "
        + " ".join(f"{e:.2e}" for e in errors[1:])
    )
    assert errors[0] <= FORWARD_TOL
    assert max(errors[1:]) <= GRAD_TOL


def test_splash_shard_map_matches_unsharded():
    mesh = parallel.make_mesh("4x2")
    q, k, v = (jnp.asarray(x) for x in _qkv(96, 96, 40, batch=8, heads=1))

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the trainer traces its step
            return nn.attention(q, k, v, implementation="splash")

    args = [jax.device_put(x, parallel.batch_sharding(mesh)) for x in (q, k, v)]
    assert "shard_map" in str(jax.make_jaxpr(sharded)(*args))
    out = jax.jit(sharded)(*args)
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(out, jax.jit(nn.splash_attention)(q, k, v))


def test_tiny_unet_with_splash_equals_xla():
    model = UNet2DConditionModel(UNet2DConditionConfig.from_dict(SD1), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 4, 8, 12), dtype=np.float32))  # 96 tokens at the first level
    context = jnp.asarray(rng.standard_normal((1, 77, 16), dtype=np.float32))
    timestep = jnp.asarray([500])
    outs = {}
    for impl in ("xla", "splash"):
        model.set_attributes(attention_impl=impl, raise_if_not_found=False)
        outs[impl] = jit_call(model, sample, timestep, context).sample
    error = max_abs_diff(outs["splash"], outs["xla"])
    print(f"tiny UNet splash vs xla: {error:.2e}")
    assert 0 < error <= FORWARD_TOL  # not 0: the splash kernel really ran


def _device(platform: str, device_kind: str) -> SimpleNamespace:
    return SimpleNamespace(platform=platform, device_kind=device_kind)


def test_auto_attention_follows_the_devices(caplog):
    cases = {("tpu", "TPU v4"): "splash", ("tpu", "TPU v6 lite"): "splash", ("tpu", "TPU v3"): "xla"}
    cases |= {("gpu", "NVIDIA H100 80GB HBM3"): "cudnn", ("cpu", "cpu"): "chunked"}
    with caplog.at_level(logging.INFO, logger="jaxdiff"):
        for (platform, kind), expected in cases.items():
            assert nn.resolve_attention("auto", [_device(platform, kind)]) == expected
            assert f"auto: {expected} on {kind}" in caplog.text
    # float32 compute on a GPU: cuDNN takes none, so auto is xla (an explicit cudnn is refused by the config).
    assert nn.resolve_attention("auto", [_device("gpu", "NVIDIA H100 80GB HBM3")], half_precision=False) == "xla"
    assert nn.resolve_attention("splash", [_device("tpu", "TPU v3")]) == "splash"  # v3 is handled at trace time


def test_splash_on_tpu_v3_is_xla_with_a_message(caplog):
    v3 = AbstractMesh((1, 1), ("data", "fsdp"), abstract_device=AbstractDevice("TPU v3", 2, "tpu"))
    q, k, v = _qkv(96, 96, 40)
    nn._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="jaxdiff"), jax.sharding.use_abstract_mesh(v3):
        jaxpr = str(jax.make_jaxpr(lambda *a: nn.attention(*a, implementation="splash"))(q, k, v))
    assert "pallas_call" not in jaxpr
    assert "splash attention needs Mosaic (TPU v4 or later); TPU v3 runs attention with xla" in caplog.text


@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_takes_sd_head_dims_in_half_precision(head_dim, dtype):
    assert nn.cudnn_unsupported(head_dim, dtype, "9.0") is None  # Hopper
    ampere = nn.cudnn_unsupported(head_dim, dtype, "8.0")
    assert ampere == (
        None if head_dim <= 128 else "head dim 160: cuDNN takes multiples of 8 up to 128 on compute capability 8.0"
    )


def test_cudnn_refuses_float32_and_odd_head_dims():
    assert nn.cudnn_unsupported(64, jnp.float32, "9.0").startswith("float32 inputs: cuDNN takes float16/bfloat16")
    assert "head dim 36" in nn.cudnn_unsupported(36, jnp.bfloat16, "9.0")
    assert "up to 256" in nn.cudnn_unsupported(320, jnp.bfloat16, "10.0")


def test_cudnn_leaves_a_layer_it_cannot_run_to_xla(monkeypatch, caplog):
    gpu = AbstractMesh((1, 1), ("data", "fsdp"), abstract_device=AbstractDevice("NVIDIA A100", None, "gpu"))
    monkeypatch.setattr(nn, "_gpu_compute_capability", lambda: "8.0")
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(96, 96, 160))
    nn._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="jaxdiff"), jax.sharding.use_abstract_mesh(gpu):
        jaxpr = str(jax.make_jaxpr(lambda *a: nn.attention(*a, implementation="cudnn"))(q, k, v))
    assert "cudnn" not in jaxpr and "dot_general" in jaxpr
    assert "cudnn attention cannot run a layer with head dim 160: cuDNN takes multiples of 8 up to 128" in caplog.text


def test_cudnn_without_mixed_precision_is_refused():
    with pytest.raises(ValueError, match="attention_implementation=cudnn needs --mixed_precision fp16 or bf16"):
        TrainConfig(attention_implementation="cudnn", mixed_precision="no")
    assert TrainConfig(attention_implementation="cudnn", mixed_precision="bf16").attention_implementation == "cudnn"


_V5E_COMPILE = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jaxdiff import parallel
from jaxdiff.models import nn

devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
mesh = parallel.make_mesh(None, devices=list(devices))
x = jax.ShapeDtypeStruct((8, 96, 2, 40), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))

def loss(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return nn.attention(q, k, v, implementation="splash").astype(jnp.float32).sum()

lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not interpret mode
lowered.compile()
print("compiled for", devices[0].device_kind)
"""


def test_splash_compiles_for_tpu_v5e():
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    # In a subprocess, so this process never loads libtpu.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_V5E_COMPILE)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled for TPU v5 lite" in done.stdout
