"""jaxdiff.checkpoint: Orbax round trips across shardings, keep-last-N, unfinished checkpoints, resume, SIGTERM."""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff.checkpoint import Checkpointer, PreemptionGuard, finished_steps, resolve_resume
from jaxdiff.config import ConfigError

DATA_STATE = {"epoch": 1, "position": 37, "seed": 123}


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "fsdp"))


def make_state(mesh: jax.sharding.Mesh, spec: PartitionSpec) -> dict:
    """A small train state: float32 and bfloat16 params sharded by ``spec``, an int32 step and key data."""
    sharding = NamedSharding(mesh, spec)
    replicated = NamedSharding(mesh, PartitionSpec())
    w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7.0
    return {
        "params": {"w": jax.device_put(w, sharding), "b": jax.device_put(w[0].astype(jnp.bfloat16) + 0.1, replicated)},
        "opt_state": {"mu": jax.device_put(-w, sharding)},
        "step": jax.device_put(jnp.int32(4), replicated),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(7)), replicated),
    }


def abstract(tree: dict, sharding_of) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def assert_bit_exact(restored: dict, original: dict) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_round_trip_bit_exact(tmp_path, mesh):
    state = make_state(mesh, PartitionSpec(("data", "fsdp")))
    with Checkpointer(tmp_path / "checkpoints", save_interval_steps=2) as ckpt:
        assert not ckpt.save(3, state, DATA_STATE)  # off the interval
        assert ckpt.save(4, state, DATA_STATE)
        assert not ckpt.save(4, state, DATA_STATE, force=True)  # already saved
        restored, data_state = ckpt.restore(4, abstract(state, lambda x: x.sharding))  # waits for the async save
        assert ckpt.latest_step() == 4
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
        assert (tmp_path / "checkpoints" / "4" / "data_state" / "process_0-of-1.json").is_file()
    assert data_state == DATA_STATE
    assert_bit_exact(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding


def test_restore_onto_other_sharding(tmp_path, mesh):
    state = make_state(mesh, PartitionSpec())  # saved replicated
    target = NamedSharding(mesh, PartitionSpec("fsdp", "data"))
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.save(1, state, DATA_STATE)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:  # a fresh process resuming
        restored, _ = ckpt.restore(1, abstract(state, lambda x: target if x.ndim == 2 else x.sharding))
    w = restored["params"]["w"]
    assert w.sharding == target
    assert len({s.device for s in w.addressable_shards}) == 8 and w.addressable_shards[0].data.shape == (2, 4)
    assert_bit_exact(restored, state)


def test_keep_last_n_and_force(tmp_path, mesh):
    state = make_state(mesh, PartitionSpec())
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
        for step in range(1, 8):
            ckpt.save(step, state, {"position": step})
        assert ckpt.save(9, state, {"position": 9}, force=True)  # off the interval, forced (preemption)
    assert finished_steps(tmp_path) == [6, 9]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "9"]
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
        _, data_state = ckpt.restore(9, abstract(state, lambda x: x.sharding))
    assert data_state == {"position": 9}


def test_unfinished_checkpoints_are_ignored(tmp_path, mesh):
    state = make_state(mesh, PartitionSpec())
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
        assert ckpt.save(2, state, DATA_STATE)
        ckpt.wait_until_finished()
        # Cut off mid-write: Orbax's temporary folder, and a step folder without its commit marker.
        (tmp_path / "4.orbax-checkpoint-tmp-1234567" / "train_state").mkdir(parents=True)
        (tmp_path / "6" / "train_state").mkdir(parents=True)
        (tmp_path / "6" / "data_state").mkdir()
        (tmp_path / "6" / "data_state" / "process_0-of-1.json").write_text("{}")
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [2]
    assert resolve_resume("latest", tmp_path) == (tmp_path / "2", 2)
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint='.*6'.*unfinished.*steps \[2\]"):
        resolve_resume(str(tmp_path / "6"), tmp_path)
    with pytest.raises(ConfigError, match="not a step folder"):
        resolve_resume(str(tmp_path / "4.orbax-checkpoint-tmp-1234567"), tmp_path)


def test_resolve_resume(tmp_path, mesh):
    ckpt_dir = tmp_path / "checkpoints"
    assert resolve_resume(None, ckpt_dir) is None
    assert resolve_resume("latest", ckpt_dir) is None  # no folder yet: fresh start
    ckpt_dir.mkdir()
    assert resolve_resume("latest", ckpt_dir) is None
    state = make_state(mesh, PartitionSpec())
    with Checkpointer(ckpt_dir, save_interval_steps=2) as ckpt:
        for step in (2, 4):
            ckpt.save(step, state, DATA_STATE)
    assert resolve_resume("latest", ckpt_dir) == (ckpt_dir / "4", 4)
    assert resolve_resume(str(ckpt_dir / "2"), ckpt_dir) == (ckpt_dir / "2", 2)
    assert resolve_resume("2", ckpt_dir) == (ckpt_dir / "2", 2)  # a step name inside checkpoints/
    # A new run in another output_dir, resuming from this run's step 2.
    path, step = resolve_resume(str(ckpt_dir / "2"), tmp_path / "other" / "checkpoints")
    with Checkpointer(tmp_path / "other" / "checkpoints", save_interval_steps=2) as ckpt:
        restored, data_state = ckpt.restore(step, abstract(state, lambda x: x.sharding), directory=path.parent)
        assert ckpt.latest_step() is None
    assert_bit_exact(restored, state)
    assert data_state == DATA_STATE
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(tmp_path / "nope"), ckpt_dir)
    message = str(err.value)
    assert "--resume_from_checkpoint" in message and "nope" in message and "no such folder" in message
    assert "[2, 4]" in message and "'latest'" in message
    with pytest.raises(ConfigError, match="not a step folder"):
        resolve_resume(str(ckpt_dir), ckpt_dir)


def test_a_checkpoint_of_another_train_state_is_one_message(tmp_path, mesh):
    state = make_state(mesh, PartitionSpec())
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, state, DATA_STATE)
        other_optimizer = dict(state, opt_state={"mu": state["opt_state"]["mu"], "nu": state["opt_state"]["mu"]})
        other_shape = dict(state, params=dict(state["params"], w=jnp.zeros((4, 8))))
        for other, detail in (
            (other_optimizer, "opt_state/nu: in this run, not in the checkpoint"),
            (other_shape, "params/w: saved (8, 8) float32, this run (4, 8) float32"),
        ):
            with pytest.raises(ConfigError) as err:
                ckpt.restore(1, abstract(other, lambda x: NamedSharding(mesh, PartitionSpec())))
            assert f"checkpoint {tmp_path / '1'} does not fit this run's train state" in str(err.value)
            assert "--use_8bit_adam" in str(err.value) and detail in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"save_interval_steps": 0}, "--checkpointing_steps=0"),
        ({"save_interval_steps": 1, "max_to_keep": 0}, "--checkpoints_total_limit=0"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Checkpointer(tmp_path, **kwargs)


def test_preemption_guard_sets_flag_and_restores_handler():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not guard.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert guard.requested and guard.should_stop(0)
        assert received == []  # the guard's handler ran, not the previous one
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
