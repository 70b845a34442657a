"""LoRA training on the JAX backend (--lora_rank): only adapters train, the base stays bit-identical, and diffusers'
``load_lora_weights`` of the export (peft and kohya files) reproduces the trained adapted models (1e-4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from jaxdiff import cli
from jaxdiff.adapters import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, METADATA_KEY
from jaxdiff.config import ConfigError
from jaxdiff.export import main as export_main
from jaxdiff.models.nn import LoRAParam
from jaxdiff.train import main
from jaxdiff.trainer import Trainer
from jaxdiff.weights import module_to_state_dict
from tests.models import max_abs_diff
from tests.test_trainer import BASE, metrics, straight_and_resumed, train

TOL = 1e-4
LORA = ("--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-2")


def run(tmp_path, name, model, data, *flags, steps=3):
    argv = [*BASE, "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    values, _ = cli.parse_args(
        [*argv, *LORA, "--output_dir", str(tmp_path / name), "--max_train_steps", str(steps), *flags]
    )
    trainer = Trainer(cli.resolve(values))
    trainer.train()
    return trainer


def _inputs(unet_config, text_config, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, unet_config.in_channels, 8, 8)).astype(np.float32)
    text = rng.standard_normal((2, 7, text_config.hidden_size)).astype(np.float32)
    ids = rng.integers(0, 40, (2, 7))
    return sample, np.array([10, 500]), text, ids


def _outputs_of(trainer):
    """The trained adapted UNet's and text encoder's outputs (the trainer's own models) on fixed inputs."""
    models = trainer.program.models(trainer.state["params"], trainer.frozen)
    unet, text_encoder = models["unet"], models["text_encoder"]
    sample, t, text, ids = _inputs(unet.config, text_encoder.config)
    ours_unet = nnx.jit(lambda m, *a: m(*a).sample)(unet, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(text))
    ours_text = nnx.jit(lambda m, i: m(i).last_hidden_state)(text_encoder, jnp.asarray(ids))
    return (sample, t, text, ids), np.asarray(ours_unet), np.asarray(ours_text)


def _diffusers_outputs(unet, text_encoder, inputs):
    sample, t, text, ids = inputs
    with torch.no_grad():
        theirs_unet = unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
        theirs_text = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    return theirs_unet, theirs_text


def test_lora_export_loads_in_diffusers_and_only_adapters_train(tmp_path, tiny_sd_path, shapes_dataset):
    trainer = run(tmp_path, "lora", tiny_sd_path, shapes_dataset, "--train_text_encoder", "--output_kohya_format")
    out = tmp_path / "lora"
    # Only adapters are trained state (optimizer, EMA, checkpoint); the base stays frozen, bit-identical.
    params = trainer.state["params"]
    assert set(params) == {"unet", "text_encoder"}
    assert all(
        isinstance(v, LoRAParam) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    base = load_file(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors")
    unet = trainer.program.models(params, trainer.frozen)["unet"]
    after = module_to_state_dict(unet)
    assert sorted(after) == sorted(base)
    assert all(np.array_equal(after[k], base[k]) for k in base)
    assert not (out / "unet").exists()  # the export is the LoRA file, no pipeline

    # The file holds only adapters, with rank and alpha in its metadata.
    inputs, ours_unet, ours_text = _outputs_of(trainer)
    check_lora_export(out, tiny_sd_path, inputs, ours_unet, ours_text)


def check_lora_export(out, model, inputs, ours_unet, ours_text):
    """The LoRA files at ``out`` hold only adapters (UNet and text encoder, rank 4 alpha 8 in the metadata), and
    diffusers' ``load_lora_weights`` of each into ``model`` computes the trainer's adapted UNet and text encoder
    outputs on ``inputs``."""
    with safe_open(out / LORA_WEIGHTS_NAME, "np") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"]) == (4, 8, 8)
    for weight_name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        pipe.load_lora_weights(out, weight_name=weight_name)
        theirs_unet, theirs_text = _diffusers_outputs(pipe.unet, pipe.text_encoder, inputs)
        base_unet, _ = _diffusers_outputs(
            UNet2DConditionModel.from_pretrained(model, subfolder="unet"), pipe.text_encoder, inputs
        )
        assert max_abs_diff(base_unet, theirs_unet) > 100 * TOL, weight_name  # the adapters trained
        assert max_abs_diff(ours_unet, theirs_unet) <= TOL, weight_name
        assert max_abs_diff(ours_text, theirs_text) <= TOL, weight_name


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_merged_export_resume_and_export_cli(backend, tmp_path, tiny_sd_path, shapes_dataset):
    """--merge_lora exports a plain pipeline computing the adapted UNet; a resumed run ends with the straight run's
    adapters; `python -m jaxdiff.export` of a checkpoint writes the same LoRA file and merged pipeline."""
    flags = ("--backend", backend, *LORA, "--merge_lora", "--checkpointing_steps", "2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, shapes_dataset, *flags)
    np.testing.assert_allclose([r["loss"] for r in metrics(resumed)], [r["loss"] for r in metrics(straight)])
    ours, theirs = load_file(straight / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours) and sorted(ours) == sorted(theirs)

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
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), merged_again.parameters(), strict=True))


def test_dropout_trains_and_validation_is_deterministic(tmp_path, tiny_sd_path, shapes_dataset):
    plain = train(tmp_path, "plain", tiny_sd_path, shapes_dataset, *LORA, "--max_train_steps", "2")
    dropped = train(tmp_path, "dropout", tiny_sd_path, shapes_dataset, *LORA, "--max_train_steps", "2",
                    "--lora_dropout", "0.5")  # fmt: skip
    plain_losses, dropped_losses = [r["loss"] for r in metrics(plain)], [r["loss"] for r in metrics(dropped)]
    assert plain_losses[0] == pytest.approx(dropped_losses[0], rel=1e-6)  # lora_B = 0: dropout changes nothing yet
    assert all(np.isfinite(dropped_losses)) and plain_losses[1] != pytest.approx(dropped_losses[1], rel=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_alpha", "8"], "--lora_alpha configure LoRA training, which --lora_rank turns on"),
        (["--merge_lora"], "--merge_lora configure LoRA training"),
        (["--rank", "0"], "--lora_rank"),
        (["--lora_rank", "4", "--lora_dropout", "1"], "--lora_dropout"),
    ],
)
def test_lora_flags_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        cli.parse_args(["--output_dir", "x", "--pretrained_model_name_or_path", "y", *flags])[0]


def test_rank_alias_and_no_matching_target(tmp_path, tiny_sd_path, shapes_dataset, capsys):
    assert (
        cli.parse_args(["--output_dir", "x", "--pretrained_model_name_or_path", "y", "--rank", "8"])[0].lora_rank == 8
    )
    argv = [*BASE, "--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--output_dir", str(tmp_path / "x"), "--rank", "4", "--lora_target_modules", "nonexistent"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--lora_target_modules=['nonexistent']" in err and "matches the LoRA targets" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_sdxl_lora_loads_in_the_sdxl_pipeline(backend, tmp_path, tiny_sdxl_path, shapes_dataset):
    """SDXL LoRA with both text encoders: `StableDiffusionXLPipeline.load_lora_weights` of the export computes what
    the --merge_lora pipeline (the trained adapters folded into the base) computes, and differs from the base."""
    from diffusers import StableDiffusionXLPipeline

    out = train(
        tmp_path, "run", tiny_sdxl_path, shapes_dataset, *LORA, "--backend", backend, "--max_train_steps", "2",
        "--train_text_encoder", "--merge_lora",
    )  # fmt: skip
    assert {k.split(".")[0] for k in load_file(out / LORA_WEIGHTS_NAME)} == {"unet", "text_encoder", "text_encoder_2"}
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    adapted = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    adapted.load_lora_weights(out)
    rng = np.random.default_rng(0)
    config, width = merged.unet.config, merged.text_encoder_2.config.projection_dim
    sample = torch.from_numpy(rng.standard_normal((2, config.in_channels, 8, 8)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((2, 7, config.cross_attention_dim)).astype(np.float32))
    added = {"text_embeds": torch.from_numpy(rng.standard_normal((2, width)).astype(np.float32)),
             "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)}  # fmt: skip
    ids = torch.from_numpy(rng.integers(0, 40, (2, 7)))
    with torch.no_grad():
        outputs = [
            unet(sample, torch.tensor([10, 500]), text, added_cond_kwargs=added).sample.numpy()
            for unet in (merged.unet, adapted.unet, base_unet)
        ]
        texts = [p.text_encoder_2(ids).text_embeds.numpy() for p in (merged, adapted)]
    assert max_abs_diff(outputs[0], outputs[1]) <= TOL
    assert max_abs_diff(outputs[1], outputs[2]) > 100 * TOL  # the adapters trained
    assert max_abs_diff(texts[0], texts[1]) <= TOL
