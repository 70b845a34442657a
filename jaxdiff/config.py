"""The one training config, shared by the JAX core and the torch backend.

Field names are the flags of diffusers' training scripts (``train_text_to_image.py``, ``..._sdxl.py``,
``train_lcm_distill_*_wds.py``, ``train_unconditional.py``) with the same meanings, so a diffusers user can
paste their flags; jaxdiff's own additions are marked "(jaxdiff)". Every field carries its help text, its
theme (for ``--help``) and the tasks and backends that honour it: a field set for a task or backend that
does not use it is refused by name, never silently ignored.

This module imports neither jax nor torch.
"""

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """Bad user input: printed as one message, exit code 2, no traceback."""


Backend = Literal["jax", "torch"]
Task = Literal["text_to_image", "sdxl", "dreambooth", "lcm", "lcm_sdxl", "lcm_lora", "unconditional"]

BACKENDS: tuple[str, ...] = ("jax", "torch")
TASKS: tuple[str, ...] = ("text_to_image", "sdxl", "dreambooth", "lcm", "lcm_sdxl", "lcm_lora", "unconditional")
LCM_TASKS = ("lcm", "lcm_sdxl", "lcm_lora")
#: Tasks that fine-tune a pretrained text-to-image pipeline (SD 1.x/2.x or SDXL) with the denoising loss.
TEXT_FINETUNE_TASKS = ("text_to_image", "sdxl", "dreambooth")
TEXT_TASKS = (*TEXT_FINETUNE_TASKS, *LCM_TASKS)
FINETUNE_TASKS = (*TEXT_FINETUNE_TASKS, "unconditional")
SDXL_TASKS = ("sdxl", "lcm_sdxl")
LORA_TASKS = (*TEXT_FINETUNE_TASKS, "lcm_lora")
#: Tasks whose data is a dataset (every source of jaxdiff.data); DreamBooth reads its instance/class folders.
DATASET_TASKS = tuple(t for t in TASKS if t != "dreambooth")
#: Tasks with a VAE and text encoders whose outputs the latent cache can hold.
LATENT_TASKS = tuple(t for t in DATASET_TASKS if t != "unconditional")

GROUPS: tuple[str, ...] = (
    "Run",
    "Model",
    "Data",
    "Training",
    "Optimizer",
    "Diffusion",
    "LoRA",
    "DreamBooth",
    "LCM distillation",
    "Unconditional",
    "Memory and speed",
    "Checkpoints",
    "Validation",
    "Logging",
    "Export and hub",
)

MESH_PATTERN = re.compile(r"^([1-9]\d*)x([1-9]\d*)$")
#: Meshes named by their one axis, whatever the device count: `data` (the default) or `fsdp` (1xN).
NAMED_MESHES = ("data", "fsdp")
#: --resolution: N, or HxW (height x width; "H,W" also reads).
RESOLUTION_PATTERN = re.compile(r"^([1-9]\d*)(?:\s*[x,]\s*([1-9]\d*))?$")
#: HOST:PORT of a coordinator: a host name, IPv4 address or bracketed IPv6 address, then the port.
COORDINATOR_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$")


def _field(
    default: Any,
    description: str,
    *,
    group: str,
    tasks: tuple[str, ...] = TASKS,
    backends: tuple[str, ...] = BACKENDS,
    **kwargs: Any,
) -> Any:
    """A config field with its help text, theme and the tasks/backends that honour it."""
    assert group in GROUPS, group
    extra = {"group": group, "tasks": list(tasks), "backends": list(backends)}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class TrainConfig(BaseModel):
    """Everything a training run needs; defaults < YAML < CLI."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Run
    backend: Backend = _field(
        "jax", "(jaxdiff) Training backend: the JAX core, or diffusers + accelerate.", group="Run"
    )
    task: Task | None = _field(
        None,
        "(jaxdiff) What to train. Inferred from the model folder's model_index.json, or from "
        "--pretrained_teacher_model, when left out.",
        group="Run",
    )
    mesh: str | None = _field(
        None,
        "(jaxdiff) Device mesh 'DxM': D data-parallel replicas x M parameter shards (FSDP-style); 'fsdp' "
        "shards over every device (1xN), 'data' replicates on every device (Nx1, the default; the torch "
        "backend's only mesh).",
        group="Run",
    )
    coordinator_address: str | None = _field(
        None,
        "(jaxdiff) HOST:PORT of process 0's coordinator for a multi-process run where JAX cannot find its peers "
        "itself (CPU hosts, GPU clusters; TPU VMs and pod slices need none of the three flags). Give it with "
        "num_processes and process_id, the same on every process. Not written to config.yaml.",
        group="Run",
        backends=("jax",),
        exclude=True,
    )
    num_processes: int | None = _field(
        None,
        "(jaxdiff) Number of processes of the multi-process run (with coordinator_address).",
        group="Run",
        backends=("jax",),
        exclude=True,
        gt=0,
    )
    process_id: int | None = _field(
        None,
        "(jaxdiff) This process's index in [0, num_processes) (with coordinator_address); process 0 writes "
        "config.yaml, metrics, samples and the export.",
        group="Run",
        backends=("jax",),
        exclude=True,
        ge=0,
    )
    output_dir: str = _field(
        "jaxdiff-model",
        "Where the final diffusers pipeline, checkpoints/, samples/, metrics.jsonl and config.yaml are written.",
        group="Run",
    )
    overwrite_output_dir: bool = _field(
        False,
        "(jaxdiff) Allow writing into an existing non-empty output_dir without resuming from it.",
        group="Run",
    )
    seed: int | None = _field(
        None,
        "Seed for data order, augmentation, noise and initialisation; when not given, a resumed run keeps the "
        "one in its config.yaml, a new run draws one and records it there.",
        group="Run",
        ge=0,
        lt=2**32,
    )

    # Model
    pretrained_model_name_or_path: str | None = _field(
        None,
        "Hub id or local folder of the pretrained diffusers pipeline (for LCM: the teacher, as "
        "--pretrained_teacher_model).",
        group="Model",
    )
    revision: str | None = _field(
        None, "Hub revision (branch, tag or commit) of the pretrained pipeline (not of a separate VAE).", group="Model"
    )
    variant: str | None = _field(
        None,
        "Weight file variant to load, e.g. 'fp16' for diffusion_pytorch_model.fp16.safetensors; every loaded model of "
        "the pipeline must have it (a separate VAE loads its primary weights).",
        group="Model",
    )
    pretrained_vae_model_name_or_path: str | None = _field(
        None,
        "A different VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in half precision.",
        group="Model",
        tasks=TEXT_TASKS,
    )
    pretrained_teacher_model: str | None = _field(
        None,
        "Hub id or local folder of the teacher pipeline to distill (its UNet starts the student; its text "
        "encoders, VAE and tokenizers are the student pipeline's).",
        group="Model",
        tasks=LCM_TASKS,
    )
    cast_teacher_unet: bool = _field(
        True,
        "Store the teacher UNet in the compute dtype (--mixed_precision); off keeps float32 weights (computing in "
        "the compute dtype either way). jaxdiff default: on.",
        group="LCM distillation",
        tasks=("lcm", "lcm_sdxl"),
    )
    model_config_name_or_path: str | None = _field(
        None,
        "UNet2DModel to train: a config.json (or a folder or Hub id of one) trained from scratch, or a model folder "
        "with weights (a DDPM pipeline's unet/) fine-tuned from them; default: the butterflies tutorial's UNet at "
        "--resolution.",
        group="Model",
        tasks=("unconditional",),
    )
    cache_dir: str | None = _field(None, "Where downloaded models and datasets are cached.", group="Model")
    allow_pickled_weights: bool = _field(
        False,
        "(jaxdiff) Allow loading pickled .bin weights (read with torch.load(weights_only=True)); safetensors "
        "only by default.",
        group="Model",
    )
    train_text_encoder: bool = _field(
        False, "Fine-tune the text encoder(s) too.", group="Model", tasks=TEXT_FINETUNE_TASKS
    )

    # Data
    dataset_name: str | None = _field(
        None,
        "Hub id or local folder of a datasets dataset, or 'tfds:NAME[/CONFIG]' for TensorFlow Datasets.",
        group="Data",
        tasks=DATASET_TASKS,
    )
    dataset_config_name: str | None = _field(None, "Dataset configuration name.", group="Data", tasks=DATASET_TASKS)
    train_data_dir: str | None = _field(
        None,
        "Image folder with metadata.jsonl or metadata.csv (file_name + caption).",
        group="Data",
        tasks=DATASET_TASKS,
    )
    train_shards_path_or_url: str | None = _field(
        None,
        "WebDataset tar shards: a path, a brace pattern like shards/{00000..01099}.tar, or a 'pipe:' command.",
        group="Data",
        tasks=DATASET_TASKS,
    )
    tfds_data_dir: str | None = _field(
        None, "(jaxdiff) data_dir for tfds: datasets.", group="Data", tasks=DATASET_TASKS
    )
    image_column: str | None = _field(
        None,
        "Dataset column holding the image (default: 'image', else the first column).",
        group="Data",
        tasks=DATASET_TASKS,
    )
    caption_column: str | None = _field(
        None,
        "Dataset column holding the caption(s) (default: 'text', else the second column).",
        group="Data",
        tasks=tuple(t for t in TEXT_TASKS if t in DATASET_TASKS),
    )
    max_train_samples: int | None = _field(
        None,
        "Truncate the dataset to this many samples (debugging, quick runs).",
        group="Data",
        tasks=DATASET_TASKS,
        gt=0,
    )
    resolution: int | tuple[int, int] = _field(
        512,
        "Training image size in pixels: N for N x N, or HxW (height x width, e.g. 768x1024). Images are resized to "
        "cover it (for N: shorter side to N, as diffusers does), then cropped.",
        group="Data",
    )
    center_crop: bool = _field(False, "Center crop to resolution (default: random crop).", group="Data")
    random_flip: bool = _field(False, "Randomly flip images horizontally.", group="Data")
    image_interpolation_mode: Literal["lanczos", "bilinear", "bicubic", "nearest", "box", "hamming"] = _field(
        "lanczos", "Resampling filter used to resize images.", group="Data"
    )
    proportion_empty_prompts: float = _field(
        0.0,
        "Fraction of captions replaced by the empty prompt (for classifier-free guidance).",
        group="Data",
        tasks=TEXT_TASKS,
        ge=0.0,
        le=1.0,
    )
    dataloader_num_workers: int = _field(
        0, "Background workers decoding and augmenting images (0: in the main process).", group="Data", ge=0
    )
    cache_latents: bool = _field(
        False,
        "(jaxdiff) Encode images with the VAE (and captions) once, cache on disk, and train from the cache.",
        group="Data",
        tasks=LATENT_TASKS,
    )
    latent_cache_dir: str | None = _field(
        None,
        "(jaxdiff) Where the latent cache lives (default: output_dir/latent_cache).",
        group="Data",
        tasks=LATENT_TASKS,
    )

    # Training
    train_batch_size: int = _field(16, "Batch size per device.", group="Training", gt=0)
    global_batch_size: int | None = _field(
        None,
        "(jaxdiff) Global batch size split over all devices; overrides train_batch_size and must divide evenly.",
        group="Training",
        backends=("jax",),
        gt=0,
    )
    num_train_epochs: int = _field(100, "Epochs to train (max_train_steps wins when set).", group="Training", gt=0)
    max_train_steps: int | None = _field(
        None, "Optimizer steps to train; overrides num_train_epochs.", group="Training", gt=0
    )
    gradient_accumulation_steps: int = _field(
        1, "Micro-batches accumulated per optimizer step.", group="Training", gt=0
    )
    max_grad_norm: float = _field(1.0, "Clip gradients to this global norm (0 disables).", group="Training", ge=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = _field(
        "no", "Compute precision; master weights stay float32.", group="Training"
    )
    use_ema: bool = _field(
        False,
        "Keep an exponential moving average of the trained weights (exported by default).",
        group="Training",
        tasks=FINETUNE_TASKS,
    )
    ema_decay: float | None = _field(
        None,
        "EMA decay: the maximum decay of the fine-tuning EMA (default 0.9999), or the LCM target network's "
        "decay (default 0.95).",
        group="Training",
        gt=0.0,
        lt=1.0,
    )
    ema_use_warmup: bool = _field(
        False,
        "Use diffusers' EMA warmup: decay = 1 - (1 + step / inv_gamma) ** -power.",
        group="Training",
        tasks=FINETUNE_TASKS,
    )
    ema_inv_gamma: float = _field(1.0, "EMA warmup inv_gamma.", group="Training", tasks=FINETUNE_TASKS, gt=0.0)
    ema_power: float = _field(2 / 3, "EMA warmup power.", group="Training", tasks=FINETUNE_TASKS, gt=0.0)

    # Optimizer
    learning_rate: float = _field(1e-4, "Peak learning rate (after warmup).", group="Optimizer", gt=0.0)
    scale_lr: bool = _field(
        False,
        "Multiply the learning rate by devices x batch size x accumulation steps.",
        group="Optimizer",
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = _field("constant", "Learning-rate schedule (curves equal diffusers' get_scheduler).", group="Optimizer")
    lr_warmup_steps: int = _field(500, "Linear warmup steps.", group="Optimizer", ge=0)
    lr_num_cycles: int = _field(1, "Hard restarts for cosine_with_restarts.", group="Optimizer", gt=0)
    lr_power: float = _field(1.0, "Power of the polynomial schedule.", group="Optimizer", gt=0.0)
    use_8bit_adam: bool = _field(
        False,
        "8-bit AdamW optimizer states: bitsandbytes' AdamW8bit on torch, jaxdiff's blockwise 8-bit Adam on JAX.",
        group="Optimizer",
    )
    adam_beta1: float = _field(0.9, "AdamW first-moment decay (beta1).", group="Optimizer", ge=0.0, lt=1.0)
    adam_beta2: float = _field(0.999, "AdamW second-moment decay (beta2).", group="Optimizer", ge=0.0, lt=1.0)
    adam_weight_decay: float = _field(1e-2, "AdamW decoupled weight decay.", group="Optimizer", ge=0.0)
    adam_epsilon: float = _field(1e-8, "AdamW denominator epsilon.", group="Optimizer", gt=0.0)

    # Diffusion
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = _field(
        None,
        "Training target; default: the scheduler config's prediction_type.",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
    )
    snr_gamma: float | None = _field(
        None,
        "Min-SNR-gamma loss weighting (recommended 5.0); off when unset.",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
        gt=0.0,
    )
    noise_offset: float = _field(
        0.0,
        "Offset noise scale: noise += offset * randn(B, C, 1, 1).",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
        ge=0.0,
    )
    input_perturbation: float = _field(
        0.0,
        "Input perturbation scale (noise for add_noise = noise + p * randn).",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
        ge=0.0,
    )
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = _field(
        "none",
        "Bias timestep sampling towards earlier or later timesteps, or a range.",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
    )
    timestep_bias_multiplier: float = _field(
        1.0, "Weight multiplier of the biased timesteps (must be > 0).", group="Diffusion", tasks=FINETUNE_TASKS
    )
    timestep_bias_begin: int = _field(
        0, "First timestep of the 'range' bias.", group="Diffusion", tasks=FINETUNE_TASKS, ge=0
    )
    timestep_bias_end: int = _field(
        1000, "End timestep of the 'range' bias.", group="Diffusion", tasks=FINETUNE_TASKS, ge=0
    )
    timestep_bias_portion: float = _field(
        0.25,
        "Portion of timesteps the earlier/later bias covers.",
        group="Diffusion",
        tasks=FINETUNE_TASKS,
        gt=0.0,
        le=1.0,
    )
    random_source: Literal["device", "host"] = _field(
        "device",
        "(jaxdiff) Where each step's noise, timesteps and latent samples are drawn: 'device' (fast), or 'host' "
        "(NumPy, from seed and step) so that both backends see identical inputs, for cross-backend parity.",
        group="Diffusion",
    )
    loss_type: Literal["l2", "huber"] = _field("l2", "Loss between prediction and target.", group="Diffusion")
    huber_c: float = _field(0.001, "Pseudo-Huber loss parameter c: sqrt(d^2 + c^2) - c.", group="Diffusion", gt=0.0)

    # LCM distillation
    w_min: float = _field(
        5.0, "Minimum guidance scale sampled for distillation.", group="LCM distillation", tasks=LCM_TASKS
    )
    w_max: float = _field(
        15.0, "Maximum guidance scale sampled for distillation.", group="LCM distillation", tasks=LCM_TASKS
    )
    num_ddim_timesteps: int = _field(
        50, "Timesteps of the skipping-step DDIM solver.", group="LCM distillation", tasks=LCM_TASKS, gt=0
    )
    timestep_scaling_factor: float = _field(
        10.0, "Boundary-condition timestep scaling.", group="LCM distillation", tasks=LCM_TASKS, gt=0.0
    )
    unet_time_cond_proj_dim: int = _field(
        256,
        "Dimension of the guidance-scale embedding added to the student UNet.",
        group="LCM distillation",
        tasks=("lcm", "lcm_sdxl"),
        gt=0,
    )

    # LoRA
    lora_rank: int | None = _field(
        None,
        "Train LoRA adapters of this rank (alias --rank) instead of the full weights; the export is then "
        "pytorch_lora_weights.safetensors (lcm_lora: default 64).",
        group="LoRA",
        tasks=LORA_TASKS,
        gt=0,
    )
    lora_alpha: float | None = _field(
        None,
        "LoRA alpha: adapters are scaled by alpha / rank (default: alpha = rank).",
        group="LoRA",
        tasks=LORA_TASKS,
        gt=0.0,
    )
    lora_dropout: float = _field(
        0.0, "Dropout on the LoRA adapters' inputs while training.", group="LoRA", tasks=LORA_TASKS, ge=0.0, lt=1.0
    )
    lora_target_modules: list[str] | None = _field(
        None,
        "UNet modules that get adapters, by name or name suffix as peft matches them (default: to_k to_q to_v "
        "to_out.0, and add_k_proj add_v_proj where present); the text encoders' are q_proj k_proj v_proj out_proj.",
        group="LoRA",
        tasks=LORA_TASKS,
    )
    output_kohya_format: bool = _field(
        False,
        "Also write the adapters in kohya's format (pytorch_lora_weights_kohya.safetensors).",
        group="LoRA",
        tasks=LORA_TASKS,
    )
    merge_lora: bool = _field(
        False,
        "(jaxdiff) Also export a full pipeline with the adapters merged into the weights.",
        group="LoRA",
        tasks=LORA_TASKS,
    )

    # DreamBooth
    instance_data_dir: str | None = _field(
        None,
        "Folder of the instance images (every image file in it), each trained with instance_prompt.",
        group="DreamBooth",
        tasks=("dreambooth",),
    )
    instance_prompt: str | None = _field(
        None,
        "The prompt naming the instance, e.g. 'a photo of sks dog'.",
        group="DreamBooth",
        tasks=("dreambooth",),
    )
    with_prior_preservation: bool = _field(
        False,
        "Add the prior-preservation loss on class images (class_data_dir, class_prompt).",
        group="DreamBooth",
        tasks=("dreambooth",),
    )
    class_data_dir: str | None = _field(
        None,
        "Folder of the class images; missing ones (up to num_class_images) are generated into it from the base "
        "model before training, sampled as validation images are.",
        group="DreamBooth",
        tasks=("dreambooth",),
    )
    class_prompt: str | None = _field(
        None,
        "The prompt of the class images, e.g. 'a photo of dog'.",
        group="DreamBooth",
        tasks=("dreambooth",),
    )
    prior_loss_weight: float = _field(
        1.0, "Weight of the prior-preservation loss.", group="DreamBooth", tasks=("dreambooth",), ge=0.0
    )
    num_class_images: int = _field(
        100,
        "Class images the prior loss uses (the first ones of class_data_dir in name order); fewer are completed "
        "by generation.",
        group="DreamBooth",
        tasks=("dreambooth",),
        gt=0,
    )
    sample_batch_size: int = _field(
        4, "Batch size of class-image generation.", group="DreamBooth", tasks=("dreambooth",), gt=0
    )

    # Unconditional
    ddpm_num_steps: int = _field(
        1000, "Training timesteps of the DDPM schedule.", group="Unconditional", tasks=("unconditional",), gt=0
    )
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = _field(
        "linear", "Beta schedule of the DDPM scheduler.", group="Unconditional", tasks=("unconditional",)
    )
    validation_scheduler: Literal["ddpm", "ddim"] = _field(
        "ddpm",
        "(jaxdiff) Sampler of the validation images: DDPM (as the script's DDPMPipeline) or DDIM (deterministic, "
        "good in far fewer steps: 50 by default).",
        group="Unconditional",
        tasks=("unconditional",),
    )

    # Memory and speed
    gradient_checkpointing: bool = _field(
        False, "Recompute activations in the backward pass to save memory.", group="Memory and speed"
    )
    vae_dtype: Literal["fp32", "bf16", "fp16"] | None = _field(
        None,
        "(jaxdiff) dtype of the frozen VAE. Default: float32 when its config.json sets force_upcast (SDXL's VAE), "
        "else the compute dtype of --mixed_precision (SD 1.5's, as diffusers' scripts cast it).",
        group="Memory and speed",
        tasks=TEXT_TASKS,
    )
    attention_implementation: Literal["auto", "xla", "cudnn", "chunked", "splash"] = _field(
        "auto",
        "(jaxdiff) Attention of the JAX models: xla, cudnn (fused, GPU; needs --mixed_precision fp16/bf16, layers "
        "it cannot run use xla), chunked (memory-efficient: the backward recomputes attention probabilities in "
        "query blocks instead of storing them) or splash (Pallas flash attention for the self-attention, TPU v4 "
        "and later; xla on TPU v3); auto: splash on TPU v4+, xla on TPU v3, cudnn on GPU, chunked on CPU "
        "(measured faster there).",
        group="Memory and speed",
        backends=("jax",),
    )
    enable_xformers_memory_efficient_attention: bool = _field(
        False, "Use xFormers attention (needs xformers and CUDA).", group="Memory and speed", backends=("torch",)
    )
    allow_tf32: bool = _field(
        False, "Allow TF32 matmuls on Ampere+ GPUs.", group="Memory and speed", backends=("torch",)
    )

    # Checkpoints
    checkpointing_steps: int = _field(500, "Save a checkpoint every N optimizer steps.", group="Checkpoints", gt=0)
    checkpoints_total_limit: int | None = _field(
        None, "Keep at most this many checkpoints (oldest removed first).", group="Checkpoints", gt=0
    )
    resume_from_checkpoint: str | None = _field(
        None, "'latest' (in output_dir/checkpoints) or a checkpoint path to continue from.", group="Checkpoints"
    )

    # Validation
    validation_prompts: list[str] | None = _field(
        None,
        "Prompts sampled at each validation (every validation_steps or validation_epochs) and, as in diffusers' "
        "scripts, once more with the final weights unless the last step was just validated.",
        group="Validation",
        tasks=TEXT_TASKS,
    )
    validation_epochs: int | None = _field(
        None, "Validate every N epochs (alias --save_images_epochs; unconditional: 10).", group="Validation", gt=0
    )
    validation_steps: int | None = _field(None, "Validate every N optimizer steps.", group="Validation", gt=0)
    num_validation_images: int = _field(
        4,
        "Images per validation prompt (unconditional: images per validation, alias --eval_batch_size).",
        group="Validation",
        gt=0,
    )
    validation_guidance_scale: float = _field(
        7.5,
        "(jaxdiff) Classifier-free guidance scale of validation sampling (lcm, lcm_sdxl: the student's guidance "
        "embedding gets w = scale - 1, as diffusers' pipelines; lcm_lora: default 1.0, no guidance).",
        group="Validation",
        tasks=TEXT_TASKS,
    )
    validation_num_inference_steps: int = _field(
        25,
        "Sampling steps of validation images (alias --ddpm_num_inference_steps; LCM: 4; unconditional: 1000, with "
        "--validation_scheduler ddim 50).",
        group="Validation",
        gt=0,
    )

    # Logging
    logging_steps: int = _field(
        10, "(jaxdiff) Log metrics every N optimizer steps (fetching them from the device).", group="Logging", gt=0
    )
    report_to: Literal["tensorboard", "wandb", "all", "none"] = _field(
        "tensorboard", "Where metrics go besides output_dir/metrics.jsonl.", group="Logging"
    )
    logging_dir: str = _field("logs", "TensorBoard log folder, relative to output_dir.", group="Logging")
    tracker_project_name: str = _field("jaxdiff", "W&B project name.", group="Logging")

    # Export and hub
    export_dtype: Literal["fp32", "fp16", "bf16"] = _field(
        "fp32", "(jaxdiff) dtype of the exported diffusers weights.", group="Export and hub"
    )
    export_ema: bool = _field(
        True, "(jaxdiff) Export the EMA weights when use_ema is on.", group="Export and hub", tasks=FINETUNE_TASKS
    )
    save_model_epochs: int | None = _field(
        None,
        "Also export the pipeline (and upload it with push_to_hub) every N epochs, not only at the end "
        "(unconditional: 10, as diffusers' train_unconditional.py).",
        group="Export and hub",
        gt=0,
    )
    push_to_hub: bool = _field(False, "Upload the final pipeline to the Hugging Face Hub.", group="Export and hub")
    hub_model_id: str | None = _field(None, "Hub repository for push_to_hub.", group="Export and hub")
    hub_token: str | None = _field(
        None,
        "Hub token for downloads and push_to_hub (default: HF_TOKEN or `hf auth login`; never written to "
        "config.yaml).",
        group="Export and hub",
        exclude=True,
    )

    @field_validator("mesh")
    @classmethod
    def _mesh_format(cls, value: str | None) -> str | None:
        if value is not None and value not in NAMED_MESHES and not MESH_PATTERN.match(value):
            raise ValueError("must be 'DxM' with positive integers (e.g. 8x1, 2x4, 1x8), 'data' or 'fsdp'")
        return value

    @field_validator("resolution", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> Any:
        """N, "N", "HxW", "H,W" or [H, W] -> N (a square) or (H, W), each side a positive integer."""
        if isinstance(value, str):
            match = RESOLUTION_PATTERN.match(value.strip())
            value = [int(side) for side in match.groups() if side] if match else []
        sides = list(value) if isinstance(value, list | tuple) else [value]
        if not 1 <= len(sides) <= 2 or any(isinstance(side, int) and side <= 0 for side in sides):
            raise ValueError("must be N (a square) or HxW (height x width), positive integers, e.g. 512 or 768x1024")
        return sides[0] if len(set(sides)) == 1 else tuple(sides)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the training images."""
        size = self.resolution
        return (size, size) if isinstance(size, int) else size

    @field_validator("coordinator_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            match = COORDINATOR_PATTERN.match(value)
            if not match or not 1 <= int(match.group(2)) <= 65535:
                raise ValueError("must be HOST:PORT with a port in 1..65535, e.g. 10.0.0.2:1234 or [::1]:1234")
        return value

    @field_validator("validation_prompts")
    @classmethod
    def _prompts_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must hold at least one prompt (or leave it unset)")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "TrainConfig":
        sources = [
            name for name in ("dataset_name", "train_data_dir", "train_shards_path_or_url") if getattr(self, name)
        ]
        if len(sources) > 1:
            raise ValueError(f"give one data source, not {' and '.join(sources)}")
        if self.timestep_bias_multiplier <= 0:
            raise ValueError(
                f"timestep_bias_multiplier={self.timestep_bias_multiplier} must be > 0 "
                "(use timestep_bias_strategy none to disable the bias)"
            )
        if self.timestep_bias_strategy == "range" and self.timestep_bias_begin >= self.timestep_bias_end:
            raise ValueError(
                f"timestep_bias_begin={self.timestep_bias_begin} must be < timestep_bias_end={self.timestep_bias_end}"
            )
        if self.w_min > self.w_max:
            raise ValueError(f"w_min={self.w_min} must be <= w_max={self.w_max}")
        if self.attention_implementation == "cudnn" and self.mixed_precision == "no":
            raise ValueError(
                "attention_implementation=cudnn needs --mixed_precision fp16 or bf16: cuDNN's fused attention takes "
                "no float32 (use xla, or auto)"
            )
        if self.validation_epochs is not None and self.validation_steps is not None:
            raise ValueError("give validation_epochs or validation_steps, not both")
        launch = {n: getattr(self, n) for n in ("coordinator_address", "num_processes", "process_id")}
        missing = [f"--{n}" for n, v in launch.items() if v is None]
        if missing and len(missing) < len(launch):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together (all three, or none on TPU "
                f"VMs, where JAX finds its peers itself); missing {', '.join(missing)}"
            )
        if not missing and self.process_id >= self.num_processes:
            raise ValueError(f"process_id={self.process_id} must be in [0, num_processes={self.num_processes})")
        lora_options = ("lora_alpha", "lora_target_modules", "output_kohya_format", "merge_lora", "lora_dropout")
        set_lora = [f"--{name}" for name in lora_options if getattr(self, name) not in (None, False, 0.0)]
        if set_lora and self.lora_rank is None and self.task != "lcm_lora":
            raise ValueError(f"{', '.join(set_lora)} configure LoRA training, which --lora_rank turns on")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module (or leave it unset)")
        prior_options = (
            "class_data_dir",
            "class_prompt",
            "prior_loss_weight",
            "num_class_images",
            "sample_batch_size",
        )
        set_prior = [f"--{n}" for n in prior_options if getattr(self, n) != type(self).model_fields[n].default]
        if self.with_prior_preservation and (self.class_data_dir is None or self.class_prompt is None):
            raise ValueError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if set_prior and not self.with_prior_preservation:
            raise ValueError(f"{', '.join(set_prior)} configure --with_prior_preservation, which is off")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id")
        return self


#: Defaults that differ by task (diffusers' LCM scripts validate in 4 steps; their LoRA variant without guidance).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "lcm": {"validation_num_inference_steps": 4},
    "lcm_sdxl": {"validation_num_inference_steps": 4},
    "lcm_lora": {"validation_num_inference_steps": 4, "validation_guidance_scale": 1.0},
    # diffusers' train_unconditional.py: its argument defaults and its always-on EMA warmup.
    "unconditional": {
        "resolution": 64,
        "image_interpolation_mode": "bilinear",
        "lr_scheduler": "cosine",
        "adam_beta1": 0.95,
        "adam_weight_decay": 1e-6,
        "ema_use_warmup": True,
        "ema_power": 3 / 4,
        "validation_epochs": 10,
        "num_validation_images": 16,
        "validation_num_inference_steps": 1000,
        "save_model_epochs": 10,
    },
}
#: Validation steps of a DDIM-sampled unconditional model when not given.
DDIM_VALIDATION_STEPS = 50


def with_task_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its task's `TASK_DEFAULTS` for the fields the user did not set (a step schedule of
    validation replaces the default epoch one; DDIM validates in 50 steps)."""
    defaults = dict(TASK_DEFAULTS.get(config.task or "", {}))
    if "validation_steps" in config.model_fields_set:
        defaults.pop("validation_epochs", None)
    if config.task == "unconditional" and config.validation_scheduler == "ddim":
        defaults["validation_num_inference_steps"] = DDIM_VALIDATION_STEPS
    unset = {k: v for k, v in defaults.items() if k not in config.model_fields_set}
    return config.model_copy(update=unset) if unset else config


def field_meta(name: str) -> dict[str, Any]:
    """The theme, tasks and backends recorded on a field."""
    extra = TrainConfig.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)
    return extra


def unsupported_fields(config: TrainConfig) -> list[str]:
    """Fields the user set that the config's task or backend does not honour, each with the reason."""
    problems = []
    for name in sorted(config.model_fields_set):
        meta = field_meta(name)
        if config.backend not in meta["backends"]:
            problems.append(
                f"--{name} is not supported by the {config.backend} backend (only {', '.join(meta['backends'])})"
            )
        elif config.task is not None and config.task not in meta["tasks"]:
            problems.append(f"--{name} does not apply to task {config.task} (only {', '.join(meta['tasks'])})")
    if config.backend == "jax" and config.mixed_precision == "fp16":
        problems.append(
            "--mixed_precision=fp16 is not supported by the jax backend (it keeps no loss scale, and fp16 gradients "
            "underflow); use --mixed_precision bf16: float32's range at half the bytes, native on TPUs and Ampere+ "
            "GPUs (--vae_dtype fp16 still runs the frozen VAE in fp16)"
        )
    if config.backend == "torch" and config.mesh not in (None, "data"):
        problems.append(
            f"--mesh={config.mesh!r}: the torch backend trains data-parallel only (one replica per GPU, accelerate); "
            "pass --mesh data or leave it out"
        )
    return problems
