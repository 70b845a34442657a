"""Every registered task of both backends provides every member of the task interface (jaxdiff.tasks.base), in
full fine-tuning and with LoRA; the text-to-image ones (latents and text) the latent cache's members too."""

import inspect
import json
from typing import Protocol

import pytest
import torch

from jaxdiff import cli
from jaxdiff.tasks import TASKS
from jaxdiff.tasks.base import JaxTask, LatentCacheTask, Task
from tests.test_trainer import metrics, train
from tests.test_unconditional import TINY_UNET
from torch_backend.tasks import TASKS as TORCH_TASKS
from torch_backend.tasks import TorchTask


def members(protocol: type) -> set[str]:
    """The names a protocol declares: its own and its protocol bases' annotations, methods and properties."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (Protocol, object) or not getattr(cls, "_is_protocol", False):
            continue
        names.update(inspect.get_annotations(cls))
        for attr, value in vars(cls).items():
            if not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                names.add(attr)
    return names


TASK_CASES = [
    *(
        (name, model, lora)
        for name, model in (
            ("text_to_image", "tiny_sd_path"),
            ("sdxl", "tiny_sdxl_path"),
            ("dreambooth", "tiny_sd_path"),
            ("dreambooth", "tiny_sdxl_path"),
        )
        for lora in (False, True)
    ),
    ("lcm", "tiny_sd_path", False),
    ("lcm_sdxl", "tiny_sdxl_path", False),
    ("lcm_lora", "tiny_sd_path", True),  # lcm_lora always trains adapters (rank 64 by default)
    ("lcm_lora", "tiny_sdxl_path", True),
    ("unconditional", "tiny_unet_2d_config", False),  # a UNet2DModel config.json: trained from scratch
]


@pytest.fixture(scope="module")
def tiny_unet_2d_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet_2d") / "config.json"
    path.write_text(json.dumps({"_class_name": "UNet2DModel", **TINY_UNET}))
    return path


def test_the_protocols_declare_the_interface():
    assert {
        "trainable",
        "frozen",
        "lora",
        "draw",
        "draw_host",
        "loss",
        "copied_components",
        "images_to_generate",
    } <= members(Task)
    assert members(Task) < members(JaxTask) and members(Task) < members(TorchTask)
    assert {"train_filter", "pretrained", "abstract_batch", "sample"} <= members(JaxTask)
    assert {"encode_images", "encode_text", "cache_fingerprint", "tokenizers"} == members(LatentCacheTask)


def test_every_task_is_covered():
    covered = {name for name, *_ in TASK_CASES}
    assert covered == set(TASKS) == set(TORCH_TASKS)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name, model, lora", TASK_CASES)
def test_every_task_fits_the_interface(backend, name, model, lora, request, tmp_path, shapes_dataset):
    data = {"train_data_dir": str(shapes_dataset)}
    if name == "dreambooth":
        data = {"instance_data_dir": str(shapes_dataset), "instance_prompt": "a sks shape"}
    source = "model_config_name_or_path" if name == "unconditional" else "pretrained_model_name_or_path"
    values = {
        "backend": backend,
        "task": name,
        source: str(request.getfixturevalue(model)),
        **data,
        "output_dir": str(tmp_path / "unused"),
        "resolution": 32,
        "seed": 0,
        **({"lora_rank": 4} if lora and name != "lcm_lora" else {}),
    }
    config = cli.resolve(cli.validate(values))
    if backend == "jax":
        task, protocol = TASKS[name](config), JaxTask
    else:
        task, protocol = TORCH_TASKS[name](config, torch.device("cpu")), TorchTask
    missing = sorted(m for m in members(protocol) if not hasattr(task, m))
    assert not missing, f"{type(task).__name__} lacks {missing}"
    assert task.name == name and task.config is config
    assert (task.lora is not None) == lora and set(task.trainable) == {"unet"}
    if name != "unconditional":  # every task of text and latents
        missing = sorted(m for m in members(LatentCacheTask) if not hasattr(task, m))
        assert not missing, f"{type(task).__name__} lacks the latent cache's {missing}"
        assert ("text_encoder_2" in task.text_encoder_names) == (model == "tiny_sdxl_path")
    else:
        assert task.tokenizers == () and task.export_pipeline_class == "DDPMPipeline"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_metrics_a_loss_returns_are_logged(backend, monkeypatch, tmp_path, tiny_sd_path, shapes_dataset):
    """A task's loss metrics reach metrics.jsonl beside the loss, averaged over micro-batches as the loss is."""
    task_class = (TASKS if backend == "jax" else TORCH_TASKS)["text_to_image"]
    plain_loss = task_class.loss

    def loss_with_metrics(self, models, batch, randoms):
        loss, metrics = plain_loss(self, models, batch, randoms)
        return loss, {**metrics, "twice_the_loss": 2 * loss}

    monkeypatch.setattr(task_class, "loss", loss_with_metrics)
    flags = ("--backend", backend, "--max_train_steps", "2", "--gradient_accumulation_steps", "2")
    rows = metrics(train(tmp_path, "run", tiny_sd_path, shapes_dataset, *flags))
    assert len(rows) == 2
    for row in rows:
        assert row["twice_the_loss"] == pytest.approx(2 * row["loss"], rel=1e-5)
