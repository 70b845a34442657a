"""The command line: precedence, help, and one clear message with exit code 2 for every bad input."""

import json
import subprocess
import sys

import pytest
import yaml

from jaxdiff import cli
from jaxdiff.config import TrainConfig
from jaxdiff.train import main


def run_main(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def sd_folder(tmp_path):
    """A folder that looks like a diffusers SD pipeline to task inference, plus an image folder."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    data = tmp_path / "data"
    data.mkdir()
    return model, data


def test_help_lists_every_field_grouped():
    out = subprocess.run(
        [sys.executable, "-m", "jaxdiff.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in TrainConfig.model_fields:
        assert f"--{name}" in out, name
    for group in ("Model:", "Data:", "Optimizer:", "LCM distillation:", "Checkpoints:"):
        assert group in out


def test_precedence_defaults_yaml_cli(tmp_path, sd_folder, capsys):
    model, data = sd_folder
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 3e-5, "resolution": 256, "train_data_dir": str(data)}))
    argv = ["--config", str(config), "--resolution", "128", "--pretrained_model_name_or_path", str(model)]
    code, out, _ = run_main([*argv, "--print_config", "--seed", "7"], capsys)
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["learning_rate"] == 3e-5  # YAML over default
    assert resolved["resolution"] == 128  # CLI over YAML
    assert resolved["adam_beta2"] == 0.999  # default
    assert resolved["task"] == "text_to_image"  # inferred from model_index.json
    assert resolved["seed"] == 7


def test_seed_is_drawn_and_recorded(sd_folder, capsys):
    model, data = sd_folder
    code, out, _ = run_main(
        ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--print_config"], capsys
    )
    assert code == 0 and isinstance(yaml.safe_load(out)["seed"], int)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--learnig_rate", "1e-4"], "unknown flag --learnig_rate; did you mean --learning_rate?"),
        (["--backend", "tpu"], "--backend='tpu': Input should be 'jax' or 'torch'"),
        (["--resolution", "big"], "--resolution='big': must be N (a square) or HxW (height x width)"),
        (["--resolution", "0x64"], "--resolution='0x64': must be N (a square) or HxW"),
        (["--lr_scheduler", "cosin"], "--lr_scheduler='cosin': Input should be 'constant'"),
        (["--mesh", "8by1"], "--mesh='8by1': must be 'DxM'"),
        (["--train_batch_size", "0"], "--train_batch_size='0': Input should be greater than 0"),
        (["--pretrained_model_name_or_path", "./no/such/model"], "--pretrained_model_name_or_path='./no/such/model'"),
        (["--config", "missing.yaml"], "--config missing.yaml: file not found"),
    ],
)
def test_bad_input_is_one_message_exit_2(argv, expected, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert expected in err
    assert err.startswith("jaxdiff: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("value", "resolution", "size"),
    [("512", 512, (512, 512)), ("768x1024", (768, 1024), (768, 1024)), ("96,64", (96, 64), (96, 64)),
     ("64x64", 64, (64, 64)), ([48, 32], (48, 32), (48, 32))],
)  # fmt: skip
def test_resolution_is_a_square_or_height_by_width(value, resolution, size):
    config = cli.validate({"resolution": value})
    assert config.resolution == resolution and config.image_size == size
    assert cli.validate(yaml.safe_load(cli.to_yaml(config))).image_size == size  # config.yaml reads back


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_resolution_the_model_cannot_map_back_is_refused(backend, tiny_sd_path, shapes_dataset, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    argv += ["--backend", backend, "--resolution", "32x30", "--output_dir", str(tmp_path / "out")]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "--resolution=(32, 30): each side must be a multiple of 4 for this model" in err
    assert not (tmp_path / "out").exists()


def test_unknown_yaml_key_did_you_mean(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("snr_gama: 5.0\n")
    code, _, err = run_main(["--config", str(config)], capsys)
    assert code == 2 and "unknown key 'snr_gama'; did you mean --snr_gamma?" in err


def test_missing_paths(sd_folder, capsys):
    model, _ = sd_folder
    code, _, err = run_main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", "/no/data"], capsys)
    assert code == 2 and "--train_data_dir='/no/data': no such file or folder" in err
    code, _, err = run_main(["--pretrained_model_name_or_path", str(model), "--dataset_name", "/no/ds"], capsys)
    assert code == 2 and "--dataset_name='/no/ds'" in err


def test_task_cannot_be_inferred(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, _, err = run_main(
        ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path / "data")], capsys
    )
    assert code == 2 and "cannot infer the task" in err and "pass --task" in err


def test_flag_unsupported_by_task_or_backend_is_refused(sd_folder, capsys):
    model, data = sd_folder
    base = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    code, _, err = run_main([*base, "--num_ddim_timesteps", "50"], capsys)
    assert code == 2 and "--num_ddim_timesteps does not apply to task text_to_image" in err
    code, _, err = run_main([*base, "--enable_xformers_memory_efficient_attention"], capsys)
    assert code == 2 and "--enable_xformers_memory_efficient_attention is not supported by the jax backend" in err


def test_mesh_must_fit_the_devices(sd_folder, capsys):
    model, data = sd_folder
    base = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    code, _, err = run_main([*base, "--mesh", "4x4"], capsys)
    assert code == 2
    assert "--mesh='4x4' needs 16 devices but 8 are available; meshes that fit: 8x1, 4x2, 2x4, 1x8" in err


def test_global_batch_must_divide_over_the_mesh(sd_folder, capsys):
    model, data = sd_folder
    base = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    code, _, err = run_main([*base, "--mesh", "2x4", "--global_batch_size", "12"], capsys)
    assert code == 2 and "--global_batch_size=12 does not divide over the 8 devices of mesh 2x4" in err


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.train", "--snr_gamma", "-1"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--snr_gamma='-1': Input should be greater than 0" in proc.stderr


def test_a_pipeline_without_a_unet_2d_model_is_one_message(sd_folder, capsys):
    model, data = sd_folder
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--task", "unconditional"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--pretrained_model_name_or_path={str(model)!r} has no unet/config.json" in err
