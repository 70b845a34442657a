"""jaxdiff.adam8bit: maps and blockwise quantization against bitsandbytes, state bytes, a 100-step trajectory
against bitsandbytes' AdamW8bit and optax.adamw, meshes, checkpoint resume and composition with clipping."""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxdiff import adam8bit, optim, parallel
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.models import nn
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from jaxdiff.trainer import train_state_shardings

TINY_UNET = {  # tests/fixtures/pipelines.py's tiny SD UNet
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed):
    ours = adam8bit.dynamic_map(signed)
    assert ours.shape == (256,) and np.all(np.diff(ours) > 0)
    assert 0.0 in ours and ours[-1] == 1.0
    assert ours[0] == pytest.approx(-0.99297, abs=1e-5) if signed else ours[0] == 0.0
    np.testing.assert_allclose(ours, F.create_dynamic_map(signed=signed).numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_quantization_matches_bitsandbytes(signed):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096 + 100) * np.repeat(10.0 ** rng.uniform(-4, 1, 17), 256)[:4196]
    x = (x if signed else np.abs(x)).astype(np.float32)
    codes, absmax = adam8bit.quantize_blockwise(jnp.asarray(x), signed)
    assert codes.dtype == (jnp.int8 if signed else jnp.uint8) and absmax.shape == (17,)
    index = np.asarray(codes).astype(np.int32) + (adam8bit.SIGNED_OFFSET if signed else 0)
    theirs, state = F.quantize_blockwise(torch.from_numpy(x), code=F.create_dynamic_map(signed), blocksize=256)
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    differ = index != theirs.numpy().astype(np.int32)
    # Ours is the nearest map value; bitsandbytes' CPU kernel searches the map approximately and picks the
    # neighbour for a few values (3 signed, 10 unsigned of 4196 here).
    assert np.abs(index - theirs.numpy()).max() <= 1 and differ.mean() < 5e-3, differ.sum()
    restored = np.asarray(adam8bit.dequantize_blockwise(codes, absmax))
    scale = np.repeat(np.asarray(absmax), 256)[: x.size]
    gap = np.diff(adam8bit.dynamic_map(signed)).max() / 2  # the coarsest half-step of the map, near +-1
    assert np.all(np.abs(restored - x) <= gap * scale * (1 + 1e-5))
    theirs_restored = F.dequantize_blockwise(theirs, state).numpy()
    np.testing.assert_allclose(restored[~differ], theirs_restored[~differ], rtol=1e-6)


def test_blocks_run_along_the_in_axis():
    x = np.random.default_rng(1).standard_normal((512, 24)).astype(np.float32)
    codes, absmax = adam8bit.quantize_blockwise(jnp.asarray(x), signed=True)
    assert codes.shape == (512, 24) and absmax.shape == (2, 24)
    # bitsandbytes blocks the flattened tensor: the transpose's rows, two blocks each, are our columns.
    theirs, state = F.quantize_blockwise(torch.from_numpy(x.T.copy()), code=F.create_dynamic_map(True), blocksize=256)
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy().reshape(24, 2).T)
    ours = np.asarray(codes).astype(np.int32) + adam8bit.SIGNED_OFFSET
    differ = ours != theirs.numpy().T
    assert np.abs(ours - theirs.numpy().T).max() <= 1 and differ.mean() < 5e-3, differ.sum()
    assert adam8bit.block_axis((3, 3, 32, 64)) == 3 and adam8bit.block_axis((3, 3, 320, 640)) == 2
    assert adam8bit.block_axis((8192,)) == 0 and adam8bit.block_axis((1, 8192)) == 1


def _state_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def test_state_bytes_of_the_tiny_unet():
    unet = nnx.eval_shape(lambda: UNet2DConditionModel.from_config(TINY_UNET))
    params = nnx.state(unet, nnx.Param)
    ours = _state_bytes(jax.eval_shape(adam8bit.scale_by_adam8bit().init, params))
    adamw = _state_bytes(jax.eval_shape(optax.scale_by_adam().init, params))
    expected = 4  # the count
    for p in jax.tree.leaves(params):
        if p.size >= adam8bit.MIN_8BIT_SIZE:
            axis = adam8bit.block_axis(p.shape)
            expected += 2 * p.size + 2 * 4 * p.size // p.shape[axis] * -(-p.shape[axis] // 256)
        else:
            expected += 8 * p.size + 8  # float32 moments and two scalar absmax placeholders
    large = sum(p.size for p in jax.tree.leaves(params) if p.size >= adam8bit.MIN_8BIT_SIZE)
    total = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"tiny UNet: {total} params ({large} in tensors >= 4096), optimizer state {ours} B (8-bit) vs {adamw} B "
        f"(adamw), ratio {ours / adamw:.4f}, expected {expected / adamw:.4f}"
    )
    assert ours == expected
    assert ours / adamw < 0.5


@pytest.mark.parametrize("mesh_spec", ["8x1", "2x4", "1x8"])
def test_every_state_leaf_of_the_tiny_unet_gets_a_valid_sharding(mesh_spec):
    params = nnx.state(nnx.eval_shape(lambda: UNet2DConditionModel.from_config(TINY_UNET)), nnx.Param)
    tx = adam8bit.adamw8bit(1e-4)
    shardings = train_state_shardings(tx, params, parallel.make_mesh(mesh_spec), use_ema=False)["opt_state"]
    abstract = jax.eval_shape(tx.init, params)
    sharded = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)  # raises if a sharded axis does not divide evenly
        sharded += shard != leaf.shape
    assert sharded > 0 if mesh_spec != "8x1" else sharded == 0


def _quadratic_problem(n: int = 8192, steps: int = 100, decades: float = 2):
    """Gradients of 0.5 * sum(c * (p - t)**2) plus pre-drawn noise, curvatures c over ``decades`` decades."""
    rng = np.random.default_rng(0)
    c = (10.0 ** rng.uniform(-decades / 2, decades / 2, n)).astype(np.float32)
    target = rng.standard_normal(n).astype(np.float32)
    noise = rng.standard_normal((steps, n)).astype(np.float32) * 0.1
    p0 = rng.standard_normal(n).astype(np.float32)
    return p0, lambda p, k: c * (p - target) + noise[k]


def test_trajectory_follows_bitsandbytes_and_adamw():
    steps, hyper = 100, {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
    p0, grad = _quadratic_problem(steps=steps)

    def run_optax(tx: optax.GradientTransformation) -> np.ndarray:
        update = jax.jit(lambda g, s, p: tx.update(g, s, p))
        p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
        for k in range(steps):
            updates, state = update(jnp.asarray(grad(np.asarray(p), k)), state, p)
            p = optax.apply_updates(p, updates)
        return np.asarray(p)

    ours, fp32 = run_optax(adam8bit.adamw8bit(**hyper)), run_optax(optax.adamw(**hyper))
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = bnb.optim.AdamW8bit(
        [param], lr=hyper["learning_rate"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
    )  # fmt: skip
    for k in range(steps):
        param.grad = torch.from_numpy(grad(param.detach().numpy(), k))
        opt.step()
    assert opt.state[param]["state1"].dtype == torch.uint8 and opt.state[param]["absmax1"].shape == (8192 // 256,)
    theirs = param.detach().numpy()
    travelled = np.linalg.norm(fp32 - p0)
    figures = {}
    for name, a, b in [("ours-bnb", ours, theirs), ("ours-fp32", ours, fp32), ("bnb-fp32", theirs, fp32)]:
        figures[name] = (np.abs(a - b).max(), np.linalg.norm(a - b) / travelled)
        print(
            f"step {steps} {name}: max abs {figures[name][0]:.3e}, 99th percentile abs "
            f"{np.percentile(np.abs(a - b), 99):.3e}, relative (L2 / L2 travelled by fp32) {figures[name][1]:.3e}"
        )
    # Measured: relative 5.4e-2 (ours-bnb), 5.2e-2 (ours-fp32), 6.5e-2 (bnb-fp32); max abs 0.43, 0.22, 0.42. The
    # two 8-bit runs differ by their quantization noise (bitsandbytes' CPU kernel picks a neighbouring code for a
    # few values), not by a systematic drift: ours is no farther from fp32 than bitsandbytes is.
    for name in figures:
        assert figures[name][0] < 0.6 and figures[name][1] < 8e-2, (name, figures[name])
    assert figures["ours-fp32"][1] < 1.1 * figures["bnb-fp32"][1]


def test_second_moments_beyond_the_maps_range_keep_the_steps_bounded():
    # Curvatures over four decades: a block's second moments span eight, more than the map's seven, so the smallest
    # round below its first value; rounded to 0 under a live first moment they would make steps of m / eps (plain
    # nearest rounding ends 587 away from float32 AdamW here).
    steps, lr = 100, 1e-2
    p0, grad = _quadratic_problem(steps=steps, decades=4)
    txs = {"8bit": adam8bit.adamw8bit(lr, weight_decay=1e-2), "fp32": optax.adamw(lr, weight_decay=1e-2)}
    final, largest = {}, 0.0
    for name, tx in txs.items():
        update = jax.jit(tx.update)
        p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
        for k in range(steps):
            updates, state = update(jnp.asarray(grad(np.asarray(p), k)), state, p)
            p = optax.apply_updates(p, updates)
            largest = max(largest, float(jnp.abs(updates).max())) if name == "8bit" else largest
        final[name] = np.asarray(p)
    distance = np.abs(final["8bit"] - final["fp32"]).max()
    print(f"curvatures over 4 decades: largest 8-bit step {largest:.2e} (lr {lr}), max abs from fp32 {distance:.3f}")
    assert largest <= 2 * lr  # Adam's steps stay near lr; measured 1.6e-2
    assert distance < 1.0  # measured 0.47


class _Tiny(nnx.Module):
    def __init__(self) -> None:
        rngs = nnx.Rngs(0)
        self.linear = nn.linear(512, 64, rngs=rngs)  # 8-bit, blocks along `in`: absmax (2, 64) shards like it
        self.conv = nn.conv(32, 64, 3, rngs=rngs)  # 8-bit, blocks along `out`: absmax replicated on fsdp
        self.small = nn.linear(16, 8, rngs=rngs)  # float32 moments


def _params():
    return nnx.state(_Tiny(), nnx.Param)


def _tx():
    schedule = optim.lr_schedule("linear", learning_rate=1e-2, warmup_steps=2, total_steps=10)
    return optim.make_optimizer(
        learning_rate_schedule=schedule, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
        adam_epsilon=1e-8, max_grad_norm=1.0, use_8bit=True,
    )  # fmt: skip


def _setup(mesh_spec: str):
    tx, params = _tx(), _params()
    mesh = parallel.make_mesh(mesh_spec)
    shardings = train_state_shardings(tx, params, mesh, use_ema=False)
    noise = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)

    def step(state: dict) -> dict:
        grads = jax.tree.map(lambda p, n: n + 0.1 * p, state["params"], noise)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}

    init = jax.jit(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.int32(0), "rng": jax.random.key_data(
            jax.random.key(0))},
        out_shardings=shardings,
    )  # fmt: skip
    return init(params), jax.jit(step, in_shardings=(shardings,), out_shardings=shardings), shardings


def _run(state: dict, step, n: int) -> dict:
    for _ in range(n):
        state = step(state)
    return state


def test_meshes_give_the_same_steps():
    results = {}
    for spec in ("8x1", "2x4", "1x8"):
        state, step, _ = _setup(spec)
        results[spec] = jax.device_get(_run(state, step, 4))
        if spec == "1x8":
            state = _run(state, step, 1)
            for name, absmax_spec in (("linear", (None, "fsdp")), ("conv", (None, None, None, None))):
                kernel = state["params"][name]["kernel"][...]
                adam = state["opt_state"][1][0]
                assert kernel.sharding.spec[-1] == "fsdp"
                for codes in (adam.mu[name]["kernel"][...], adam.nu[name]["kernel"][...]):
                    assert codes.dtype in (jnp.int8, jnp.uint8) and codes.sharding == kernel.sharding
                for absmax in (adam.mu_absmax[name]["kernel"][...], adam.nu_absmax[name]["kernel"][...]):
                    assert tuple(absmax.sharding.spec) + (None,) * (4 - absmax.ndim) == absmax_spec + (None,) * (
                        4 - absmax.ndim
                    )
            assert state["opt_state"][1][0].mu["linear"]["kernel"][...].addressable_shards[0].data.shape == (512, 8)
    # The global norm of the clipping sums over shards in a mesh-dependent order (one-ulp differences).
    for spec in ("2x4", "1x8"):
        worst, codes_differ = 0.0, 0
        for got, want in zip(jax.tree.leaves(results[spec]), jax.tree.leaves(results["8x1"]), strict=True):
            if got.dtype in (np.int8, np.uint8):
                codes_differ += int((got != want).sum())
            else:
                worst = max(worst, float(np.abs(got - want).max()))
        print(f"{spec} vs 8x1 after 4 steps: max abs difference {worst:.3e}, codes that differ {codes_differ}")
        assert worst <= 1e-6 and codes_differ == 0


def test_checkpoint_resume_is_bit_exact(tmp_path):
    state, step, shardings = _setup("2x4")
    state = _run(state, step, 2)
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
        assert ckpt.save(2, state, {"position": 2})
    uninterrupted = jax.device_get(_run(state, step, 3))
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.device_get(state), shardings
    )
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
        restored, _ = ckpt.restore(2, abstract)
    assert restored["opt_state"][1][0].mu["linear"]["kernel"][...].dtype == jnp.int8
    resumed = jax.device_get(_run(restored, step, 3))
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    print("resume at step 2, 3 more steps: bit-identical to uninterrupted")


def test_composition_equals_adamw():
    params = _params()
    schedule = optim.lr_schedule("cosine", learning_rate=1e-2, warmup_steps=0, total_steps=10)
    kwargs = dict(
        learning_rate_schedule=schedule, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.1, adam_epsilon=1e-8,
        max_grad_norm=1.0,
    )  # fmt: skip
    ours, theirs = optim.make_optimizer(**kwargs, use_8bit=True), optim.make_optimizer(**kwargs)
    ours, theirs = (optax.GradientTransformation(tx.init, jax.jit(tx.update)) for tx in (ours, theirs))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    # Equal to float32 rounding, not bit for bit: XLA:CPU rounds a leaf's elementwise Adam arithmetic differently
    # depending on the other leaves in the program (optax.scale_by_adam's own update of a (16, 8) leaf changes in
    # 63 of 128 entries, by an ulp or two, when a (512, 64) leaf joins the tree).
    rounding = dict(rtol=1e-6, atol=0)
    for k in range(3):
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
        # float32 moments: adamw at every step; 8-bit: the first step, whose moments start at exactly 0.
        np.testing.assert_allclose(u_ours["small"]["kernel"][...], u_theirs["small"]["kernel"][...], **rounding)
        if k == 0:
            assert float(jnp.abs(u_ours["linear"]["kernel"][...]).max()) > 0
            for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True):
                np.testing.assert_allclose(a, b, **rounding)
    assert not np.array_equal(u_ours["linear"]["kernel"][...], u_theirs["linear"]["kernel"][...])  # 8-bit moments
    # Zero gradients leave zero moments: the update is the decoupled decay alone, as adamw's.
    zeros = jax.tree.map(jnp.zeros_like, params)
    u_ours, _ = ours.update(zeros, ours.init(params), params)
    u_theirs, _ = theirs.update(zeros, theirs.init(params), params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(u_ours["linear"]["kernel"][...]).max()) > 0
