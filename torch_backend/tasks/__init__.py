"""Training tasks of the torch backend, by the name `--task` uses."""

from torch_backend.tasks.sdxl import SDXL
from torch_backend.tasks.text_to_image import TextToImage

TASKS = {"text_to_image": TextToImage, "sdxl": SDXL}
