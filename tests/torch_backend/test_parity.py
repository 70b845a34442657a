"""Cross-backend parity: the same config, weights and host-drawn randoms give the same losses on JAX and torch."""

import numpy as np
import pytest

from jaxdiff import cli
from jaxdiff.trainer import Trainer
from tests.test_trainer import metrics
from torch_backend.trainer import Trainer as TorchTrainer

STEPS = 5


def config(model, data, out, backend, **extra):
    values = {
        "backend": backend,
        "pretrained_model_name_or_path": str(model),
        **({"train_data_dir": str(data)} if data else {}),
        "output_dir": str(out),
        "resolution": 32,
        "center_crop": True,
        # 8 samples per step on both: the JAX backend splits them over its 8 (simulated) devices.
        "train_batch_size": 1 if backend == "jax" else 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "max_train_steps": STEPS,
        "seed": 0,
        "report_to": "none",
        "logging_steps": 1,
        "random_source": "host",
        **extra,
    }
    return cli.resolve(cli.validate(values))


@pytest.mark.parametrize(
    "case, extra",
    [
        ("plain", {}),
        ("snr_gamma", {"snr_gamma": 5.0}),
        ("noise_offset", {"noise_offset": 0.1}),
        ("v_prediction", {}),
        ("lora", {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 5e-2}),
        ("lora_text_encoder", {"lora_rank": 4, "train_text_encoder": True, "learning_rate": 5e-2}),
    ],
)
def test_losses_match_across_backends(case, extra, request, tmp_path, shapes_dataset):
    model = request.getfixturevalue("tiny_sd_v_path" if case == "v_prediction" else "tiny_sd_path")
    Trainer(config(model, shapes_dataset, tmp_path / "jax", "jax", **extra)).train()
    TorchTrainer(config(model, shapes_dataset, tmp_path / "torch", "torch", **extra)).train()
    jax_rows, torch_rows = metrics(tmp_path / "jax"), metrics(tmp_path / "torch")
    assert [set(r) for r in torch_rows] == [set(r) for r in jax_rows]  # the same metrics.jsonl keys
    np.testing.assert_allclose([r["lr"] for r in torch_rows], [r["lr"] for r in jax_rows], rtol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in torch_rows], [r["loss"] for r in jax_rows], rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_dreambooth_prior_preservation_losses_match_across_backends(lora, tmp_path, tiny_sd_path, dreambooth_folders):
    """DreamBooth with prior preservation (Min-SNR on the instance half, prior weight 0.5): the loss and its two
    parts per step, from the same class images."""
    instance, class_dir = dreambooth_folders
    extra = {
        "instance_data_dir": str(instance),
        "instance_prompt": "a red circle",
        "with_prior_preservation": True,
        "class_data_dir": str(class_dir),
        "class_prompt": "a circle",
        "num_class_images": 4,
        "prior_loss_weight": 0.5,
        "snr_gamma": 5.0,
        **({"lora_rank": 4, "learning_rate": 5e-2} if lora else {}),
    }
    configs = {
        backend: config(tiny_sd_path, None, tmp_path / backend, backend, task="dreambooth", **extra)
        for backend in ("jax", "torch")
    }
    Trainer(configs["jax"]).train()
    TorchTrainer(configs["torch"]).train()
    jax_rows, torch_rows = metrics(tmp_path / "jax"), metrics(tmp_path / "torch")
    assert [set(r) for r in torch_rows] == [set(r) for r in jax_rows] and "prior_loss" in jax_rows[0]
    for key in ("loss", "instance_loss", "prior_loss"):
        np.testing.assert_allclose([r[key] for r in torch_rows], [r[key] for r in jax_rows], rtol=1e-4, err_msg=key)
