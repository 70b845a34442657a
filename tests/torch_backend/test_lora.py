"""LoRA training on the torch backend: peft adapters only train and checkpoint, the base stays bit-identical, and
diffusers' ``load_lora_weights`` of the export reproduces the trainer's adapted models (1e-4). The merged export,
resume and the export CLI are tests/test_lora_training.py's, for both backends."""

import numpy as np
from safetensors.numpy import load_file

from jaxdiff import cli
from tests.test_lora_training import LORA, _diffusers_outputs, _inputs, check_lora_export
from tests.test_trainer import BASE
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
    # The export holds the EMA adapters, which the trainer's models hold inside eval_weights.
    with trainer.eval_weights() as models:
        inputs = _inputs(models["unet"].config, models["text_encoder"].config)
        ours_unet, ours_text = _diffusers_outputs(models["unet"], models["text_encoder"], inputs)
    check_lora_export(out, tiny_sd_path, inputs, ours_unet, ours_text)


def test_adapters_disabled_computes_the_base_and_restores_the_adapters(tiny_sd_path):
    """LCM-LoRA's teacher: inside `adapters_disabled` the adapted UNet (convolutions adapted too) is its base model;
    afterwards it is adapted again, with the adapters trainable and the base frozen as before."""
    import torch
    from diffusers import UNet2DConditionModel

    from jaxdiff.adapters import LCM_UNET_TARGETS, LoRASettings
    from torch_backend.lora import adapters_disabled, add_lora

    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").requires_grad_(False)
    add_lora(unet, LoRASettings(rank=4, alpha=8, dropout=0.0, unet_targets=LCM_UNET_TARGETS), "unet", seed=0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 7, 32, generator=generator)

    def output(model):
        with torch.no_grad():
            return model(sample, torch.tensor([3, 801]), encoder_hidden_states=hidden).sample

    adapted = output(unet)
    assert (adapted - output(base)).abs().max() > 1e-2
    with adapters_disabled(unet) as teacher:
        torch.testing.assert_close(output(teacher), output(base), rtol=0, atol=0)
    torch.testing.assert_close(output(unet), adapted, rtol=0, atol=0)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable
    assert trainable and all(".lora_" in n for n in trainable)
