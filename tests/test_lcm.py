"""LCM distillation (``--task lcm``, ``lcm_sdxl``, ``lcm_lora``) on both backends: the first step against a
step-by-step reference of diffusers' ``train_lcm_distill_*_wds.py`` formulas, per-step parity across backends, end
to end from WebDataset shards (resume, validation, exports that diffusers loads and samples with LCMScheduler in
4 steps), and the config rules."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jaxdiff import cli
from jaxdiff.adapters import LCM_UNET_TARGETS, LORA_WEIGHTS_NAME, METADATA_KEY, LoRASettings
from jaxdiff.config import ConfigError
from jaxdiff.export import main as export_main
from jaxdiff.trainer import Trainer
from tests.test_trainer import metrics, sample_steps, straight_and_resumed, unet_weights
from tests.torch_backend.test_parity import config
from torch_backend.trainer import Trainer as TorchTrainer

REFERENCE_TOL = 1e-5
PARITY_TOL = 1e-4
#: huber_c in the pseudo-Huber cases: where |d| << c the loss is quadratic, where |d| >> c its gradient is sign(d),
#: which turns a 1e-7 difference between the backends' parameters into a different update; c = 0.1 keeps the
#: five-step comparison about the objective rather than that sign.
HUBER = {"loss_type": "huber", "huber_c": 0.1}


def _sinusoid(w: np.ndarray, dim: int) -> np.ndarray:
    """The scripts' guidance_scale_embedding in float32: frequencies exp(-ln(1e4) k / (half - 1)) (correctly
    rounded), arguments 1000 w f, [sin, cos], zero-padded to an odd dim."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half)).astype(np.float32)
    args = (w.astype(np.float32) * np.float32(1000.0))[:, None] * freqs[None, :]
    return np.pad(np.concatenate([np.sin(args), np.cos(args)], axis=1), ((0, 0), (0, dim % 2)))


def reference_loss(cfg, student, batch, randoms, *, sdxl):
    """One distillation loss as diffusers' scripts compute it, from the pipeline's diffusers modules and NumPy schedule
    math: the teacher's conditional and unconditional calls made separately, the target network being the student
    itself (at the first step the EMA target equals it; for LoRA it is the student)."""
    root = cfg.pretrained_model_name_or_path
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    alphas = scheduler.alphas_cumprod.numpy()
    steps, ratio = cfg.num_ddim_timesteps, scheduler.config.num_train_timesteps // cfg.num_ddim_timesteps
    grid = (np.arange(1, steps + 1) * ratio).round().astype(np.int64) - 1
    alphas_prev = np.asarray([alphas[0], *alphas[grid[:-1]]], np.float32)
    index = randoms["index"].numpy().astype(np.int64)
    start_t, t = grid[index], np.maximum(grid[index] - ratio, 0)

    def bcast(values):
        return torch.from_numpy(np.asarray(values, np.float32)).reshape(-1, 1, 1, 1)

    def scalings(timesteps):
        scaled = cfg.timestep_scaling_factor * timesteps.astype(np.float32)
        return bcast(0.25 / (scaled**2 + 0.25)), bcast(scaled / np.sqrt(scaled**2 + 0.25))

    def x0_and_eps(output, x, timesteps):
        alpha_bar = bcast(alphas[timesteps])
        return (x - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt(), output

    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
        dist = vae.encode(batch["pixel_values"]).latent_dist
        latents = (dist.mean + dist.std * randoms["latent_eps"]) * vae.config.scaling_factor
        encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
        if sdxl:
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2")
            first = encoder(batch["input_ids"].long(), output_hidden_states=True).hidden_states[-2]
            second = encoder_2(batch["input_ids_2"].long(), output_hidden_states=True)
            text = torch.cat([first, second.hidden_states[-2]], dim=-1)
            size = torch.tensor([cfg.resolution, cfg.resolution]).expand(len(text), 2)
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], size], dim=-1).float()
            cond = {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": second.text_embeds}}
            cond["added_cond_kwargs"]["time_ids"] = time_ids
            uncond = {  # SDXL's unconditional input: zeros (force_zeros_for_empty_prompt)
                "encoder_hidden_states": torch.zeros_like(text),
                "added_cond_kwargs": {"text_embeds": torch.zeros_like(second.text_embeds), "time_ids": time_ids},
            }
        else:
            tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
            text = encoder(batch["input_ids"].long())[0]
            empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
            cond = {"encoder_hidden_states": text}
            uncond = {"encoder_hidden_states": encoder(empty.input_ids)[0].expand_as(text)}

        alpha_start = bcast(alphas[start_t])
        noisy = alpha_start.sqrt() * latents + (1 - alpha_start).sqrt() * randoms["noise"]
        w = randoms["w"].numpy()
        dim = student.config.time_cond_proj_dim
        guidance = None if dim is None else torch.from_numpy(_sinusoid(w, dim))
        start, now = torch.from_numpy(start_t), torch.from_numpy(t)

        c_skip_start, c_out_start = scalings(start_t)
        x0, _ = x0_and_eps(student(noisy, start, timestep_cond=guidance, **cond).sample, noisy, start_t)
        prediction = c_skip_start * noisy + c_out_start * x0

        teacher = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        cond_x0, cond_eps = x0_and_eps(teacher(noisy, start, **cond).sample, noisy, start_t)
        uncond_x0, uncond_eps = x0_and_eps(teacher(noisy, start, **uncond).sample, noisy, start_t)
        w_ = bcast(w)
        pred_x0 = cond_x0 + w_ * (cond_x0 - uncond_x0)
        pred_eps = cond_eps + w_ * (cond_eps - uncond_eps)
        alpha_prev = bcast(alphas_prev[index])
        x_prev = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev).sqrt() * pred_eps

        c_skip, c_out = scalings(t)
        target_x0, _ = x0_and_eps(student(x_prev, now, timestep_cond=guidance, **cond).sample, x_prev, t)
        target = c_skip * x_prev + c_out * target_x0
        diff = prediction - target
        if cfg.loss_type == "l2":
            return float((diff**2).mean())
        return float((torch.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c).mean())


@pytest.mark.parametrize(
    "task, sdxl, extra",
    [
        ("lcm", False, {}),
        ("lcm", False, HUBER),
        ("lcm_sdxl", True, HUBER),
        ("lcm_lora", False, {"lora_rank": 4, "learning_rate": 1e-2}),
        ("lcm_lora", True, {"lora_rank": 4, "learning_rate": 1e-2, **HUBER}),
    ],
    ids=["lcm-l2", "lcm-huber", "lcm_sdxl-huber", "lcm_lora-l2", "lcm_lora_sdxl-huber"],
)
def test_first_step_equals_the_reference_and_backends_agree(
    task, sdxl, extra, tmp_path, tiny_sd_path, tiny_sdxl_path, webdataset_shards
):
    """Step 1 of each backend equals `reference_loss` on the same batch and draws (1e-5); the five steps' losses
    agree across backends (1e-4 relative), the teacher's grid, scalings, CFG, solver step and target included."""
    model = tiny_sdxl_path if sdxl else tiny_sd_path
    data = {"task": task, "train_shards_path_or_url": webdataset_shards, **extra}
    configs = {b: config(model, None, tmp_path / b, b, **data) for b in ("jax", "torch")}

    trainer = TorchTrainer(configs["torch"])
    start = trainer.data.get_state()
    batch, randoms = trainer.inputs(0)
    expected = reference_loss(configs["torch"], trainer.task.unet, batch, randoms, sdxl=sdxl)
    with torch.no_grad():
        first, _ = trainer.task.loss(trainer.models, batch, randoms)
    assert float(first) == pytest.approx(expected, rel=REFERENCE_TOL)
    trainer.data.set_state(start)
    trainer.train()
    Trainer(configs["jax"]).train()

    jax_losses = [r["loss"] for r in metrics(tmp_path / "jax")]
    torch_losses = [r["loss"] for r in metrics(tmp_path / "torch")]
    assert jax_losses[0] == pytest.approx(expected, rel=REFERENCE_TOL)
    assert torch_losses[0] == pytest.approx(expected, rel=REFERENCE_TOL)
    np.testing.assert_allclose(torch_losses, jax_losses, rtol=PARITY_TOL)
    assert len(set(jax_losses)) == len(jax_losses)  # it trains: the five losses differ


def test_the_student_starts_from_the_teacher(tmp_path, tiny_sd_path, webdataset_shards):
    """The student is the teacher's UNet with a 256-wide guidance embedding whose new projection is torch's Linear
    initialisation drawn from the seed (the same on both backends); the teacher is frozen in the compute dtype."""
    values = {"task": "lcm", "train_shards_path_or_url": webdataset_shards, "mixed_precision": "bf16"}
    task = TorchTrainer(config(tiny_sd_path, None, tmp_path / "out", "torch", **values)).task
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    assert task.unet.config.time_cond_proj_dim == 256 and teacher.config.time_cond_proj_dim is None
    student = task.unet.state_dict()
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(student[key], value, rtol=0, atol=0)
    cond_proj = student["time_embedding.cond_proj.weight"]
    bound = 1 / np.sqrt(256)
    assert cond_proj.shape == (teacher.config.block_out_channels[0], 256)  # onto the timestep projection
    assert cond_proj.abs().max() <= bound and cond_proj.std() > bound / 2  # U(-1/sqrt(in), 1/sqrt(in))
    assert task.teacher_unet.dtype == torch.bfloat16 and not any(
        p.requires_grad for p in task.teacher_unet.parameters()
    )
    assert task.unet.dtype == torch.float32


def _lcm_flags(task, webdataset_shards, backend, *extra):
    return (
        "--task", task, "--backend", backend, "--train_batch_size", "1" if backend == "jax" else "2",
        "--checkpointing_steps", "1", "--validation_prompts", "a red circle", "--num_validation_images", "1",
        "--validation_steps", "2", "--gradient_checkpointing", *extra,
    )  # fmt: skip


def _lcm_sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        "a red circle", num_inference_steps=4, height=32, width=32, output_type="np", generator=generator, **kwargs
    )
    assert images.images.shape == (1, 32, 32, 3) and np.isfinite(images.images).all()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lcm_end_to_end_resume_validation_and_export(backend, tmp_path, tiny_sd_path, webdataset_shards):
    data = ["--train_shards_path_or_url", webdataset_shards]
    flags = _lcm_flags("lcm", webdataset_shards, backend)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, data, *flags, steps=2)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]  # 2N == N + N
    for folder in ("unet", "unet_target"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), folder
    assert sample_steps(straight) == [2]

    pipe = DiffusionPipeline.from_pretrained(straight, safety_checker=None)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50 and pipe.scheduler.config.timestep_scaling == 10.0
    assert pipe.unet.config.time_cond_proj_dim == 256
    _lcm_sample(pipe, guidance_scale=8.0)

    # The target network is the EMA (0.95) of the student: between the teacher and the student.
    teacher = unet_weights(tiny_sd_path)
    student, target = (
        unet_weights(straight),
        load_file(straight / "unet_target" / "diffusion_pytorch_model.safetensors"),
    )
    key = "conv_in.weight"
    moved, lagged = np.abs(student[key] - teacher[key]).max(), np.abs(target[key] - teacher[key]).max()
    assert 0 < lagged < moved
    UNet2DConditionModel.from_pretrained(straight, subfolder="unet_target")

    # The last checkpoint exports the same student and target.
    exported = tmp_path / "exported"
    export_main(["--checkpoint", str(straight / "checkpoints" / "2"), "--output_dir", str(exported)])
    for folder in ("unet", "unet_target"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(exported / folder / "diffusion_pytorch_model.safetensors")
        assert all(np.array_equal(a[k], b[k]) for k in a), folder


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lcm_lora_end_to_end_resume_validation_and_export(backend, tmp_path, tiny_sd_path, webdataset_shards):
    """LCM-LoRA with the scripts' defaults (rank 64, alpha 64, convolutions adapted): the file loads onto the
    teacher pipeline with load_lora_weights and samples with LCMScheduler in 4 steps, without guidance."""
    data = ["--train_shards_path_or_url", webdataset_shards]
    flags = _lcm_flags("lcm_lora", webdataset_shards, backend, "--learning_rate", "1e-2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd_path, data, *flags, steps=2)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    a, b = load_file(straight / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (straight / "unet").exists() and sample_steps(straight) == [2]
    assert a["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (64, 32, 3, 3)
    assert a["unet.mid_block.resnets.0.time_emb_proj.lora_B.weight"].shape[1] == 64
    with safe_open(straight / LORA_WEIGHTS_NAME, "np") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
    assert metadata["unet.r"] == metadata["unet.lora_alpha"] == 64

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 16, 32, generator=generator)
    with torch.no_grad():
        base = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(straight)
        adapted = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
    assert not torch.allclose(base, adapted)
    _lcm_sample(pipe, guidance_scale=1.0)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lcm_sdxl_end_to_end_resume_validation_and_export(backend, tmp_path, tiny_sdxl_path, webdataset_shards):
    data = ["--train_shards_path_or_url", webdataset_shards]
    flags = _lcm_flags("lcm_sdxl", webdataset_shards, backend)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sdxl_path, data, *flags, steps=2)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a) and sample_steps(straight) == [2]
    pipe = DiffusionPipeline.from_pretrained(straight)
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 256
    UNet2DConditionModel.from_pretrained(straight, subfolder="unet_target")
    _lcm_sample(pipe, guidance_scale=8.0)


def _resolve(model, data, **values):
    values = {"train_shards_path_or_url": data, "output_dir": "unused", "report_to": "none", **model, **values}
    return cli.resolve(cli.validate(values))


def test_lcm_config_rules(tiny_sd_path, tiny_sdxl_path, webdataset_shards):
    teacher = {"pretrained_teacher_model": str(tiny_sd_path)}
    cfg = _resolve(teacher, webdataset_shards)
    assert cfg.task == "lcm" and cfg.pretrained_model_name_or_path == str(tiny_sd_path)  # inferred, one pipeline
    assert cfg.validation_num_inference_steps == 4 and cfg.validation_guidance_scale == 7.5
    lora = _resolve(teacher, webdataset_shards, task="lcm_lora")
    assert lora.validation_guidance_scale == 1.0 and lora.validation_num_inference_steps == 4
    assert LoRASettings.from_config(lora) == LoRASettings(
        rank=64, alpha=64, dropout=0.0, unet_targets=LCM_UNET_TARGETS
    )
    assert _resolve(teacher, webdataset_shards, validation_num_inference_steps=2).validation_num_inference_steps == 2

    both = {**teacher, "pretrained_model_name_or_path": str(tiny_sdxl_path)}
    with pytest.raises(ConfigError, match="distills one pipeline"):
        _resolve(both, webdataset_shards, task="lcm")
    with pytest.raises(ConfigError, match=r"snr_gamma"):
        _resolve(teacher, webdataset_shards, snr_gamma=5.0)
    with pytest.raises(ConfigError, match=r"use_ema"):
        _resolve(teacher, webdataset_shards, use_ema=True)


def test_a_teacher_of_the_other_kind_names_the_task_that_fits(
    tmp_path, tiny_sd_path, tiny_sdxl_path, webdataset_shards
):
    sdxl_teacher = {"pretrained_teacher_model": str(tiny_sdxl_path)}
    lcm = _resolve(sdxl_teacher, webdataset_shards, task="lcm", backend="torch", output_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="is an SDXL pipeline, which task lcm does not train; use --task lcm_sdxl"):
        TorchTrainer(lcm)
    sd_teacher = {"pretrained_teacher_model": str(tiny_sd_path)}
    lcm_sdxl = _resolve(sd_teacher, webdataset_shards, task="lcm_sdxl", output_dir=str(tmp_path / "b"))
    with pytest.raises(
        ConfigError, match=r"is an SD 1\.x/2\.x pipeline, which task lcm_sdxl does not train; use --task lcm$"
    ):
        Trainer(lcm_sdxl)
