"""The JAX trainer end to end on tiny local pipelines and data, on 8 simulated devices."""

import gc
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxdiff import parallel
from jaxdiff.checkpoint import Checkpointer, finished_steps
from jaxdiff.train import main

BASE = [
    "--resolution", "32",
    "--center_crop",
    "--train_batch_size", "1",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    "--seed", "0",
    "--report_to", "none",
    "--logging_steps", "1",
]  # fmt: skip


def train(tmp_path, name, model, data, *flags):
    """Run the CLI; `data` is an image folder or a list of data flags."""
    out = tmp_path / name
    data_flags = data if isinstance(data, list) else ["--train_data_dir", str(data)]
    argv = [*BASE, "--pretrained_model_name_or_path", str(model), *data_flags]
    try:
        main([*argv, "--output_dir", str(out), *flags])
    except SystemExit as exc:
        raise AssertionError(f"training exited with {exc.code}") from None
    return out


def straight_and_resumed(tmp_path, model, data, *flags, steps=4):
    """(a run of ``steps`` steps, the same run stopped by --max_train_steps halfway and resumed from its
    checkpoint): output folders "straight" and "resumed"."""
    straight = train(tmp_path, "straight", model, data, *flags, "--max_train_steps", str(steps))
    train(tmp_path, "resumed", model, data, *flags, "--max_train_steps", str(steps // 2))
    resume = ("--max_train_steps", str(steps), "--resume_from_checkpoint", "latest")
    return straight, train(tmp_path, "resumed", model, data, *flags, *resume)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet_weights(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def sample_steps(out):
    """The steps of the validation grids in ``out/samples`` (one prompt), in order."""
    return sorted(int(p.name.split("_")[0].removeprefix("step-")) for p in (out / "samples").glob("step-*.png"))


VALIDATE = ("--validation_prompts", "a red circle", "--num_validation_images", "1",
            "--validation_num_inference_steps", "1")  # fmt: skip


def check_validation_runs(tmp_path, model, data, *backend):
    """An epoch that ends with a run's last step is validated, and the final weights always are, once."""
    # 24 samples, 8 per step: epochs end after steps 3 and 6, the last one.
    epochs = train(tmp_path, "epochs", model, data, *backend, *VALIDATE, "--num_train_epochs", "2",
                   "--validation_epochs", "1")  # fmt: skip
    assert sample_steps(epochs) == [3, 6]
    steps = train(tmp_path, "steps", model, data, *backend, *VALIDATE, "--max_train_steps", "3",
                  "--validation_steps", "2")  # fmt: skip
    assert sample_steps(steps) == [2, 3]


def check_files_honour_the_umask(tmp_path, model, data, umask, *backend):
    """Everything a run writes into output_dir (export, config, metrics, samples, checkpoints, logs, latent cache)
    gets the umask's mode; the run is a bf16 one from cached latents and text states, which must train."""
    previous = os.umask(umask)
    try:
        out = train(tmp_path, "run", model, data, *backend, *VALIDATE, "--max_train_steps", "2",
                    "--checkpointing_steps", "1", "--report_to", "tensorboard", "--mixed_precision", "bf16",
                    "--cache_latents")  # fmt: skip
    finally:
        os.umask(previous)
    assert all(np.isfinite(r["loss"]) for r in metrics(out)) and len(metrics(out)) == 2
    files = [p for p in out.rglob("*") if p.is_file()]
    for name in ("model_index.json", "config.yaml", "metrics.jsonl", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "samples/step-0000002_00_a-red-circle.png"):  # fmt: skip
        assert out / name in files, name
    assert any(p.suffix == ".npy" for p in files) and any(p.parts[-2] == "logs" for p in files)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in files}
    expected = 0o666 & ~umask
    assert {name: oct(mode) for name, mode in modes.items() if mode != expected} == {}


def test_end_to_end_export_loads_in_diffusers(tmp_path, tiny_sd_path, shapes_dataset):
    out = train(
        tmp_path, "run", tiny_sd_path, shapes_dataset,
        "--max_train_steps", "4", "--use_ema", "--snr_gamma", "5.0", "--gradient_accumulation_steps", "2",
        "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--use_8bit_adam",
        "--validation_prompts", "a red circle", "--validation_steps", "2", "--num_validation_images", "2",
        "--validation_num_inference_steps", "2", "--random_flip", "--report_to", "tensorboard",
    )  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s"} <= set(rows[0])
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]
    assert len(list((out / "samples").glob("*.png"))) == 2  # steps 2 and 4, one prompt
    assert list((out / "logs").glob("events.out.tfevents.*"))

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    trained, base = unet_weights(out), unet_weights(tiny_sd_path)
    assert any(not np.array_equal(trained[k], base[k]) for k in base)


def test_resume_is_exact_also_after_sigterm(tmp_path, tiny_sd_path, shapes_dataset, monkeypatch):
    flags = ("--use_ema", "--checkpointing_steps", "2", "--max_train_steps", "4")
    # Stopped after 2 of 4 steps by --max_train_steps, then resumed.
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, shapes_dataset, *flags[:-2])

    # Preempted: a real SIGTERM arrives during step 3 (no checkpoint due); the run saves step 3 and exits cleanly.
    save = Checkpointer.save

    def save_and_preempt(self, step, *args, **kwargs):
        if step == 3 and not kwargs.get("force"):
            os.kill(os.getpid(), signal.SIGTERM)
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_and_preempt)
        preempted = train(tmp_path, "preempted", tiny_sd_path, shapes_dataset, *flags)
    assert sorted(p.name for p in (preempted / "checkpoints").iterdir()) == ["2", "3"]
    assert not (preempted / "model_index.json").exists()  # stopped before the export
    train(tmp_path, "preempted", tiny_sd_path, shapes_dataset, *flags, "--resume_from_checkpoint", "latest")

    losses = [r["loss"] for r in metrics(straight)]
    for run in (resumed, preempted):
        assert [r["loss"] for r in metrics(run)] == losses
        a, b = unet_weights(straight), unet_weights(run)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_accumulation_equals_a_larger_batch(tmp_path, tiny_sd_path, shapes_dataset):
    # A large Adam epsilon keeps updates proportional to gradients, so only reduction-order noise differs.
    flags = ("--max_train_steps", "2", "--adam_epsilon", "1e-3")
    accumulated = train(tmp_path, "accum", tiny_sd_path, shapes_dataset, *flags, "--gradient_accumulation_steps", "2")
    large = train(tmp_path, "large", tiny_sd_path, shapes_dataset, *flags, "--global_batch_size", "16")
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(accumulated)], [r["loss"] for r in metrics(large)], rtol=1e-5
    )
    a, b = unet_weights(accumulated), unet_weights(large)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_sd2_v_prediction_with_every_loss_option(tmp_path, tiny_sd_v_path, shapes_dataset):
    out = train(
        tmp_path, "v", tiny_sd_v_path, shapes_dataset, "--max_train_steps", "2",
        "--snr_gamma", "5", "--noise_offset", "0.1", "--input_perturbation", "0.1", "--timestep_bias_strategy",
        "later", "--timestep_bias_multiplier", "2", "--gradient_checkpointing", "--mixed_precision", "bf16",
        "--train_text_encoder", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--attention_implementation",
        "chunked", *VALIDATE,
    )  # fmt: skip
    rows = metrics(out)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert sample_steps(out) == [2]  # sampling a model built with gradient checkpointing
    np.testing.assert_allclose([r["lr"] for r in rows], [0.0, 1e-3], rtol=1e-6)  # warmup, then the cosine's start
    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix; jaxdiff writes SD's layout.
    text, base = (
        {k.removeprefix("text_model."): v for k, v in load_file(root / "text_encoder" / "model.safetensors").items()}
        for root in (out, tiny_sd_v_path)
    )
    assert text.keys() == base.keys()
    assert any(not np.array_equal(text[k], base[k]) for k in base)  # the text encoder was trained and exported


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_sd_path, shapes_dataset, capsys):
    argv = [*BASE, "--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--output_dir", str(out), "--max_train_steps", "5", "--checkpointing_steps", "1",
              "--learning_rate", "1e38", "--max_grad_norm", "0"])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    step = int(err.split(" at step ")[1].split(";")[0])
    assert "loss is nan" in err or "loss is inf" in err
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.isdigit()] == []  # none half-written
    kept = finished_steps(out / "checkpoints")
    assert kept and max(kept) < step


def test_meshes_agree(tmp_path, tiny_sd_path, shapes_dataset, monkeypatch):
    # Adam's first steps move every weight by about +-lr whatever the gradient's size, so a weight whose gradient
    # is ~0 could flip on reduction-order noise; a large epsilon makes the update proportional to the gradient,
    # so weights differ by float32 reduction noise only.
    flags = ("--max_train_steps", "2", "--adam_epsilon", "1e-3")
    results = {}
    for mesh in ("8x1", "2x4", "1x8"):
        out = train(tmp_path, mesh, tiny_sd_path, shapes_dataset, *flags, "--mesh", mesh)
        results[mesh] = (metrics(out), unet_weights(out))
    # One device, the same global batch of 8.
    make_mesh = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh", lambda spec, devices=None: make_mesh("1x1", jax.devices()[:1]))
    out = train(tmp_path, "single", tiny_sd_path, shapes_dataset, *flags, "--global_batch_size", "8")
    reference_rows, reference = metrics(out), unet_weights(out)
    for mesh, (rows, weights) in results.items():
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference_rows], rtol=1e-5)
        for k in reference:
            np.testing.assert_allclose(weights[k], reference[k], atol=1e-5, err_msg=f"{mesh} {k}")


def test_output_dir_is_not_clobbered(tmp_path, tiny_sd_path, shapes_dataset, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = [*BASE, "--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--output_dir", str(out), "--max_train_steps", "1"])
    assert exc.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("source", ["csv", "hf_dataset", "tfds", "webdataset", "corrupt"])
def test_each_data_source_trains(source, request, tmp_path, tiny_sd_path):
    fixture = {
        "csv": "imagefolder_csv",
        "hf_dataset": "hf_dataset_dir",
        "tfds": "tfds_data_dir",
        "webdataset": "webdataset_shards",
        "corrupt": "corrupt_imagefolder",
    }[source]
    value = request.getfixturevalue(fixture)
    data = {
        "csv": lambda: ["--train_data_dir", str(value)],
        "hf_dataset": lambda: [
            "--dataset_name",
            str(value),
            "--image_column",
            "picture",
            "--caption_column",
            "description",
        ],
        "tfds": lambda: ["--dataset_name", "tfds:tiny_shapes", "--tfds_data_dir", str(value)],
        "webdataset": lambda: ["--train_shards_path_or_url", value],
        "corrupt": lambda: ["--train_data_dir", str(value[0])],
    }[source]()
    out = train(tmp_path, source, tiny_sd_path, data, "--max_train_steps", "2", "--checkpointing_steps", "2")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    if source == "corrupt":
        _, unreadable, empty = value
        skipped = {k: v for k, v in rows[-1].items() if k.startswith("skipped_")}
        assert sum(skipped.values()) >= unreadable + empty > 0


def test_training_lowers_the_loss(tmp_path, tiny_sd_path, shapes_dataset):
    out = train(
        tmp_path, "learn", tiny_sd_path, shapes_dataset,
        "--max_train_steps", "40", "--learning_rate", "2e-3", "--checkpointing_steps", "40",
        "--validation_prompts", "a red circle", "a blue square", "--validation_num_inference_steps", "2",
    )  # fmt: skip
    # No validation interval: the final weights are sampled once, one grid per prompt.
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-0000040_00_a-red-circle.png",
        "step-0000040_01_a-blue-square.png",
    ]
    losses = [r["loss"] for r in metrics(out)]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.5 * first, (first, last)


def test_export_cli_from_any_checkpoint(tmp_path, tiny_sd_path, shapes_dataset):
    from jaxdiff.export import main as export_main

    out = train(
        tmp_path, "run", tiny_sd_path, shapes_dataset, "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--use_ema",
    )  # fmt: skip
    export_main(["--checkpoint", str(out / "checkpoints" / "2"), "--output_dir", str(tmp_path / "ema")])
    export_main(["--checkpoint", str(out), "--no-ema", "--output_dir", str(tmp_path / "raw")])
    final, ema, raw = unet_weights(out), unet_weights(tmp_path / "ema"), unet_weights(tmp_path / "raw")
    assert all(np.array_equal(final[k], ema[k]) for k in final)  # the run exported EMA weights too
    assert any(not np.array_equal(ema[k], raw[k]) for k in final)


def test_latent_cache_trains_like_encoding_on_the_fly(tmp_path, tiny_sd_path, shapes_dataset):
    flags = ("--max_train_steps", "3", "--adam_epsilon", "1e-3")
    on_the_fly = train(tmp_path, "pixels", tiny_sd_path, shapes_dataset, *flags)
    cache_dir = tmp_path / "cache"
    cached = train(
        tmp_path,
        "cached",
        tiny_sd_path,
        shapes_dataset,
        *flags,
        "--cache_latents",
        "--latent_cache_dir",
        str(cache_dir),
    )
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(cached)], [r["loss"] for r in metrics(on_the_fly)], rtol=1e-5
    )
    a, b = unet_weights(cached), unet_weights(on_the_fly)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    (entry,) = cache_dir.iterdir()  # a second run with the same model, data and transform reuses the cache
    stamp = (entry / "meta.json").stat().st_mtime_ns
    train(
        tmp_path,
        "again",
        tiny_sd_path,
        shapes_dataset,
        *flags,
        "--cache_latents",
        "--latent_cache_dir",
        str(cache_dir),
    )
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]
    assert (entry / "meta.json").stat().st_mtime_ns == stamp


def test_validation_at_epoch_ends_and_of_the_final_weights(tmp_path, tiny_sd_path, shapes_dataset):
    check_validation_runs(tmp_path, tiny_sd_path, shapes_dataset)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, tiny_sd_path, shapes_dataset, umask):
    check_files_honour_the_umask(tmp_path, tiny_sd_path, shapes_dataset, umask)


def test_host_random_source_feeds_the_step(tmp_path, tiny_sd_path, shapes_dataset):
    from jaxdiff import cli
    from jaxdiff.trainer import HOST_RANDOMS, Trainer

    config = cli.resolve(
        cli.validate(
            {
                "pretrained_model_name_or_path": str(tiny_sd_path),
                "train_data_dir": str(shapes_dataset),
                "output_dir": str(tmp_path / "host"),
                "resolution": 32,
                "center_crop": True,
                "train_batch_size": 1,
                "noise_offset": 0.1,
                "random_source": "host",
                "max_train_steps": 1,
                "report_to": "none",
                "seed": 0,
            }
        )
    )
    trainer = Trainer(config)
    host_batch = trainer.host_batch(0)
    draws = trainer.task.draw_host(0, trainer.batch_size)
    assert all(np.array_equal(host_batch[HOST_RANDOMS][k], draws[k]) for k in draws)
    batch = trainer.global_batch(host_batch)
    data = {k: v for k, v in batch.items() if k != HOST_RANDOMS}
    expected, _ = trainer.task.loss(trainer.program.models(trainer.state["params"], trainer.frozen), data, draws)
    _, step_metrics = trainer.compile_step(batch)(trainer.state, trainer.frozen, batch)
    np.testing.assert_allclose(float(step_metrics["loss"]), float(expected), rtol=1e-5)


def test_no_device_holds_an_unsharded_unet_after_start_up(tmp_path, tiny_sd_path, shapes_dataset):
    from jaxdiff import cli
    from jaxdiff.models import UNet2DConditionModel
    from jaxdiff.trainer import Trainer

    argv = [*BASE, "--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    config, _ = cli.parse_args([*argv, "--output_dir", str(tmp_path / "out"), "--mesh", "1x8", "--use_ema"])
    trainer = Trainer(cli.resolve(config))
    unet_shapes = {
        tuple(v.shape)
        for v in jax.tree.leaves(nnx.state(UNet2DConditionModel.from_pretrained(tiny_sd_path, "unet"), nnx.Param))
    }
    unet_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state["params"]))
    gc.collect()
    live = jax.live_arrays()
    per_device = {device: 0 for device in jax.devices()}
    for array in live:
        for shard in array.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
        # Every UNet-shaped array large enough to split 8 ways is split: parameters, Adam moments, EMA.
        if tuple(array.shape) in unet_shapes and array.size >= 1024:
            assert not array.sharding.is_fully_replicated, f"unsharded {array.shape} {array.sharding}"
    # params + two Adam moments + EMA, each an eighth, plus the replicated norms and the frozen models' eighths.
    assert max(per_device.values()) < unet_bytes, (per_device, unet_bytes)
    # Balanced: what only one device holds (the noise schedule's small tables) is far below an eighth.
    assert max(per_device.values()) - min(per_device.values()) < unet_bytes / 8, per_device
