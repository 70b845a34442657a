"""jaxdiff.optim against diffusers/torch: schedules, AdamW, accumulation, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxdiff import optim

LR = 1e-4
STEPS = 50


def torch_lrs(name: str, *, warmup: int, total: int, num_cycles: int, power: float, steps: int) -> np.ndarray:
    """The lr each torch optimizer update uses, driving get_scheduler as diffusers' scripts do."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles, power=power
    )
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("name", optim.LR_SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), [(0, 40), (10, 40), (30, 20)])
def test_lr_schedule_matches_diffusers(name: str, warmup: int, total: int) -> None:
    kwargs = {"num_cycles": 3, "power": 2.0}
    expected = torch_lrs(name, warmup=warmup, total=total, steps=STEPS, **kwargs)
    schedule = optim.lr_schedule(name, learning_rate=LR, warmup_steps=warmup, total_steps=total, **kwargs)
    got = jax.jit(schedule)(jnp.arange(STEPS))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=0)


def test_update_k_uses_torch_lr_of_update_k() -> None:
    """Unit gradients: each update's parameter change is -lr, so the per-update lrs line up index for index."""
    kwargs = {"warmup_steps": 5, "total_steps": 20}
    opt = optax.sgd(optim.lr_schedule("linear", learning_rate=LR, **kwargs))
    state = opt.init(jnp.zeros(()))
    update = jax.jit(opt.update)
    ours = []
    for _ in range(25):
        updates, state = update(jnp.ones(()), state)
        ours.append(float(updates))

    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    t_opt = torch.optim.SGD([p], lr=LR)
    sched = get_scheduler("linear", t_opt, num_warmup_steps=5, num_training_steps=20)
    theirs = []
    for _ in range(25):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        t_opt.step()
        sched.step()
        theirs.append(float(p.detach() - before))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert ours[0] == 0.0 and ours[5] == pytest.approx(-LR)


def test_lr_schedule_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="allowed: constant, constant_with_warmup, linear"):
        optim.lr_schedule("cosine_annealing", learning_rate=LR, warmup_steps=0, total_steps=10)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_adamw_matches_torch(max_grad_norm: float) -> None:
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: 3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()} for _ in range(6)]
    hp = {"adam_beta1": 0.9, "adam_beta2": 0.99, "adam_weight_decay": 0.1, "adam_epsilon": 1e-8}

    schedule = optim.lr_schedule("cosine", learning_rate=1e-2, warmup_steps=2, total_steps=6)
    tx = optim.make_optimizer(learning_rate_schedule=schedule, max_grad_norm=max_grad_norm, **hp)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)

    @jax.jit
    def step(grads: dict, state: optax.OptState, params: dict) -> tuple[dict, optax.OptState]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    t_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    t_opt = torch.optim.AdamW(
        t_params.values(),
        lr=1e-2,
        betas=(hp["adam_beta1"], hp["adam_beta2"]),
        eps=hp["adam_epsilon"],
        weight_decay=hp["adam_weight_decay"],
    )
    t_sched = get_scheduler("cosine", t_opt, num_warmup_steps=2, num_training_steps=6)
    for g in grads:
        params, state = step(jax.tree.map(jnp.asarray, g), state, params)
        for k, p in t_params.items():
            p.grad = torch.from_numpy(g[k].copy())
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(t_params.values(), max_grad_norm)
        t_opt.step()
        t_sched.step()
        for k, p in t_params.items():
            np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-6, atol=1e-6)


def linear_loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def linear_problem(batch_size: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}
    batch = {"x": jax.random.normal(k2, (batch_size, 5)), "y": jax.random.normal(k3, (batch_size, 3))}
    return params, batch


def test_split_micro_batches_takes_strided_rows() -> None:
    micro = optim.split_micro_batches({"x": jnp.arange(12).reshape(6, 2)}, 3)["x"]
    assert micro.shape == (3, 2, 2)
    np.testing.assert_array_equal(micro[1], np.arange(12).reshape(6, 2)[1::3])
    with pytest.raises(ValueError, match="not divisible by 4"):
        optim.split_micro_batches({"x": jnp.zeros((6, 2))}, 4)


def test_accumulated_gradients_equal_large_batch() -> None:
    params, batch = linear_problem(8)
    loss_and_grad = jax.value_and_grad(linear_loss)
    expected_loss, expected_grads = loss_and_grad(params, batch)
    loss, grads = jax.jit(lambda p, b: optim.accumulate_gradients(loss_and_grad, p, optim.split_micro_batches(b, 4)))(
        params, batch
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], expected_grads[k], rtol=1e-6, atol=1e-6)


def test_accumulation_on_a_data_sharded_batch() -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params, batch = linear_problem(32)
    loss_and_grad = jax.value_and_grad(linear_loss)
    expected_loss, expected_grads = loss_and_grad(params, batch)
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    step = jax.jit(lambda p, b: optim.accumulate_gradients(loss_and_grad, p, optim.split_micro_batches(b, 2)))
    loss, grads = step(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], expected_grads[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "ema_kwargs",
    [
        {"max_decay": 0.9999},
        {"max_decay": 0.9999, "use_warmup": True, "inv_gamma": 2.0, "power": 0.75, "update_after_step": 3},
        {"max_decay": 0.8, "min_decay": 0.3, "update_after_step": 2},
    ],
)
def test_ema_matches_diffusers(ema_kwargs: dict) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    diffusers_kwargs = {
        "decay": ema_kwargs["max_decay"],
        "min_decay": ema_kwargs.get("min_decay", 0.0),
        "update_after_step": ema_kwargs.get("update_after_step", 0),
        "use_ema_warmup": ema_kwargs.get("use_warmup", False),
        "inv_gamma": ema_kwargs.get("inv_gamma", 1.0),
        "power": ema_kwargs.get("power", 2 / 3),
    }
    ema_torch = EMAModel(module.parameters(), **diffusers_kwargs)
    ema = [jnp.asarray(p.detach().numpy()) for p in module.parameters()]
    decay_fn = jax.jit(lambda step: optim.ema_decay(step, **ema_kwargs))
    for step in range(1, 21):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema_torch.step(module.parameters())
        decay = decay_fn(step)
        np.testing.assert_allclose(decay, ema_torch.cur_decay_value, rtol=1e-6, atol=0)
        ema = optim.ema_update(ema, [jnp.asarray(p.detach().numpy()) for p in module.parameters()], decay)
        for ours, theirs in zip(ema, ema_torch.shadow_params, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)


def test_scaled_learning_rate() -> None:
    kwargs = {"train_batch_size": 4, "gradient_accumulation_steps": 2, "num_devices": 8}
    assert optim.scaled_learning_rate(1e-4, scale_lr=True, **kwargs) == pytest.approx(1e-4 * 64)
    assert optim.scaled_learning_rate(1e-4, scale_lr=False, **kwargs) == 1e-4
