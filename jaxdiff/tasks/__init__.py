"""Training tasks of the JAX backend, by the name `--task` uses."""

from jaxdiff.tasks.sdxl import SDXL
from jaxdiff.tasks.text_to_image import TextToImage

TASKS = {"text_to_image": TextToImage, "sdxl": SDXL}
