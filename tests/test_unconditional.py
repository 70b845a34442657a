"""Unconditional image generation (--task unconditional, diffusers' train_unconditional.py) on both backends: the
tutorial's model, torch's initialisation, the DDPM sampler, end-to-end runs, cross-backend parity and a model that
learns the data's colours."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from jaxdiff import cli, diffusion, weights
from jaxdiff.config import ConfigError
from jaxdiff.demo import png_bytes
from jaxdiff.models.modeling import RandomInit
from jaxdiff.models.unet_2d import UNet2DConfig
from jaxdiff.objective import TUTORIAL_UNET
from jaxdiff.tasks import TASKS
from jaxdiff.train import main
from jaxdiff.trainer import Trainer
from tests.fixtures.datasets import write_image_files
from tests.test_trainer import metrics, sample_steps, unet_weights
from torch_backend.tasks import TASKS as TORCH_TASKS
from torch_backend.trainer import Trainer as TorchTrainer

TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
RED, BLUE = (220, 40, 40), (40, 40, 220)
BASE = ["--resolution", "16", "--seed", "0", "--report_to", "none", "--logging_steps", "1", "--lr_warmup_steps", "0"]


@pytest.fixture(scope="module")
def tiny_unet_config(tmp_path_factory) -> Path:
    """A config.json of a tiny UNet2DModel (no weights: trained from scratch)."""
    path = tmp_path_factory.mktemp("unet_config") / "config.json"
    path.write_text(json.dumps({"_class_name": "UNet2DModel", **TINY_UNET}))
    return path


@pytest.fixture(scope="module")
def tiny_unet_folder(tmp_path_factory) -> Path:
    """A tiny UNet2DModel saved by diffusers with seeded random weights (fine-tuned from)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet_weights")
    UNet2DModel(sample_size=16, **TINY_UNET).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_colours(tmp_path_factory) -> Path:
    """16 solid images, half red, half blue, in a plain folder (an imagefolder without metadata)."""
    images = [png_bytes(Image.new("RGB", (16, 16), RED if i % 2 else BLUE)) for i in range(16)]
    return write_image_files(tmp_path_factory.mktemp("two_colours"), images)


def resolve(**values):
    return cli.resolve(cli.validate({"seed": 0, "output_dir": "unused", **values}))


def run(out, *flags, backend="jax"):
    try:
        main([*BASE, "--backend", backend, "--output_dir", str(out), *flags])
    except SystemExit as exc:
        raise AssertionError(f"training exited with {exc.code}") from None
    return out


# ---- the model, its initialisation, the schedule ---------------------------------------------------------------


def test_the_default_model_is_the_tutorials(two_colours):
    """Without --model_config_name_or_path both backends build train_unconditional.py's UNet2DModel at
    --resolution: the config.json diffusers writes and the parameter count."""
    theirs = UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    )
    config = resolve(task="unconditional", train_data_dir=str(two_colours))
    assert config.resolution == 64  # the script's default
    jax_task = TASKS["unconditional"](config)
    torch_task = TORCH_TASKS["unconditional"](config, torch.device("cpu"))

    def as_json(config):
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    expected = as_json(theirs.config)
    ours = UNet2DConfig.from_dict(jax_task.unet_config).to_dict()
    assert {k: ours[k] for k in expected} == expected and as_json(torch_task.unet.config) == expected
    count = sum(p.numel() for p in theirs.parameters())
    assert count == sum(p.numel() for p in torch_task.unet.parameters())
    assert count == sum(x.size for x in __import__("jax").tree.leaves(nnx.state(jax_task.unet, nnx.Param)))
    assert isinstance(jax_task.pretrained["unet"], RandomInit) and set(TUTORIAL_UNET) < set(ours)


def test_random_init_follows_torch_defaults():
    """A new JAX model's weights have torch's default initialisation: each linear / conv tensor within and
    spread over U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's are, norm scales 1 and biases 0."""
    import jax

    from jaxdiff.models.unet_2d import UNet2DModel as JaxUNet2DModel

    model, init = JaxUNet2DModel.abstract_from_config({**TINY_UNET, "block_out_channels": [32, 64]}, seed=3)
    init.load_into(model)
    ours = weights.module_to_state_dict(model)
    torch.manual_seed(0)
    module = UNet2DModel(**{**TINY_UNET, "block_out_channels": [32, 64]})
    theirs = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        mine = ours[key]
        assert mine.shape == value.shape and mine.dtype == np.float32, key
        kernel = theirs.get(key.removesuffix(".bias") + ".weight", value)
        if kernel.ndim < 2:  # group / layer norms: scale 1, bias 0
            np.testing.assert_array_equal(mine, value, err_msg=key)
            continue
        bound = 1 / np.sqrt(np.prod(kernel.shape[1:]))
        assert np.abs(value).max() <= bound and np.abs(mine).max() <= bound, key
        if value.size >= 512:
            assert 0.9 < mine.std() / value.std() < 1.1, key
    other, _ = JaxUNet2DModel.abstract_from_config(TINY_UNET, seed=4)
    RandomInit(4).load_into(other)
    again, _ = JaxUNet2DModel.abstract_from_config(TINY_UNET, seed=4)
    RandomInit(4).load_into(again)
    leaves = jax.tree.leaves(nnx.state(other, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(*leaves, strict=True))  # the seed decides


@pytest.mark.parametrize(
    "prediction_type, variance_type, steps",
    [("epsilon", "fixed_small", 10), ("sample", "fixed_large", 7), ("v_prediction", "fixed_small_log", 100)],
)
def test_ddpm_sampler_matches_diffusers(monkeypatch, prediction_type, variance_type, steps):
    """jaxdiff's DDPM chain equals DDPMScheduler.step by step for the same model and the same variance noise."""
    import jax
    import jax.numpy as jnp

    config = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type,
              "variance_type": variance_type, "clip_sample": prediction_type != "v_prediction"}  # fmt: skip
    schedule = diffusion.NoiseSchedule.from_config(config)
    scheduler = DDPMScheduler(**config)
    scheduler.set_timesteps(steps)
    x0 = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    rng = jax.random.PRNGKey(1)

    def model(x, t):  # any smooth function of the sample and the timestep
        return 0.7 * x + 0.01 * jnp.reshape(t, (-1, 1, 1, 1)).astype(jnp.float32)

    ours = np.asarray(jax.jit(lambda x: diffusion.ddpm_sample(schedule, model, x, steps, rng))(x0))
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x0.shape)) for i in range(steps)]
    drawn = iter(noises[:-1])  # t = 0, the last step, draws none

    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: torch.from_numpy(next(drawn))
    )
    x = torch.from_numpy(x0)
    for t in scheduler.timesteps:
        output = torch.from_numpy(np.array(model(jnp.asarray(x.numpy()), jnp.asarray([int(t)] * 2))))
        x = scheduler.step(output, t, x).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)


# ---- configuration ---------------------------------------------------------------------------------------------


def test_the_scripts_defaults_and_flags(two_colours, tiny_unet_config):
    argv = ["--train_data_dir", str(two_colours), "--model_config_name_or_path", str(tiny_unet_config),
            "--num_epochs", "3", "--ema_max_decay", "0.99", "--save_images_epochs", "2", "--eval_batch_size", "4",
            "--ddpm_num_inference_steps", "20", "--logger", "none", "--seed", "0", "--resolution", "16"]  # fmt: skip
    config = cli.resolve(cli.parse_args(argv)[0])
    assert config.task == "unconditional"  # inferred from --model_config_name_or_path
    assert (config.num_train_epochs, config.ema_decay, config.validation_epochs) == (3, 0.99, 2)
    assert (config.num_validation_images, config.validation_num_inference_steps, config.report_to) == (4, 20, "none")
    assert (config.adam_beta1, config.adam_beta2, config.adam_weight_decay) == (0.95, 0.999, 1e-6)
    assert (config.lr_scheduler, config.lr_warmup_steps, config.image_interpolation_mode) == (
        "cosine",
        500,
        "bilinear",
    )
    assert (config.ema_use_warmup, config.ema_power, config.save_model_epochs) == (True, 0.75, 10)
    ddim = resolve(train_data_dir=str(two_colours), task="unconditional", validation_scheduler="ddim")
    assert ddim.validation_num_inference_steps == 50 and ddim.validation_epochs == 10
    by_steps = resolve(train_data_dir=str(two_colours), task="unconditional", validation_steps=5)
    assert by_steps.validation_epochs is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"cache_latents": True}, "--cache_latents does not apply to task unconditional"),
        ({"validation_prompts": ["a cat"]}, "--validation_prompts does not apply to task unconditional"),
        ({"lora_rank": 4}, "--lora_rank does not apply to task unconditional"),
        ({"resolution": 24}, "--resolution=24: each side must be a multiple of 32"),
        ({"ddpm_num_steps": 10}, "--validation_num_inference_steps=1000 (--ddpm_num_inference_steps) must be at most"),
    ],
)
def test_bad_input_is_one_clear_message(two_colours, values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TASKS["unconditional"](resolve(task="unconditional", train_data_dir=str(two_colours), **values))


def test_model_sources(tmp_path, two_colours, tiny_unet_folder):
    """A UNet folder fine-tunes from its weights; a DDPM pipeline (inferred as unconditional) brings its UNet and
    scheduler, the flags set over it; a UNet that is not RGB to RGB or a second source is refused."""
    data = {"train_data_dir": str(two_colours), "resolution": 16}
    task = TASKS["unconditional"](resolve(model_config_name_or_path=str(tiny_unet_folder), **data))
    assert task.unet_folder == tiny_unet_folder and task.model_path is None
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    DDPMPipeline(UNet2DModel.from_pretrained(tiny_unet_folder), scheduler).save_pretrained(tmp_path / "pipe")
    config = resolve(pretrained_model_name_or_path=str(tmp_path / "pipe"), ddpm_num_steps=300,
                     validation_num_inference_steps=10, **data)  # fmt: skip
    assert config.task == "unconditional"
    task = TORCH_TASKS["unconditional"](config, torch.device("cpu"))
    assert task.scheduler.config.num_train_timesteps == 300  # set by the user
    assert (task.scheduler.config.beta_schedule, task.prediction_type) == ("squaredcos_cap_v2", "sample")
    both = {**data, "pretrained_model_name_or_path": str(tmp_path / "pipe"), "task": "unconditional"}
    with pytest.raises(ConfigError, match="give one"):
        TASKS["unconditional"](resolve(model_config_name_or_path=str(tiny_unet_folder), **both))
    gray = tmp_path / "gray.json"
    gray.write_text(json.dumps({**TINY_UNET, "in_channels": 1, "out_channels": 1}))
    with pytest.raises(ConfigError, match="in_channels=1, out_channels=1"):
        TASKS["unconditional"](resolve(model_config_name_or_path=str(gray), **data))


# ---- training end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_end_to_end_resume_validation_export(backend, tmp_path, monkeypatch, tiny_unet_config, two_colours):
    """From scratch with EMA (warmup) and gradient checkpointing: 4 steps straight == 2 + resume 2 (losses, EMA
    export bit-identical), validation grids each epoch, an export every epoch and at the end, which
    DDPMPipeline loads and samples."""
    trainer = Trainer if backend == "jax" else TorchTrainer
    exports = []
    plain_export = trainer.export
    monkeypatch.setattr(trainer, "export", lambda self: (exports.append(self.out.name), plain_export(self))[1])
    batch = ["--train_batch_size", "1"] if backend == "jax" else ["--train_batch_size", "8"]
    flags = [*batch, "--model_config_name_or_path", str(tiny_unet_config), "--train_data_dir", str(two_colours),
             "--use_ema", "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--gradient_checkpointing",
             "--checkpointing_steps", "2", "--save_images_epochs", "1", "--save_model_epochs", "1",
             "--eval_batch_size", "2", "--ddpm_num_inference_steps", "3"]  # fmt: skip
    straight = run(tmp_path / "straight", *flags, "--max_train_steps", "4", backend=backend)
    run(tmp_path / "resumed", *flags, "--max_train_steps", "2", backend=backend)
    resumed = run(tmp_path / "resumed", *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                  backend=backend)  # fmt: skip
    # 16 images, 8 per step: epochs end after steps 2 and 4; an epoch's export is skipped at the last step.
    assert exports == ["straight", "straight", "resumed", "resumed"]
    assert sample_steps(straight) == [2, 4]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    pipe = DDPMPipeline.from_pretrained(straight)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.unet.config.sample_size == 16
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 3) and np.isfinite(images.images).all()
    assert (
        not (straight / "vae").exists()
        and json.loads((straight / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_losses_match_across_backends(prediction_type, tmp_path, tiny_unet_folder, two_colours):
    """The same UNet, data and host-drawn randoms: the same loss at each of 5 float32 steps on JAX and torch, and the
    same EMA weights after them, to 1e-3 of how far they moved (Min-SNR on, the script's SNR-weighted x_0 loss for
    sample prediction)."""
    outputs = {}
    for backend, trainer in (("jax", Trainer), ("torch", TorchTrainer)):
        config = resolve(
            backend=backend, model_config_name_or_path=str(tiny_unet_folder), train_data_dir=str(two_colours),
            output_dir=str(tmp_path / backend), resolution=16, train_batch_size=1 if backend == "jax" else 8,
            learning_rate=1e-3, lr_warmup_steps=0, max_train_steps=5, random_source="host", report_to="none",
            logging_steps=1, prediction_type=prediction_type, use_ema=True, random_flip=True,
            **({"snr_gamma": 5.0} if prediction_type == "epsilon" else {}),
        )  # fmt: skip
        trainer(config).train()
        outputs[backend] = tmp_path / backend
    jax_rows, torch_rows = metrics(outputs["jax"]), metrics(outputs["torch"])
    np.testing.assert_allclose([r["loss"] for r in torch_rows], [r["loss"] for r in jax_rows], rtol=1e-4)
    np.testing.assert_allclose([r["lr"] for r in torch_rows], [r["lr"] for r in jax_rows], rtol=1e-6)
    # Adam moves a weight by up to the learning rate per step whatever the size of its gradient, so where a gradient
    # is float noise (the attention key bias's is zero: softmax ignores a shift common to all keys) the frameworks'
    # weights part by ~1e-5: compare the whole update each made instead.
    start = load_file(tiny_unet_folder / "diffusion_pytorch_model.safetensors")
    ours, theirs = unet_weights(outputs["jax"]), unet_weights(outputs["torch"])
    apart = np.sqrt(sum(np.sum((ours[k] - v) ** 2) for k, v in theirs.items()))
    moved = np.sqrt(sum(np.sum((v - start[k]) ** 2) for k, v in theirs.items()))
    print(f"{prediction_type}: weights apart / moved = {apart / moved:.2e}")
    assert apart <= 1e-3 * moved


def colour_histogram(images: np.ndarray) -> np.ndarray:
    """The share of pixels in each of 4 x 4 x 4 RGB bins."""
    bins = np.clip((images.reshape(-1, 3) * 4).astype(int), 0, 3)
    counts = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
    return counts / counts.sum()


def test_a_trained_model_generates_the_datas_colours(tmp_path, tiny_unet_config, two_colours):
    """Trained on red and blue images, the model's samples have a colour histogram closer to the data's than the
    untrained model's (a 1-step run whose learning rate is 0 in warmup: its final weights are the initial ones).

    x_0 prediction (the script's SNR-weighted loss): with epsilon prediction this tiny UNet needs ~10x the steps
    before its samples leave the grey mean (x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) magnifies the
    noise estimate's error early in the chain); diffusers' own DDPMPipeline samples its export alike."""
    flags = ["--model_config_name_or_path", str(tiny_unet_config), "--train_data_dir", str(two_colours),
             "--prediction_type", "sample", "--global_batch_size", "8", "--learning_rate", "3e-3", "--lr_scheduler",
             "linear", "--lr_warmup_steps", "1", "--eval_batch_size", "16", "--validation_scheduler", "ddim",
             "--ddpm_num_inference_steps", "20", "--save_images_epochs", "1000",
             "--save_model_epochs", "1000"]  # fmt: skip
    runs = {"trained": run(tmp_path / "trained", *flags, "--max_train_steps", "300"),
            "untrained": run(tmp_path / "untrained", *flags, "--max_train_steps", "1")}  # fmt: skip
    data = colour_histogram(np.stack([np.asarray(Image.open(p)) / 255 for p in sorted(two_colours.glob("*.png"))]))
    distance = {}
    for name, out in runs.items():
        grid = sorted((out / "samples").glob("*.png"))[-1]  # the final validation's 16 images
        distance[name] = np.abs(colour_histogram(np.asarray(Image.open(grid).convert("RGB")) / 255) - data).sum()
    print(f"colour histogram L1 distance to the data: {distance}")
    assert distance["trained"] < 0.5 * distance["untrained"]
