"""The torch backend's CUDA paths: xFormers attention, fp16 with the gradient scaler, bitsandbytes' 8-bit AdamW on
the GPU. Each runs where torch sees a CUDA GPU and is skipped with its reason elsewhere (CI has no GPU)."""

import numpy as np
import pytest
import torch

from tests.test_trainer import metrics, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

STEPS = ("--backend", "torch", "--max_train_steps", "4", "--checkpointing_steps", "4")


def _run(tmp_path, name, model, data, *flags):
    out = train(tmp_path, name, model, data, *STEPS, *flags)
    losses = np.array([row["loss"] for row in metrics(out)])
    assert losses.shape == (4,) and np.isfinite(losses).all(), losses
    return out, losses


def test_xformers_attention_trains_like_sdpa(tmp_path, tiny_sd_path, shapes_dataset):
    pytest.importorskip("xformers", reason="needs the xformers package")
    _, sdpa = _run(tmp_path, "sdpa", tiny_sd_path, shapes_dataset)
    flag = "--enable_xformers_memory_efficient_attention"
    _, xformers = _run(tmp_path, "xformers", tiny_sd_path, shapes_dataset, flag)
    np.testing.assert_allclose(xformers, sdpa, rtol=1e-3)  # the same exact attention, other kernels


def test_fp16_trains_with_the_grad_scaler(tmp_path, tiny_sd_path, shapes_dataset):
    _, fp32 = _run(tmp_path, "fp32", tiny_sd_path, shapes_dataset)
    out, fp16 = _run(tmp_path, "fp16", tiny_sd_path, shapes_dataset, "--mixed_precision", "fp16")
    assert abs(fp16[0] - fp32[0]) <= 1e-2 * abs(fp32[0])  # step 1: the same weights and draws, fp16 compute
    assert list((out / "checkpoints").rglob("scaler.pt")), "accelerate's GradScaler state is checkpointed"


def test_8bit_adam_on_the_gpu(tmp_path, tiny_sd_path, shapes_dataset):
    _, adamw = _run(tmp_path, "adamw", tiny_sd_path, shapes_dataset)
    _, adam8 = _run(tmp_path, "adam8bit", tiny_sd_path, shapes_dataset, "--use_8bit_adam")
    assert adam8[0] == pytest.approx(adamw[0], rel=1e-5)  # before the first update: the same model
    np.testing.assert_allclose(adam8, adamw, rtol=5e-2)  # 8-bit moments follow fp32 AdamW closely
