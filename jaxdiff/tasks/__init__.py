"""Training tasks of the JAX backend, by the name `--task` uses (the interface they fit: jaxdiff.tasks.base)."""

from collections.abc import Callable

from jaxdiff.config import TrainConfig
from jaxdiff.tasks.base import JaxTask
from jaxdiff.tasks.dreambooth import dreambooth
from jaxdiff.tasks.lcm import lcm, lcm_lora, lcm_sdxl
from jaxdiff.tasks.sdxl import SDXL
from jaxdiff.tasks.text_to_image import TextToImage
from jaxdiff.tasks.unconditional import Unconditional

#: Each task's constructor from the run's config (DreamBooth's and LCM-LoRA's pick the SD or SDXL variant from the
#: base model).
TASKS: dict[str, Callable[[TrainConfig], JaxTask]] = {
    "text_to_image": TextToImage,
    "sdxl": SDXL,
    "dreambooth": dreambooth,
    "lcm": lcm,
    "lcm_sdxl": lcm_sdxl,
    "lcm_lora": lcm_lora,
    "unconditional": Unconditional,
}
