"""The torch backend end to end through `python -m jaxdiff.train --backend torch`, on tiny local pipelines and data."""

import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxdiff.checkpoint import finished_steps
from jaxdiff.train import main
from tests.test_trainer import (
    BASE,
    check_files_honour_the_umask,
    check_validation_runs,
    metrics,
    straight_and_resumed,
    train,
    unet_weights,
)
from torch_backend.checkpoint import TorchCheckpointer

TORCH = ("--backend", "torch")
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s"}


def test_end_to_end_resume_and_export_loads_in_diffusers(tmp_path, tiny_sd_path, shapes_dataset):
    flags = (
        *TORCH, "--train_batch_size", "2", "--use_ema", "--snr_gamma", "5.0", "--gradient_checkpointing",
        "--use_8bit_adam", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--validation_prompts", "a red circle", "--validation_steps", "2",
        "--num_validation_images", "2", "--validation_num_inference_steps", "2", "--random_flip",
        "--report_to", "tensorboard",
    )  # fmt: skip
    out = train(tmp_path, "run", tiny_sd_path, shapes_dataset, *flags, "--max_train_steps", "4")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == METRIC_KEYS for r in rows)  # the JAX trainer's keys (the parity test compares them)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]
    assert len(list((out / "samples").glob("step-*.png"))) == 2  # steps 2 and 4, one prompt
    assert list((out / "logs").glob("events.out.tfevents.*"))

    # Continue the run from its checkpoint for two more steps.
    resume = ("--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    train(tmp_path, "run", tiny_sd_path, shapes_dataset, *flags, *resume)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["6"]
    assert len(list((out / "samples").glob("step-*.png"))) == 3

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    trained, base = unet_weights(out), unet_weights(tiny_sd_path)
    assert any(not np.array_equal(trained[k], base[k]) for k in base)
    # The export holds the EMA weights (as saved in the last checkpoint), not the raw ones.
    ema = torch.load(out / "checkpoints" / "6" / "custom_checkpoint_0.pkl", weights_only=False)
    shadow = [p.numpy() for p in ema["shadow_params"]]
    exported = [p.detach().numpy() for p in pipe.unet.parameters()]
    assert len(shadow) == len(exported) and all(np.array_equal(a, b) for a, b in zip(shadow, exported, strict=True))
    raw = load_file(out / "checkpoints" / "6" / "model.safetensors")
    assert any(not np.array_equal(raw[k], trained[k]) for k in trained)


def test_resume_is_exact_also_after_sigterm(tmp_path, tiny_sd_path, shapes_dataset, monkeypatch):
    flags = (*TORCH, "--use_ema", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2")
    # Stopped after 2 of 4 steps by --max_train_steps, then resumed.
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, shapes_dataset, *flags)

    # Preempted: a real SIGTERM arrives during step 3 (no checkpoint due); the run saves step 3 and exits cleanly.
    save = TorchCheckpointer.save

    def save_and_preempt(self, step, *args, **kwargs):
        if step == 3 and not kwargs.get("force"):
            os.kill(os.getpid(), signal.SIGTERM)
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(TorchCheckpointer, "save", save_and_preempt)
        preempted = train(tmp_path, "preempted", tiny_sd_path, shapes_dataset, *flags, "--max_train_steps", "4")
    assert sorted(p.name for p in (preempted / "checkpoints").iterdir()) == ["2", "3"]
    assert not (preempted / "model_index.json").exists()  # stopped before the export
    train(
        tmp_path, "preempted", tiny_sd_path, shapes_dataset, *flags, "--max_train_steps", "4",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip

    losses = [r["loss"] for r in metrics(straight)]
    assert len(losses) == 4
    for run in (resumed, preempted):
        assert [r["loss"] for r in metrics(run)] == losses
        a, b = unet_weights(straight), unet_weights(run)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sd2_v_prediction_bf16_text_encoder_and_every_loss_option(tmp_path, tiny_sd_v_path, shapes_dataset):
    out = train(
        tmp_path, "v", tiny_sd_v_path, shapes_dataset, *TORCH, "--max_train_steps", "2", "--train_batch_size", "2",
        "--snr_gamma", "5", "--noise_offset", "0.1", "--input_perturbation", "0.1", "--timestep_bias_strategy",
        "later", "--timestep_bias_multiplier", "2", "--loss_type", "huber", "--gradient_checkpointing",
        "--mixed_precision", "bf16", "--train_text_encoder", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--export_dtype", "fp16",
    )  # fmt: skip
    rows = metrics(out)
    assert all(np.isfinite(r["loss"]) for r in rows)
    np.testing.assert_allclose([r["lr"] for r in rows], [0.0, 1e-3], rtol=1e-6)  # warmup, then the cosine's start
    text, base = (
        {k.removeprefix("text_model."): v for k, v in load_file(root / "text_encoder" / "model.safetensors").items()}
        for root in (out, tiny_sd_v_path)
    )
    assert text.keys() == base.keys()
    assert {v.dtype for v in text.values() if v.dtype.kind == "f"} == {np.dtype(np.float16)}
    assert any(not np.array_equal(text[k], base[k].astype(np.float16)) for k in base)  # trained and exported


def _argv(model, data, out, *flags):
    return [
        *BASE, *TORCH, "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--output_dir", str(out), *flags,
    ]  # fmt: skip


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("jaxdiff: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_xformers_without_cuda_is_one_clear_error(tmp_path, tiny_sd_path, shapes_dataset, capsys, monkeypatch):
    argv = _argv(tiny_sd_path, shapes_dataset, tmp_path / "out", "--enable_xformers_memory_efficient_attention")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU" in line
    assert "xformers package is not installed" in line and "no CUDA GPU" in line
    assert "scaled-dot-product attention" in line

    # xformers installed, still no GPU: the message names only what is missing.
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert exc.value.code == 2 and "no CUDA GPU" in line and "not installed" not in line
    assert not (tmp_path / "out").exists()


def test_xformers_error_from_a_real_process(tmp_path, tiny_sd_path, shapes_dataset):
    argv = _argv(tiny_sd_path, shapes_dataset, tmp_path / "out", "--enable_xformers_memory_efficient_attention")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "jaxdiff.train", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "needs xformers and a CUDA GPU" in _one_error_line(result.stderr)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU"),
        (["--cache_latents", "--train_text_encoder"], "--cache_latents caches the text encoder's outputs"),
    ],
)
def test_unavailable_features_are_one_clear_error(
    flags, message, tmp_path, tiny_sd_path, shapes_dataset, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(_argv(tiny_sd_path, shapes_dataset, tmp_path / "out", *flags))
    assert exc.value.code == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_two_processes_train_checkpoint_and_export_together(tmp_path, tiny_sd_path, shapes_dataset):
    # torchrun + ACCELERATE_USE_CPU: accelerate's DDP over gloo, as `accelerate launch` sets it up on GPUs.
    out = tmp_path / "ddp"
    argv = _argv(
        tiny_sd_path, shapes_dataset, out, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--use_ema", "--validation_prompts", "a red circle",
        "--num_validation_images", "1", "--validation_num_inference_steps", "2",
    )  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "jaxdiff.train", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # logged once, by the main process
    assert all(r["samples_per_s"] > 0 for r in rows)
    for step in ("1", "2"):
        names = {p.name for p in (out / "checkpoints" / step).iterdir()}
        assert {"data_state_0.json", "data_state_1.json", "random_states_0.pkl", "random_states_1.pkl"} <= names
    assert len(list((out / "samples").glob("*.png"))) == 1
    assert (out / "model_index.json").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_sd_path, shapes_dataset, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        # 1e36, not the JAX test's 1e38: torch's AdamW computes lr / (1 - beta1) as a float, which must not overflow.
        main(_argv(tiny_sd_path, shapes_dataset, out, "--max_train_steps", "5", "--checkpointing_steps", "1",
                   "--learning_rate", "1e36", "--max_grad_norm", "0"))  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    step = int(err.split(" at step ")[1].split(";")[0])
    assert "loss is nan" in err or "loss is inf" in err
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.isdigit()] == []  # none half-written
    kept = finished_steps(out / "checkpoints")
    assert kept and max(kept) < step


def test_output_dir_is_not_clobbered(tmp_path, tiny_sd_path, shapes_dataset, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(_argv(tiny_sd_path, shapes_dataset, out, "--max_train_steps", "1"))
    assert exc.value.code == 2
    assert "is not empty" in _one_error_line(capsys.readouterr().err)
    assert (out / "precious.txt").read_text() == "keep me"


def test_latent_cache_trains_like_encoding_on_the_fly(tmp_path, tiny_sd_path, shapes_dataset):
    # Host draws: both runs see the same noise, so only the VAE/CLIP batching differs (float noise).
    flags = (*TORCH, "--max_train_steps", "3", "--train_batch_size", "4", "--random_source", "host")
    on_the_fly = train(tmp_path, "pixels", tiny_sd_path, shapes_dataset, *flags)
    cache_dir = tmp_path / "cache"
    cache = ("--cache_latents", "--latent_cache_dir", str(cache_dir))
    cached = train(tmp_path, "cached", tiny_sd_path, shapes_dataset, *flags, *cache)
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(cached)], [r["loss"] for r in metrics(on_the_fly)], rtol=1e-5
    )
    (entry,) = cache_dir.iterdir()  # a second run with the same model, data and transform reuses the cache
    stamp = (entry / "meta.json").stat().st_mtime_ns
    train(tmp_path, "again", tiny_sd_path, shapes_dataset, *flags, *cache)
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]
    assert (entry / "meta.json").stat().st_mtime_ns == stamp


def test_export_cli_from_a_torch_checkpoint(tmp_path, tiny_sd_path, shapes_dataset):
    from jaxdiff.export import main as export_main

    out = train(
        tmp_path, "run", tiny_sd_path, shapes_dataset, *TORCH, "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--use_ema",
    )  # fmt: skip
    export_main(["--checkpoint", str(out / "checkpoints" / "2"), "--output_dir", str(tmp_path / "ema")])
    export_main(["--checkpoint", str(out), "--no-ema", "--output_dir", str(tmp_path / "raw")])
    final, ema, raw = unet_weights(out), unet_weights(tmp_path / "ema"), unet_weights(tmp_path / "raw")
    assert all(np.array_equal(final[k], ema[k]) for k in final)  # the run exported EMA weights too
    assert any(not np.array_equal(ema[k], raw[k]) for k in final)
    checkpoint = load_file(out / "checkpoints" / "2" / "model.safetensors")
    assert all(np.array_equal(raw[k], checkpoint[k]) for k in raw)


def test_validation_at_epoch_ends_and_of_the_final_weights(tmp_path, tiny_sd_path, shapes_dataset):
    check_validation_runs(tmp_path, tiny_sd_path, shapes_dataset, *TORCH, "--train_batch_size", "8")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, tiny_sd_path, shapes_dataset, umask):
    check_files_honour_the_umask(tmp_path, tiny_sd_path, shapes_dataset, umask, *TORCH)
