"""Training tasks of the JAX backend, by the name `--task` uses (the interface they fit: jaxdiff.tasks.base)."""

from jaxdiff.tasks.base import JaxTask
from jaxdiff.tasks.sdxl import SDXL
from jaxdiff.tasks.text_to_image import TextToImage

TASKS: dict[str, type[JaxTask]] = {"text_to_image": TextToImage, "sdxl": SDXL}
