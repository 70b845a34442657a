"""benchmarks/tpu_compile.py: the train step compiled for TPU topologies by libtpu on this CPU machine.

The compile runs in a subprocess, so the test process never loads libtpu (its TPU probes stay out of the CPU run).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tpu_compile.py"
GIB = 2**30


@pytest.fixture(scope="module")
def tpu_compile():
    spec = importlib.util.spec_from_file_location("tpu_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_tiny_step_compiles_for_a_v4_8(tiny_sd_path):
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    # v4-8: 4 megacore chips = 4 JAX devices, here as a 2x2 (data x fsdp) mesh; v5e-8 has 8 devices, so the same
    # mesh is refused for it, in its own row, without ending the run.
    # One row per optimizer, each with Pallas' splash attention.
    command = [sys.executable, str(SCRIPT), "--model", str(tiny_sd_path), "--topology", "v4-8,v5e-8", "--mesh", "2x2",
               "--attention_implementation", "splash", "--optimizer", "adamw,adam8bit"]  # fmt: skip
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, env=os.environ, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    v4, v4_8bit, *v5e = (json.loads(line) for line in done.stdout.splitlines())

    assert [row["topology"] for row in v5e] == ["v5e-8"] * 2
    assert all("needs 4 devices but 8 are available" in row["error"] for row in v5e)
    # The splash kernel is compiled into the step (Mosaic custom calls, not interpret mode).
    assert (v4["attention"], v4["optimizer"], v4_8bit["optimizer"]) == ("splash", "adamw", "adam8bit")
    assert v4["pallas_kernels"] > 0 and v4_8bit["pallas_kernels"] == v4["pallas_kernels"]
    # 8-bit Adam: the two moments of the large tensors take 2 bytes per parameter instead of 8 (plus absmax).
    assert v4_8bit["fits"] and v4_8bit["argument_bytes"] < v4["argument_bytes"]
    assert v4_8bit["model_flops"] == v4["model_flops"]

    assert (v4["topology"], v4["device_kind"], v4["devices"], v4["mesh"]) == ("v4-8", "TPU v4", 4, "2x2")
    assert (v4["per_device_batch"], v4["global_batch"], v4["resolution"]) == (1, 4, 32)
    assert v4["fits"] and not v4["gradient_checkpointing"]
    # The compiler's usable HBM: a little under the v4 chip's 32 GiB.
    assert 30 * GIB < v4["hbm_bytes"] <= v4["hbm_spec_bytes"] == 32 * GIB
    # Train state (fp32 UNet, AdamW moments, EMA: ~4 x 1.5 M parameters x 4 bytes, halved by fsdp) plus the frozen
    # models: tens of MB per device, far below HBM.
    assert 5e6 < v4["argument_bytes"] <= v4["peak_bytes"] < 0.01 * v4["hbm_bytes"]
    # Temporaries of one 32 px sample are under 1% of HBM too, so a batch of hundreds fits.
    assert v4["max_batch_estimate"] > 100
    assert v4["model_flops"] == 3 * v4["model_flops_trained_forward"] + v4["model_flops_frozen_forward"]
    assert v4["model_flops_trained_forward"] > 0 and v4["model_flops_frozen_forward"] > 0
    # No recomputation: the compiled step does the model's matmuls plus elementwise work, not a multiple of them.
    assert v4["flops_ratio"] == pytest.approx(v4["flops"] / v4["model_flops"])
    assert 1.0 < v4["flops_ratio"] < 1.6


def test_8bit_update_needs_less_memory_than_adamw_on_a_v5p_8():
    """benchmarks/optimizer_memory.py: the optimizer update alone, compiled for TPU. 8-bit Adam's state is about a
    third of AdamW's for the tiny UNet, and the update's peak must be lower too: an update that dequantizes every
    moment before re-quantizing any (the first version's) peaked at 1.7x AdamW's here."""
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    script = SCRIPT.parent / "optimizer_memory.py"
    command = [sys.executable, str(script), "--model", "tiny", "--topology", "v5p-8", "--mesh", "1x4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    adamw, ours = (json.loads(line) for line in done.stdout.splitlines())
    assert (adamw["optimizer"], ours["optimizer"], ours["mesh"]) == ("adamw", "adam8bit", "1x4")
    assert adamw["param_bytes"] == ours["param_bytes"] > 0
    assert adamw["state_bytes"] == pytest.approx(2 * adamw["param_bytes"], rel=1e-3)  # two float32 moments
    assert ours["state_bytes"] < 0.4 * adamw["state_bytes"]  # measured 0.35: small tensors stay float32
    print(f"update peak per device: AdamW {adamw['peak_bytes']:,} B, 8-bit {ours['peak_bytes']:,} B")
    assert ours["peak_bytes"] < adamw["peak_bytes"]  # measured 0.94 x


def test_tiny_sdxl_step_compiles_for_a_v4_8():
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    command = [sys.executable, str(SCRIPT), "--model", "tiny_sdxl", "--topology", "v4-8", "--mesh", "2x2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = (json.loads(line) for line in done.stdout.splitlines())
    assert (row["model"], row["task"], row["mesh"]) == ("tiny_sdxl", "sdxl", "2x2")
    assert (row["resolution"], row["global_batch"]) == (32, 4)
    assert row["fits"] and row["argument_bytes"] <= row["peak_bytes"] < 0.01 * row["hbm_bytes"]
    # The UNet trains; the VAE encoder and both text encoders run forward only.
    assert row["model_flops_trained_forward"] > 0 and row["model_flops_frozen_forward"] > 0
    assert 1.0 < row["flops_ratio"] < 1.6


def test_dreambooth_step_compiles_with_the_class_images_for_a_v4_8():
    """Prior preservation puts a class image beside each instance image: the UNet and VAE do twice the work of a
    text-to-image step of the same batch."""
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    rows = {}
    for task in ("text_to_image", "dreambooth"):
        command = [sys.executable, str(SCRIPT), "--model", "tiny", "--task", task, "--topology", "v4-8", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        (rows[task],) = (json.loads(line) for line in done.stdout.splitlines())
    plain, dreambooth = rows["text_to_image"], rows["dreambooth"]
    assert dreambooth["task"] == "dreambooth" and dreambooth["fits"]
    assert dreambooth["global_batch"] == plain["global_batch"] == 4
    for key in ("model_flops_trained_forward", "model_flops_frozen_forward"):
        assert dreambooth[key] == 2 * plain[key], key


def test_lcm_step_compiles_with_teacher_and_target_forward_for_a_v4_8():
    """LCM distillation: the student trains as the text-to-image UNet does; the teacher's guided call (2 x batch) and
    the target network's (its EMA parameters, not trained) are three more UNet forwards, counted as frozen."""
    pytest.importorskip("libtpu", reason='libtpu not installed (pip install -e ".[tpu]"): no TPU compiler')
    rows = {}
    for task in ("text_to_image", "lcm"):
        command = [sys.executable, str(SCRIPT), "--model", "tiny", "--task", task, "--topology", "v4-8", "--json"]
        command += ["--no-use_ema"] if task == "text_to_image" else []
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        (rows[task],) = (json.loads(line) for line in done.stdout.splitlines())
    plain, lcm = rows["text_to_image"], rows["lcm"]
    assert lcm["task"] == "lcm" and lcm["fits"] and lcm["global_batch"] == plain["global_batch"]
    unet = plain["model_flops_trained_forward"]
    assert lcm["model_flops_trained_forward"] == pytest.approx(unet, rel=0.01)  # + the guidance projection
    extra = lcm["model_flops_frozen_forward"] - plain["model_flops_frozen_forward"]
    assert extra == pytest.approx(3 * unet, rel=0.02)  # + the text encoder's one row of ""


def _flops_program(params, frozen, x, image):
    h = jax.checkpoint(lambda w, x: x @ w)(params["w"], x)  # (4, 8) @ (8, 16): trained
    gram = jax.jit(lambda x: x @ x.T)(x)  # (4, 8) @ (8, 4): frozen
    h, _ = jax.lax.scan(lambda c, _: (c @ params["m"], None), h, length=3)  # 3 x (4, 16) @ (16, 16): trained
    # NCHW (1, 3, 8, 8) * OIHW (5, 3, 3, 3) -> (1, 5, 6, 6): frozen
    conv = jax.lax.conv_general_dilated(
        image, frozen["k"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return h.sum() + gram.sum() + conv.sum()


def test_flops_are_counted_by_dependence_on_trained_parameters(tpu_compile):
    args = (
        {"m": jnp.ones((16, 16)), "w": jnp.ones((8, 16))},
        {"k": jnp.ones((5, 3, 3, 3))},
        jnp.ones((4, 8)),
        jnp.ones((1, 3, 8, 8)),
    )
    closed = jax.make_jaxpr(_flops_program)(*args)
    depends = [True, True] + [False] * 3
    trained, frozen, outputs = tpu_compile.count_flops(closed.jaxpr, depends)
    assert trained == 2 * 4 * 16 * 8 + 3 * 2 * 4 * 16 * 16
    assert frozen == 2 * 4 * 4 * 8 + 2 * (5 * 6 * 6) * (3 * 3 * 3)
    assert outputs == [True]


def test_built_in_models_have_the_published_parameter_counts(tpu_compile, tmp_path):
    from flax import nnx

    from jaxdiff.tasks import TASKS

    expected = {
        "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
        "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
        "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    }
    settings = {
        "sd15": ("text_to_image", "epsilon", 512),
        "sd21": ("text_to_image", "v_prediction", 768),
        "sdxl": ("sdxl", "epsilon", 1024),
    }
    for model, counts in expected.items():
        pipeline = tpu_compile.write_pipeline(model, tmp_path / model)
        args = tpu_compile.parse_args(["--model", model])
        config = tpu_compile.train_config(args, pipeline, 1, False)
        task = TASKS[config.task](config)  # abstract models: shapes only, no memory
        found = {
            name: sum(p.size for p in jax.tree.leaves(nnx.state(getattr(task, name), nnx.Param))) for name in counts
        }
        assert found == counts, model
        assert (config.task, task.schedule.prediction_type, config.resolution) == settings[model]
        # SD's published VAE configs have no force_upcast: the VAE runs in the bf16 compute dtype; SDXL's sets it.
        assert task.vae_dtype == (jnp.float32 if model == "sdxl" else jnp.bfloat16), model

    # SDXL's batch: both tokenizers' ids (77 each) and the size conditioning; the VAE in float32 (force_upcast).
    batch = task.abstract_batch(2)
    assert {k: v.shape for k, v in batch.items()} == {
        "pixel_values": (2, 3, 1024, 1024),
        "input_ids": (2, 77),
        "input_ids_2": (2, 77),
        "original_size": (2, 2),
        "crop_top_left": (2, 2),
    }
    assert task.vae_dtype == jnp.float32 and task.vae.config.scaling_factor == 0.13025
    assert {k: v.shape for k, v in task.abstract_text(2).items()} == {
        "encoder_hidden_states": (2, 77, 2048),
        "text_embeds": (2, 1280),
    }


def test_bad_input_is_one_message(tpu_compile, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        tpu_compile.main(["--model", "tiny", "--topology", "v5p-8,v9-8"])
    assert exit_info.value.code == 2
    assert "--topology='v9-8': unknown; known: v3-8, v4-8, v5p-8, v5e-8, v6e-8" in capsys.readouterr().err

    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "get_tpu_library_path", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        tpu_compile.main(["--model", "tiny", "--topology", "v5p-8"])
    assert exit_info.value.code == 2
    assert 'libtpu is not installed: pip install -e ".[tpu]"' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tpu_compile.main(["--model", "tiny", "--optimizer", "adamw,sgd"])
    assert exit_info.value.code == 2
    assert "--optimizer='adamw,sgd': allowed: adamw, adam8bit (comma-separated)" in capsys.readouterr().err
