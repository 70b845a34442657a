"""Training tasks of the torch backend, by the name `--task` uses: jaxdiff.tasks.base's `Task` with torch modules
and tensors, plus their sampler (`TorchTask`)."""

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from jaxdiff.config import TrainConfig
from jaxdiff.tasks.base import Task
from torch_backend.tasks.dreambooth import dreambooth
from torch_backend.tasks.lcm import lcm, lcm_lora, lcm_sdxl
from torch_backend.tasks.sdxl import SDXL
from torch_backend.tasks.text_to_image import TextToImage
from torch_backend.tasks.unconditional import Unconditional


class TorchTask(Task, Protocol):
    """A task of the torch backend: diffusers / transformers modules, loaded and placed on the device."""

    def sample(
        self, models: dict[str, torch.nn.Module], prompt: str, num_images: int, generator: torch.Generator
    ) -> np.ndarray:
        """Validation images (N, H, W, 3) in [0, 1] for one prompt, with the in-memory (unwrapped) models."""
        ...


#: Each task's constructor from the run's config and device (DreamBooth's and LCM-LoRA's pick the SD or SDXL
#: variant).
TASKS: dict[str, Callable[[TrainConfig, torch.device], TorchTask]] = {
    "text_to_image": TextToImage,
    "sdxl": SDXL,
    "dreambooth": dreambooth,
    "lcm": lcm,
    "lcm_sdxl": lcm_sdxl,
    "lcm_lora": lcm_lora,
    "unconditional": Unconditional,
}
