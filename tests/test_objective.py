"""The framework-free task roles shared by both backends."""

import json

import pytest

from jaxdiff.config import TrainConfig
from jaxdiff.hub import ModelFilesNotFoundError
from jaxdiff.objective import TextToImageRoles


@pytest.mark.parametrize(
    ("vae_config", "flags", "expected"),
    [
        ({}, {"mixed_precision": "bf16"}, "bf16"),  # SD 1.5's VAE: no force_upcast, cast like diffusers' scripts
        ({"force_upcast": False}, {"mixed_precision": "bf16"}, "bf16"),  # madebyollin/sdxl-vae-fp16-fix
        ({"force_upcast": True}, {"mixed_precision": "bf16"}, "no"),  # SDXL's VAE stays float32
        ({}, {"mixed_precision": "no"}, "no"),
        ({"force_upcast": True}, {"mixed_precision": "bf16", "vae_dtype": "bf16"}, "bf16"),  # --vae_dtype wins
        ({}, {"mixed_precision": "bf16", "vae_dtype": "fp32"}, "no"),
        ({}, {"mixed_precision": "bf16", "vae_dtype": "fp16"}, "fp16"),
    ],
)
def test_vae_precision(tmp_path, vae_config, flags, expected):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **vae_config}))
    roles = TextToImageRoles()
    roles.config, roles.vae_folder = TrainConfig(**flags), tmp_path
    assert roles.vae_precision == expected


def test_vae_precision_of_a_folder_without_config_is_one_message(tmp_path):
    roles = TextToImageRoles()
    roles.config, roles.vae_folder = TrainConfig(mixed_precision="bf16"), tmp_path
    with pytest.raises(ModelFilesNotFoundError, match=f"no config.json in {tmp_path}"):
        _ = roles.vae_precision
