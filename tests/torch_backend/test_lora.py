"""LoRA training on the torch backend: peft adapters only train and checkpoint, the base stays bit-identical, and
diffusers' ``load_lora_weights`` of the export reproduces the trainer's adapted models (1e-4)."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.numpy import load_file

from jaxdiff import cli
from jaxdiff.adapters import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, METADATA_KEY
from jaxdiff.export import main as export_main
from tests.models import max_abs_diff
from tests.test_lora_training import LORA, TOL, _diffusers_outputs, _inputs
from tests.test_trainer import BASE, metrics, straight_and_resumed
from torch_backend.trainer import Trainer

TORCH = ("--backend", "torch")


def test_lora_export_loads_in_diffusers_and_only_adapters_train(tmp_path, tiny_sd_path, shapes_dataset):
    argv = [*BASE, *TORCH, *LORA, "--pretrained_model_name_or_path", str(tiny_sd_path)]
    argv += ["--train_data_dir", str(shapes_dataset), "--output_dir", str(tmp_path / "lora"), "--max_train_steps", "3"]
    values, _ = cli.parse_args([*argv, "--train_text_encoder", "--output_kohya_format", "--use_ema"])
    trainer = Trainer(cli.resolve(values))
    trainer.train()
    out = tmp_path / "lora"
    assert not (out / "unet").exists()  # the export is the LoRA file, no pipeline

    # Only adapters train, checkpoint and export; the base weights are the pipeline's, bit for bit.
    names = {n for m in trainer.task.trainable.values() for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    checkpoint = load_file(out / "checkpoints" / "3" / "model.safetensors")
    assert checkpoint and all(".lora_A." in k or ".lora_B." in k for k in checkpoint)
    base = load_file(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors")
    after = {k.replace(".base_layer", ""): v for k, v in trainer.task.unet.state_dict().items() if "lora_" not in k}
    assert sorted(after) == sorted(base) and all(np.array_equal(after[k].numpy(), base[k]) for k in base)
    with safe_open(out / LORA_WEIGHTS_NAME, "np") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"]) == (4, 8, 8)

    # The export holds the EMA adapters, which the trainer's models hold inside eval_weights.
    with trainer.eval_weights() as models:
        inputs = _inputs(models["unet"].config, models["text_encoder"].config)
        ours_unet, ours_text = _diffusers_outputs(models["unet"], models["text_encoder"], inputs)
    for weight_name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
        pipe.load_lora_weights(out, weight_name=weight_name)
        theirs_unet, theirs_text = _diffusers_outputs(pipe.unet, pipe.text_encoder, inputs)
        base_unet, _ = _diffusers_outputs(
            UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"), pipe.text_encoder, inputs
        )
        assert max_abs_diff(base_unet, theirs_unet) > 100 * TOL, weight_name  # the adapters trained
        assert max_abs_diff(ours_unet, theirs_unet) <= TOL, weight_name
        assert max_abs_diff(ours_text, theirs_text) <= TOL, weight_name


def test_merged_export_resume_and_export_cli(tmp_path, tiny_sd_path, shapes_dataset):
    """As the JAX backend's: --merge_lora's pipeline computes the adapted UNet, resume is exact, and the export
    CLI writes the run's LoRA file from its checkpoint."""
    flags = (*TORCH, *LORA, "--merge_lora", "--checkpointing_steps", "2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, shapes_dataset, *flags)
    np.testing.assert_allclose([r["loss"] for r in metrics(resumed)], [r["loss"] for r in metrics(straight)])
    ours, theirs = load_file(straight / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(straight)
    merged = UNet2DConditionModel.from_pretrained(straight, subfolder="unet")
    inputs = _inputs(merged.config, pipe.text_encoder.config)
    adapted, _ = _diffusers_outputs(pipe.unet, pipe.text_encoder, inputs)
    merged_out, _ = _diffusers_outputs(merged, pipe.text_encoder, inputs)
    assert max_abs_diff(adapted, merged_out) <= TOL
    assert not any("lora" in k for k in load_file(straight / "unet" / "diffusion_pytorch_model.safetensors"))

    exported = tmp_path / "exported"
    export_main(["--checkpoint", str(straight / "checkpoints" / "4"), "--output_dir", str(exported)])
    again = load_file(exported / LORA_WEIGHTS_NAME)
    assert sorted(again) == sorted(ours) and all(np.array_equal(again[k], ours[k]) for k in ours)
    merged_again = UNet2DConditionModel.from_pretrained(exported, subfolder="unet")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), merged_again.parameters(), strict=True))
