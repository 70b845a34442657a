"""The interface of a task plug-in: what the loop and the trainers of both backends read of a task, typed once.

`Task` is the part both backends share (the models and which of their parameters train, the step's random
draws, the loss, what the export starts from); `LatentCacheTask` adds the encoders of tasks with a VAE and text
encoders (what --cache_latents runs); `JaxTask` adds what the JAX trainer needs to load, shard and compile the step
without weights and to sample with jit. The torch tasks
(``torch_backend.tasks``) fit `Task` with torch modules and tensors and add their own sampler
(``torch_backend.tasks.TorchTask``). ``jaxdiff.objective`` holds the framework-free parts the tasks share.
"""

from typing import Any, ClassVar, Protocol

import numpy as np

from jaxdiff.adapters import LoRASettings
from jaxdiff.config import TrainConfig
from jaxdiff.data.dreambooth import ClassImageRequest

#: A target network's model name: its trained module's with this suffix (``unet_target``, as diffusers saves it).
TARGET_SUFFIX = "_target"

Batch = dict[str, Any]


class Task(Protocol):
    """A training objective and its models, on either backend."""

    #: The ``--task`` name.
    name: ClassVar[str]
    config: TrainConfig
    #: The base pipeline (Hub id or folder) the export copies untrained components from; None: the export is the
    #: trained modules and `copied_components` alone, a pipeline of `export_pipeline_class`.
    model_path: str | None
    #: The ``_class_name`` of an export without a base pipeline (e.g. DDPMPipeline), else None.
    export_pipeline_class: str | None

    @property
    def lora(self) -> LoRASettings | None:
        """The run's LoRA adapters (then only they train, in every `trainable` module), or None: full weights."""
        ...

    @property
    def trainable(self) -> dict[str, Any]:
        """Modules whose parameters (with LoRA: whose adapters) are optimised and exported, by component name."""
        ...

    @property
    def frozen(self) -> dict[str, Any]:
        """Modules the loss uses but never updates (the VAE, text encoders that do not train)."""
        ...

    @property
    def target_decay(self) -> float | None:
        """The decay of the task's target network, or None: an EMA of the `trainable` modules, updated after every
        optimizer step, checkpointed and sharded like them, that the loss reads as ``<name>_target`` modules of its
        ``models`` (LCM's) and the export writes beside the pipeline (``unet_target/``)."""
        ...

    @property
    def images_to_generate(self) -> ClassImageRequest | None:
        """Images the run samples from the base model before its data loads (DreamBooth's class images), or None."""
        ...

    @property
    def copied_components(self) -> dict[str, Any]:
        """Pipeline components the export writes besides the trained modules (scheduler, tokenizers, ...)."""
        ...

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """The tokenizer of each text encoder, in conditioning order (the data pipeline tokenizes with them)."""
        ...

    def draw(self, rng: Any, batch_size: int) -> Batch:
        """Every random number one optimizer step needs, per sample, from the backend's generator."""
        ...

    def draw_host(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The same draws made with NumPy from (seed, step), identical on both backends (`--random_source host`)."""
        ...

    def loss(self, models: dict[str, Any], batch: Batch, randoms: Batch) -> tuple[Any, dict[str, Any]]:
        """(the scalar loss of one micro-batch, further scalar metrics by name: e.g. a loss's parts), from every
        module by name, the batch and its rows' draws. The trainers average both over micro-batches (and
        processes) and log the metrics beside loss, grad_norm and lr."""
        ...


class LatentCacheTask(Protocol):
    """What the latent cache (--cache_latents) reads of a task with a frozen VAE and text encoders."""

    @property
    def tokenizers(self) -> tuple[Any, ...]: ...

    def encode_images(self, pixel_values: np.ndarray) -> tuple[Any, Any]:
        """(mean, logvar) of the frozen VAE's latent distribution, for the latent cache."""
        ...

    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, Any]:
        """The frozen text conditioning of token ids, for the latent cache."""
        ...

    def cache_fingerprint(self) -> str:
        """Identifies what the cache's encoders compute (weights, dtypes, backend)."""
        ...


class JaxTask(Task, Protocol):
    """A task of the JAX backend: abstract models (shapes only) whose weights the trainer reads, sharded."""

    #: Each module's weights file (`RandomInit` for a model trained from scratch), read by the trainer straight into
    #: sharded arrays.
    pretrained: dict[str, Any]

    @property
    def train_filter(self) -> Any:
        """The nnx variable type that trains in the `trainable` modules (LoRA adapters, or every parameter)."""
        ...

    def abstract_batch(self, batch_size: int) -> dict[str, Any]:
        """Shapes and dtypes of a batch as the data pipeline delivers it (to compile the step without data)."""
        ...

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids of validation prompts, as `sample` takes them (unconditional: one row per image to sample)."""
        ...

    def sample(self, models: dict[str, Any], prompt_ids: Batch, rng: Any) -> Any:
        """Validation images (N, H, W, 3) in [0, 1] for tokenized prompts (jitted by the trainer)."""
        ...
