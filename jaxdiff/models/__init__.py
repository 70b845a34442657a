"""Flax NNX models with diffusers'/transformers' module names, configs and weight files."""

from jaxdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel
from jaxdiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "DiagonalGaussian",
    "ModelConfig",
    "PretrainedModel",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "UNet2DConfig",
    "UNet2DModel",
]
