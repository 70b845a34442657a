"""CLIP text encoders (SD 1.x/2.x, and both SDXL encoders), numerically equal to transformers' torch classes.

Module paths copy transformers' (``text_model.encoder.layers.N.self_attn.q_proj``, ...), so conversion is by name.
"""

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import checkpointed
from jaxdiff.models.modeling import ModelConfig, PretrainedModel

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": nn.gelu,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """transformers' ``CLIPTextConfig`` keys and defaults.

    ``initializer_range``/``initializer_factor`` only shape torch's random init and ``pad_token_id``/``bos_token_id``
    only the tokenizer; they are kept so configs round-trip. ``eos_token_id`` selects the pooled token.
    """

    model_type: ClassVar[str] = "clip_text_model"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407


@flax.struct.dataclass
class BaseModelOutputWithPooling:
    """``last_hidden_state`` is final-layer-normed; ``hidden_states`` (embeddings output, then every layer's
    output before the final norm) is set only with ``output_hidden_states=True``."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class CLIPTextModelOutput:
    """``text_embeds`` is the projected pooled output (SDXL's pooled text embedding)."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.token_embedding = nn.embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nn.embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        attention_impl: nn.AttentionImpl,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.k_proj = nn.linear(hidden_size, hidden_size, **kw)
        self.v_proj = nn.linear(hidden_size, hidden_size, **kw)
        self.q_proj = nn.linear(hidden_size, hidden_size, **kw)
        self.out_proj = nn.linear(hidden_size, hidden_size, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, seq, _ = x.shape
        q, k, v = (proj(x).reshape(batch, seq, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # transformers computes the softmax in float32 whatever the compute dtype.
        out = nn.attention(q, k, v, mask=mask, is_causal=True, upcast=True, implementation=self.attention_impl)
        return self.out_proj(out.reshape(batch, seq, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.hidden_act = config.hidden_act
        self.fc1 = nn.linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = nn.linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        attention_impl: nn.AttentionImpl,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.self_attn = CLIPAttention(
            config.hidden_size, config.num_attention_heads, attention_impl=attention_impl, **kw
        )
        self.layer_norm1 = nn.layer_norm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = nn.layer_norm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        attention_impl: nn.AttentionImpl,
        gradient_checkpointing: bool,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(
                    config, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """Every layer's output, in order."""
        call = checkpointed(CLIPEncoderLayer.__call__, self.gradient_checkpointing)
        outputs = []
        for layer in self.layers:
            x = call(layer, x, mask)
            outputs.append(x)
        return tuple(outputs)


class CLIPTextTransformer(nnx.Module):
    """Embeddings, causal pre-norm encoder, final norm, and pooling at the end-of-text token."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        attention_impl: nn.AttentionImpl,
        gradient_checkpointing: bool,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.max_positions = config.max_position_embeddings
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(
            config, attention_impl=attention_impl, gradient_checkpointing=gradient_checkpointing, **kw
        )
        self.final_layer_norm = nn.layer_norm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, output_hidden_states: bool
    ) -> BaseModelOutputWithPooling:
        if input_ids.shape[-1] > self.max_positions:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings={self.max_positions}"
            )
        embeddings = self.embeddings(input_ids)
        # Padding mask (True = attend) over keys; the causal part is applied inside attention.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        layer_outputs = self.encoder(embeddings, mask)
        last_hidden_state = self.final_layer_norm(layer_outputs[-1])

        if self.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773) pool at the highest token id, the end-of-text token.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last_hidden_state, eos_position[:, None, None], axis=1)[:, 0]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=(embeddings, *layer_outputs) if output_hidden_states else None,
        )


class _CLIPTextBase(PretrainedModel):
    """Shared construction of both text models (transformers folders, config checks, ``text_model``)."""

    config_class = CLIPTextConfig
    config_format = "transformers"
    weights_name = "model.safetensors"
    # Older transformers saved a position_ids buffer; transformers 5 saves CLIPTextModel without `text_model.`.
    _ignored_torch_keys: ClassVar[tuple[str, ...]] = (r"text_model\.embeddings\.position_ids",)
    _torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = ((r"(?!text_model\.)", "text_model."),)

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        attention_impl: nn.AttentionImpl = "xla",
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ):
        config.check_supported("hidden_act", *_ACTIVATIONS)
        config.check_supported("attention_dropout", 0.0)
        self.config = config
        self.text_model = CLIPTextTransformer(
            config,
            attention_impl=attention_impl,
            gradient_checkpointing=gradient_checkpointing,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class CLIPTextModel(_CLIPTextBase):
    """CLIP text encoder: token states and the pooled end-of-text state."""

    torch_class_name = "CLIPTextModel"
    #: transformers 5's CLIPTextModel is our ``text_model``: its module names (LoRA keys) have no "text_model.".
    torch_module_root: ClassVar[str] = "text_model"

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """``input_ids`` (batch, seq) int; ``attention_mask`` (batch, seq), 1 for tokens to attend to."""
        return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(_CLIPTextBase):
    """CLIP text encoder with the projection of the pooled state (SDXL's second text encoder)."""

    torch_class_name = "CLIPTextModelWithProjection"

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        attention_impl: nn.AttentionImpl = "xla",
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            gradient_checkpointing=gradient_checkpointing,
            rngs=rngs,
        )
        self.text_projection = nn.linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, output_hidden_states: bool = False
    ) -> CLIPTextModelOutput:
        """``input_ids`` (batch, seq) int; ``attention_mask`` (batch, seq), 1 for tokens to attend to."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextModelOutput(
            text_embeds=self.text_projection(out.pooler_output),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
        )
