"""The schema: diffusers' flag names, help on every field, cross-field rules, every shipped preset valid."""

from pathlib import Path

import pytest
import yaml

from jaxdiff.cli import validate
from jaxdiff.config import BACKENDS, GROUPS, TASKS, ConfigError, TrainConfig, field_meta, unsupported_fields

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# The flags of diffusers' training scripts the issue names; each must exist with the same name.
DIFFUSERS_FLAGS = """
pretrained_model_name_or_path revision variant pretrained_vae_model_name_or_path pretrained_teacher_model
dataset_name dataset_config_name train_data_dir train_shards_path_or_url image_column caption_column
max_train_samples resolution center_crop random_flip image_interpolation_mode proportion_empty_prompts
train_batch_size num_train_epochs max_train_steps gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay
adam_epsilon max_grad_norm use_ema ema_decay snr_gamma prediction_type noise_offset input_perturbation
timestep_bias_strategy timestep_bias_multiplier timestep_bias_begin timestep_bias_end timestep_bias_portion w_min
w_max num_ddim_timesteps loss_type huber_c timestep_scaling_factor unet_time_cond_proj_dim lora_rank lora_alpha
mixed_precision enable_xformers_memory_efficient_attention checkpointing_steps checkpoints_total_limit
resume_from_checkpoint output_dir seed validation_prompts validation_epochs validation_steps num_validation_images
report_to push_to_hub hub_model_id dataloader_num_workers backend mesh task logging_steps instance_data_dir
instance_prompt class_data_dir class_prompt with_prior_preservation prior_loss_weight num_class_images
sample_batch_size train_text_encoder
""".split()


def test_schema_has_every_named_flag_with_help_and_theme():
    fields = TrainConfig.model_fields
    assert [name for name in DIFFUSERS_FLAGS if name not in fields] == []
    for name, field in fields.items():
        assert field.description and len(field.description) > 10, name
        meta = field_meta(name)
        assert meta["group"] in GROUPS
        assert set(meta["tasks"]) <= set(TASKS) and meta["tasks"]
        assert set(meta["backends"]) <= set(BACKENDS) and meta["backends"]


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="learnig_rate"):
        validate({"learnig_rate": 1e-4})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"timestep_bias_multiplier": 0.0}, "timestep_bias_multiplier=0.0 must be > 0"),
        ({"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 100}, "must be <"),
        ({"w_min": 10.0, "w_max": 5.0}, "w_min=10.0 must be <= w_max=5.0"),
        ({"validation_epochs": 1, "validation_steps": 10}, "not both"),
        ({"dataset_name": "a/b", "train_data_dir": "."}, "one data source"),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"mesh": "8"}, "--mesh='8'"),
        ({"proportion_empty_prompts": 1.5}, "--proportion_empty_prompts=1.5"),
        ({"validation_prompts": []}, "at least one prompt"),
    ],
)
def test_cross_field_rules(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(values)


def test_fields_are_refused_for_tasks_and_backends_that_ignore_them():
    values = {"task": "text_to_image", "w_min": 3.0, "mesh": "2x4", "coordinator_address": "10.0.0.1:1234",
              "num_processes": 2, "process_id": 0}  # fmt: skip
    problems = unsupported_fields(validate(values).model_copy(update={"backend": "torch"}))
    assert any("--w_min does not apply to task text_to_image" in p for p in problems)
    assert any("--coordinator_address is not supported by the torch backend" in p for p in problems)
    assert any("--mesh='2x4': the torch backend trains data-parallel only" in p for p in problems)
    # A preset's `mesh: fsdp` runs on GPUs with --mesh data: the torch backend's one mesh.
    data_parallel = validate({"task": "sdxl", "mesh": "data"}).model_copy(update={"backend": "torch"})
    assert unsupported_fields(data_parallel) == []
    # fp16 compute: the torch backend scales the loss; the jax backend refuses it and names bf16.
    (fp16,) = unsupported_fields(validate({"task": "sdxl", "mixed_precision": "fp16"}))
    assert "--mixed_precision=fp16 is not supported by the jax backend" in fp16 and "--mixed_precision bf16" in fp16
    torch_fp16 = validate({"task": "sdxl", "mixed_precision": "fp16"}).model_copy(update={"backend": "torch"})
    assert unsupported_fields(torch_fp16) == []
    # The LCM scripts parse --center_crop and ignore it; we honour it, so it is accepted.
    assert unsupported_fields(validate({"task": "lcm", "center_crop": True})) == []


def test_secrets_are_not_dumped():
    assert "hub_token" not in validate({"hub_token": "hf_secret"}).model_dump()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_presets_validate(path):
    text = path.read_text()
    assert "# Run: python -m jaxdiff." in text, "every preset names its run command in its header"
    config = validate(yaml.safe_load(text))
    assert config.task is not None
    assert unsupported_fields(config) == []


def test_all_presets_present():
    names = {p.stem for p in CONFIGS}
    assert {
        "demo",
        "sd15_text_to_image",
        "sd21_v_prediction",
        "sdxl",
        "lcm_sd15",
        "unconditional",
        "dreambooth_sd15",
    } <= names
