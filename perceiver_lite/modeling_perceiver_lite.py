"""PyTorch PerceiverLite: the Perceiver (Jaegle et al., 2021, "General Perception with Iterative Attention") as a
transformers model.

This file is the reference model, the paper's math step by step through transformers' attention interface (`eager` or
`sdpa`). The fast paths in `fast_perceiver_lite.py` are exact rewrites of it that read the same weights; one decision
per forward (`fast_plan`) runs them where they are exact, and this file's modules otherwise (PEFT adapters, wrapped or
quantised modules, hooks, export and tracing, `config.use_fast_paths=False` or `attn_implementation="eager"`).
"""

import math
import os
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_perceiver_lite import PerceiverLiteConfig
from .fast_perceiver_lite import encode, fast_plan, perceiver_layer
from .validation_perceiver_lite import check_labels, check_mask, check_tensor, check_token_ids, is_tracing


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) broadcastable to (B, H, Lq, Lk), from (B, Lk) or (B, Lq, Lk).

    A row with no valid key would give an all-masked softmax (NaN); such a row attends to every key instead, so that the
    output stays finite (and the same under eager and sdpa). That output is computed from the padding values, so it is
    meaningless: a sample with nothing valid has no meaningful prediction.
    """
    mask = mask.bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # (B, 1, 1 or Lq, Lk)


# ---------------------------------------------------------------------------------------------------------------------
# Position features
# ---------------------------------------------------------------------------------------------------------------------


class PerceiverLiteFourierFeatures(nn.Module):
    """Fourier position features: per axis, coordinates `x` in [-1, 1] and `[x, sin(pi f x), cos(pi f x)]` over the
    bands `f`; the axes' features are concatenated, `axes * (2 * num_bands + 1)` channels per position.

    The coordinates of an axis of `n` elements are `linspace(-1, 1, n)`. With per-sample `extents` they come from each
    sample's own valid extent along the axis (the last valid index + 1), so a padded sample gets exactly the features of
    the same sample unpadded. Features for an unmasked input depend only on its spatial shape: they are built once and
    reused until the shape changes (not while tracing, where they are part of the graph). Nothing is stored in the
    state dict.
    """

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.resolutions = config.resolutions
        self.num_bands = config.num_bands
        self.frequency_base = config.frequency_base
        self._cached_key = None
        self._cached_features = None

    def frequencies(self, axis: int, device) -> torch.Tensor:
        nyquist = self.resolutions[axis] / 2
        if self.frequency_base is None:
            return torch.linspace(1.0, nyquist, self.num_bands, device=device)
        log_low, log_high = math.log(self.frequency_base), math.log(nyquist)
        return torch.linspace(log_low, log_high, self.num_bands, device=device).exp()

    def forward(self, spatial_shape, extents: torch.Tensor | None = None, device=None, dtype=torch.float32):
        """Features of shape `(prod(spatial_shape), F)`, or `(B, prod(spatial_shape), F)` for per-sample `extents` (B, axes)."""
        if extents is not None or is_tracing():
            return self._build(spatial_shape, extents, device).to(dtype)
        key = (tuple(spatial_shape), device, dtype)
        if key != self._cached_key:
            self._cached_features = self._build(spatial_shape, None, device).to(dtype)
            self._cached_key = key
        return self._cached_features

    def _build(self, spatial_shape, extents, device) -> torch.Tensor:
        lead = () if extents is None else (extents.shape[0],)
        per_axis = []
        for axis, size in enumerate(spatial_shape):
            extent = size if extents is None else extents[:, axis : axis + 1].float()  # scalar or (B, 1)
            step = 2.0 / (extent - 1).clamp(min=1) if extents is not None else 2.0 / max(size - 1, 1)
            coordinates = torch.arange(size, device=device, dtype=torch.float32) * step - 1  # (n,) or (B, n)
            scaled = math.pi * coordinates[..., None] * self.frequencies(axis, device)  # (..., n, bands)
            features = torch.cat([coordinates[..., None], scaled.sin(), scaled.cos()], dim=-1)  # (..., n, 2 bands + 1)
            grid = [1] * len(spatial_shape)
            grid[axis] = size
            features = features.view(*lead, *grid, features.shape[-1])  # (..., 1, n, 1, K)
            per_axis.append(features.expand(*lead, *spatial_shape, features.shape[-1]))
        return torch.cat(per_axis, dim=-1).flatten(len(lead), -2)  # (..., M, axes * K)


class PerceiverLiteEmbeddings(nn.Module):
    """Channel-first inputs `(B, C, *axes)` to the cross-attention's inputs `(B, M, C + F)`: data channels first, then
    the Fourier position features of each element (of each sample's valid extent, under a padding mask)."""

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.position_features = PerceiverLiteFourierFeatures(config)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: `(B, M)` or `(B, *axes)`, True for valid elements."""
        data = inputs.flatten(2).transpose(1, 2)  # (B, M, C)
        positions = self.positions(inputs.shape[2:], attention_mask, inputs.device, inputs.dtype)
        positions = positions.expand(data.shape[0], *positions.shape[-2:])  # (B, M, F)
        return torch.cat([data, positions], dim=-1)  # (B, M, C + F)

    def positions(self, spatial_shape, attention_mask=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """The position features `(M, F)` of `spatial_shape`, shared by the batch, or `(B, M, F)` under a mask."""
        extents = None if attention_mask is None else valid_extents(attention_mask.reshape(-1, *spatial_shape))
        return self.position_features(spatial_shape, extents, device=device, dtype=dtype)


def valid_extents(mask: torch.Tensor) -> torch.Tensor:
    """Per sample and axis, the last valid index + 1 of a mask `(B, *axes)`: `(B, axes)`."""
    extents = []
    for axis in range(1, mask.dim()):
        other_axes = [a for a in range(1, mask.dim()) if a != axis]
        along = mask.any(dim=other_axes) if other_axes else mask  # (B, n)
        index = torch.arange(1, along.shape[1] + 1, device=mask.device)
        extents.append((along * index).amax(dim=1))
    return torch.stack(extents, dim=1)  # (B, axes)


# ---------------------------------------------------------------------------------------------------------------------
# Attention, feed-forward, layers
# ---------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query * scaling, key.transpose(2, 3))  # (B, H, Lq, Lk); scaled first: float16's range
    if attention_mask is not None:  # boolean, True = attend
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = attn_weights.softmax(dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Lq, H, D)
    return attn_output, attn_weights


class PerceiverLiteAttention(nn.Module):
    """Multi-head attention, not causal. Self-attention projects its keys and values from the latents; cross-attention
    from `key_value_states` (the inputs), with `cross_heads` heads and a LayerNorm on them (pre-norm)."""

    def __init__(self, config: PerceiverLiteConfig, is_cross_attention: bool = False, kv_dim: int | None = None):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.cross_heads if is_cross_attention else config.heads
        self.head_dim = config.head_dim or config.dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        kv_dim = kv_dim or (config.cross_kv_dim if is_cross_attention else config.dim)
        inner_dim = self.num_heads * self.head_dim
        self.kv_norm = nn.LayerNorm(kv_dim, eps=config.layer_norm_eps) if is_cross_attention and config.pre_norm else None
        self.q_proj = nn.Linear(config.dim, inner_dim)
        self.k_proj = nn.Linear(kv_dim, inner_dim)
        self.v_proj = nn.Linear(kv_dim, inner_dim)
        self.o_proj = nn.Linear(inner_dim, config.dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_value_states is None:
            key_value_states = hidden_states
        elif self.kv_norm is not None:
            key_value_states = self.kv_norm(key_value_states)
        query_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        kv_shape = (*key_value_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(query_shape).transpose(1, 2)  # (B, H, Lq, D)
        key = self.k_proj(key_value_states).view(kv_shape).transpose(1, 2)  # (B, H, Lk, D)
        value = self.v_proj(key_value_states).view(kv_shape).transpose(1, 2)  # (B, H, Lk, D)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1)  # (B, Lq, H * D)
        return self.o_proj(attn_output), attn_weights


class PerceiverLiteMLP(nn.Module):
    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        ff_dim = config.ff_dim or int(config.dim * config.ff_dim_scale)
        self.fc1 = nn.Linear(config.dim, ff_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(ff_dim, config.dim)
        self.dropout = nn.Dropout(config.ff_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


class PerceiverLiteLayer(GradientCheckpointingLayer):
    """Optional self-attention, optional cross-attention, then feed-forward; each a residual sublayer with its LayerNorm
    before (`pre_norm`) or after the residual sum.

    The Perceiver's cross-attend layer has only cross-attention, its latent transformer layers only self-attention, and
    the standalone `PerceiverLayer` both.
    """

    def __init__(
        self,
        config: PerceiverLiteConfig,
        self_attention: bool = True,
        cross_attention: bool = False,
        cross_kv_dim: int | None = None,
    ):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.self_attention = PerceiverLiteAttention(config) if self_attention else None
        self.self_attention_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if self_attention else None
        self.cross_attention = (
            PerceiverLiteAttention(config, is_cross_attention=True, kv_dim=cross_kv_dim) if cross_attention else None
        )
        self.cross_attention_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if cross_attention else None
        self.mlp = PerceiverLiteMLP(config)
        self.mlp_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.self_attention is not None:
            hidden_states = self.sublayer(self.self_attention_norm, self.self_attention, hidden_states, **kwargs)
        if self.cross_attention is not None:
            hidden_states = self.sublayer(
                self.cross_attention_norm, self.cross_attention, hidden_states, key_value_states, attention_mask, **kwargs
            )
        return self.sublayer(self.mlp_norm, self.mlp, hidden_states)

    def sublayer(self, norm, sublayer, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`hidden_states + sublayer(norm(hidden_states))` (pre-norm) or `norm(hidden_states + sublayer(hidden_states))`.
        `norm` and `sublayer` are callables: this layer's modules, or the fast paths' functions of them."""
        residual = hidden_states
        if self.pre_norm:
            hidden_states = norm(hidden_states)
        hidden_states = sublayer(hidden_states, *args, **kwargs)
        if isinstance(hidden_states, tuple):  # attention: (output, weights)
            hidden_states = hidden_states[0]
        hidden_states = residual + hidden_states
        return hidden_states if self.pre_norm else norm(hidden_states)


class PerceiverLiteBlock(nn.Module):
    """A cross-attend from the latents to the inputs, then `num_self_attention_layers` latent self-attention layers
    (also importable as `PerceiverBlock`). Running a block again (a repeated index in `layers_indice`) shares its
    weights."""

    def __init__(self, config: PerceiverLiteConfig, num_self_attention_layers: int):
        super().__init__()
        self.cross_layer = PerceiverLiteLayer(config, self_attention=False, cross_attention=True)
        self.layers = nn.ModuleList(PerceiverLiteLayer(config) for _ in range(num_self_attention_layers))

    def forward(self, latents, inputs_embeds, attention_mask=None, **kwargs) -> torch.Tensor:
        latents = self.cross_layer(latents, inputs_embeds, attention_mask, **kwargs)
        for layer in self.layers:
            latents = layer(latents, **kwargs)
        return latents


PerceiverBlock = PerceiverLiteBlock


class PerceiverLayer(nn.Module):
    """A standalone Perceiver layer stack: `depth` x (self-attention on `q`; cross-attention from `q` to the concatenation of
    `k` and `v` along the sequence; feed-forward), pre-norm with residuals. The output has `q`'s shape.

    Args:
        dim (`int`): width of `q`, `k` and `v`.
        heads (`int`): number of attention heads.
        depth (`int`): number of layers.
        dim_head (`int`, defaults to 64): width of each head.
        dropout (`float`, defaults to 0.1): dropout on the attention probabilities.
        ff_dropout (`float`, defaults to 0.1): dropout on the feed-forward output.
        ff_mult (`int`, defaults to 4): feed-forward expansion factor.

    `forward(q, k, v, mask=None)` takes `q` `(B, Lq, dim)`, `k` `(B, Lk, dim)`, `v` `(B, Lv, dim)` and an optional `mask`
    (True or 1 = attend) of shape `(B, Lq, Lk)` or `(B, Lk)`, applied to the `k` tokens and to the `v` tokens at the same
    positions (then `Lk == Lv`), or `(B, Lk + Lv)` / `(B, Lq, Lk + Lv)` covering the whole concatenated context.
    """

    def __init__(self, dim, heads, depth, dim_head=64, dropout=0.1, ff_dropout=0.1, ff_mult=4):
        super().__init__()
        self._check_arguments(dim=dim, heads=heads, depth=depth, dim_head=dim_head, dropout=dropout,
                              ff_dropout=ff_dropout, ff_mult=ff_mult)  # fmt: skip
        self.config = PerceiverLiteConfig(
            dim=dim,
            heads=heads,
            cross_heads=heads,
            head_dim=dim_head,
            attention_dropout=dropout,
            ff_dropout=ff_dropout,
            ff_dim_scale=ff_mult,
            layers_indice=[0],
            num_latent_transformers_in_layers=[depth],
        )
        self.config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(
            PerceiverLiteLayer(self.config, self_attention=True, cross_attention=True, cross_kv_dim=dim)
            for _ in range(depth)
        )

    @staticmethod
    def _check_arguments(**arguments):
        """Errors name these arguments, not the config fields they fill (`dim_head` is the config's `head_dim`)."""
        for name in ("dim", "heads", "depth", "dim_head"):
            value = arguments[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerceiverLayer: `{name}` must be a positive integer, got {value!r}")
        for name in ("dropout", "ff_dropout"):
            if not 0 <= arguments[name] < 1:
                raise ValueError(f"PerceiverLayer: `{name}` must be in [0, 1), got {arguments[name]!r}")
        if not arguments["ff_mult"] > 0:
            raise ValueError(f"PerceiverLayer: `ff_mult` must be positive, got {arguments['ff_mult']!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: inputs of another float dtype run in it, as in the model."""
        return self.layers[0].mlp.fc1.weight.dtype

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        mask = self._check_inputs(q, k, v, mask)
        q = q.to(self.dtype)
        context = torch.cat([k, v], dim=1).to(self.dtype)  # (B, Lk + Lv, dim)
        plan = fast_plan(self, q.device)
        if plan is not None:
            return perceiver_layer(self, plan, q, context, mask)
        for layer in self.layers:
            q = layer(q, context, mask)
        return q

    def _check_inputs(self, q, k, v, mask):
        dim = self.config.dim
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, tensor, f"[B, L{name}, {dim}]", ndim=3, floating=True, dtype=self.dtype)
            if tensor.shape[-1] != dim or tensor.shape[0] != q.shape[0]:
                raise ValueError(f"`{name}` must have shape [{q.shape[0]}, L{name}, {dim}], got {list(tensor.shape)}")
        if mask is None:
            return None
        (batch_size, q_len), k_len, v_len = q.shape[:2], k.shape[1], v.shape[1]
        shapes = [(batch_size, k_len + v_len), (batch_size, q_len, k_len + v_len)]
        if k_len == v_len:
            shapes += [(batch_size, k_len), (batch_size, q_len, k_len)]
        check_mask("mask", mask, shapes)
        if mask.shape[-1] == k_len:
            mask = torch.cat([mask, mask], dim=-1)  # the same positions of k and of v
        return key_padding_mask(mask)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _unreadable_safetensors(folder) -> list[str]:
    """The `.safetensors` files under a local `folder` that safetensors cannot open (truncated or corrupt)."""
    unreadable = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            unreadable.append(str(path))
    return unreadable


class PerceiverLitePreTrainedModel(PreTrainedModel):
    config_class = PerceiverLiteConfig
    config: PerceiverLiteConfig
    base_model_prefix = "perceiver"
    main_input_name = "inputs"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False
    _no_split_modules = ["PerceiverLiteLayer"]
    _supports_sdpa = True
    _can_record_outputs = {
        "hidden_states": PerceiverLiteLayer,
        "attentions": OutputRecorder(PerceiverLiteAttention, index=1, layer_name="self_attention"),
        "cross_attentions": OutputRecorder(PerceiverLiteAttention, index=1, layer_name="cross_attention"),
    }
    pipeline_tag = "feature-extraction"  # the Hub task, in the model card's metadata

    def __init__(self, config: PerceiverLiteConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.model_tags = ["perceiver", "perceiver-lite"]  # on the cards of `push_to_hub` and `Trainer.push_to_hub`

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads as transformers does; a truncated or corrupt safetensors file raises an `OSError` that names it.
        Weights are read from safetensors only, never unpickled (`pytorch_model.bin`), unless `use_safetensors=False`."""
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            files = ", ".join(_unreadable_safetensors(pretrained_model_name_or_path)) or "a safetensors file"
            raise OSError(
                f"Cannot load the weights of {pretrained_model_name_or_path}: {files} is truncated or corrupt "
                f"(safetensors: {error}). Save or download the checkpoint again."
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as transformers does, with this file and the config's copied beside the weights (see `AUTO_CLASSES`),
        and lists every PerceiverLite model in `config.auto_map`, not only the saved class, so that `AutoModel` and
        each `AutoModelFor...` load the folder with `trust_remote_code=True` where this package is not installed."""
        module = self.__module__.rsplit(".", 1)[-1]  # `modeling_perceiver_lite`, also when loaded as remote code
        auto_map = {name: f"{module}.{model_class.__name__}" for name, model_class in AUTO_CLASSES.items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def update_model_card(self, path: str | os.PathLike, **metadata) -> None:
        """Completes the model card (`README.md`) at `path` with this model's Hub metadata: `library_name:
        transformers`, its `pipeline_tag`, the tags of `model_tags`, and `metadata` (for example `datasets=[...]`).
        What the card already says is kept. `push_to_hub` runs it on the card it uploads."""
        card = ModelCard.load(path)
        for key, value in {"library_name": "transformers", "pipeline_tag": self.pipeline_tag, **metadata}.items():
            if card.data.get(key) is None:
                card.data[key] = value
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(self.model_tags or [])]))
        card.save(path)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # `push_to_hub` and `save_pretrained(push_to_hub=True)` write transformers' card, then upload `working_dir`
        self.update_model_card(os.path.join(working_dir, "README.md"))
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerceiverLiteModel):
            init.trunc_normal_(module.latents, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Embedding):
            # The token embedding of PerceiverLiteForSequenceClassification: data channels beside Fourier features of
            # unit scale. At initializer_range they would vanish in the inputs' LayerNorm and the model learn slowly.
            init.normal_(module.weight, mean=0.0, std=1.0)


class PerceiverLiteModel(PerceiverLitePreTrainedModel):
    """A learned latent array that cross-attends to the inputs and refines itself, block by block in `layers_indice`
    order. Returns the latents (`last_hidden_state`, `(B, N, dim)`) and their mean (`pooler_output`, `(B, dim)`)."""

    def __init__(self, config: PerceiverLiteConfig):
        config._validate()  # again: fields may have been set one by one since construction (`cross_kv_dim` stale)
        super().__init__(config)
        self.embeddings = PerceiverLiteEmbeddings(config)
        self.latents = nn.Parameter(torch.empty(config.num_latent_tokens, config.dim))
        self.blocks = nn.ModuleList(PerceiverLiteBlock(config, n) for n in config.num_latent_transformers_in_layers)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        inputs: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        r"""
        inputs (`torch.FloatTensor` of shape `(B, C, *axes)`):
            Channel-first inputs with the spatial axes that `config.data_shape` declares, of any size.
        attention_mask (`torch.Tensor` of shape `(B, *axes)` or `(B, M)`, *optional*):
            1 (True) for a valid input element, 0 for padding.
        inputs_embeds (`torch.FloatTensor` of shape `(B, M, cross_kv_dim)`, *optional*):
            Cross-attention inputs that carry their own position features, instead of `inputs`.
        """
        self._check_inputs(inputs, attention_mask, inputs_embeds)
        reference = inputs_embeds if inputs is None else inputs
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(reference.shape[0], -1).bool()  # (B, M)
        padding_mask = None if attention_mask is None else key_padding_mask(attention_mask)  # (B, 1, 1, M)
        plan = fast_plan(self, reference.device)
        if plan is not None:
            latents = encode(self, plan, inputs, inputs_embeds, attention_mask, padding_mask)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.embeddings(inputs, attention_mask)  # (B, M, C + F)
            inputs_embeds = inputs_embeds.to(self.dtype)  # as ViT: inputs of any float dtype, in the weights' dtype
            latents = self.latents.expand(inputs_embeds.shape[0], -1, -1)  # (B, N, dim)
            for index in self.config.layers_indice:
                latents = self.blocks[index](latents, inputs_embeds, padding_mask, **kwargs)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=latents, pooler_output=latents.mean(dim=1))

    def _check_inputs(self, inputs, attention_mask, inputs_embeds, input_name: str = "inputs", also_accepted: str = ""):
        """Validate before any compute; `input_name` is the caller's name of `inputs` (`pixel_values`, say), and
        `also_accepted` a shape it takes besides the channel-first one (`[B, T]` for one channel, say)."""
        config = self.config
        if (inputs is None) == (inputs_embeds is None):
            raise ValueError(f"Pass exactly one of `{input_name}` and `inputs_embeds`")
        if inputs_embeds is not None:
            expected = f"[B, M, cross_kv_dim={config.cross_kv_dim}]"
            check_tensor("inputs_embeds", inputs_embeds, expected, ndim=3, floating=True, dtype=self.dtype)
            if inputs_embeds.shape[-1] != config.cross_kv_dim:
                raise ValueError(f"`inputs_embeds` must have shape {expected}, got {list(inputs_embeds.shape)}")
            mask_shapes = [tuple(inputs_embeds.shape[:2])]
        else:
            axes = ", ".join(f"axis{i}" for i in range(config.num_axes))
            expected = f"[B, C={config.data_shape[0]}, {axes}]{also_accepted and ' or ' + also_accepted}"
            expected += f" (data_shape {config.data_shape})"
            check_tensor(input_name, inputs, expected, ndim=config.num_axes + 2, floating=True, dtype=self.dtype)
            if inputs.shape[1] != config.data_shape[0]:
                raise ValueError(
                    f"`{input_name}` must have shape {expected}, got {list(inputs.shape)}: wrong channel count"
                )
            mask_shapes = [(inputs.shape[0], *inputs.shape[2:]), (inputs.shape[0], math.prod(inputs.shape[2:]))]
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, mask_shapes)


class PerceiverLiteClassifier(nn.Module):
    """The paper's classifier: LayerNorm and a linear layer on the mean of the latents."""

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.dim, config.num_labels)

    def forward(self, pooled_output: torch.Tensor) -> torch.Tensor:
        return self.dense(self.norm(pooled_output))


class PerceiverLiteClassificationMixin:
    """Shared by the heads: the base model, the classifier, and the loss by `config.problem_type`."""

    def _build_classifier(self, config: PerceiverLiteConfig, one_dimensional: bool = False):
        if one_dimensional and config.num_axes != 1:
            raise ValueError(f"{type(self).__name__} needs a 1-D data_shape [C, T], got {config.data_shape}")
        self.perceiver = PerceiverLiteModel(config)
        self.classifier = PerceiverLiteClassifier(config)

    def _check_classification_inputs(self, inputs, attention_mask, labels, input_name: str, also_accepted: str = ""):
        """Inputs, mask and labels, before any compute; `input_name` is the head's name of `inputs` (see
        `PerceiverLiteModel._check_inputs`)."""
        self.perceiver._check_inputs(inputs, attention_mask, None, input_name, also_accepted)
        if labels is not None:
            self._check_labels(labels, inputs.shape[0])

    def _classify(self, inputs, attention_mask, labels, output_class, **kwargs):
        """The base model, the classifier and the loss by `config.problem_type`, on checked inputs and labels."""
        outputs = self.perceiver(inputs, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return output_class(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _check_labels(self, labels, batch_size: int):
        check_labels(labels, batch_size, self.config.num_labels, self.config.problem_type)

    def get_input_embeddings(self) -> nn.Module:
        return self.perceiver.get_input_embeddings()


class PerceiverLiteForImageClassification(PerceiverLiteClassificationMixin, PerceiverLitePreTrainedModel):
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    pipeline_tag = "image-classification"

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__(config)
        self._build_classifier(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, C, *spatial)`): images (or volumes, videos) of any size.
        labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`, *optional*):
            Class ids, multi-hot targets or regression targets, by `config.problem_type`.
        """
        self._check_classification_inputs(pixel_values, attention_mask, labels, "pixel_values")
        return self._classify(pixel_values, attention_mask, labels, ImageClassifierOutput, **kwargs)


class PerceiverLiteForSequenceClassification(PerceiverLiteClassificationMixin, PerceiverLitePreTrainedModel):
    """Token ids embedded into `data_shape[0]` channels with 1-D Fourier positions; padding is masked out."""

    main_input_name = "input_ids"
    input_modalities = ("text",)
    pipeline_tag = "text-classification"

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__(config)
        self._build_classifier(config, one_dimensional=True)
        self.embeddings = nn.Embedding(config.vocab_size, config.data_shape[0])
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids in `[0, vocab_size)`.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`, *optional*):
            Class ids, multi-hot targets or regression targets, by `config.problem_type`.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])
        if labels is not None:
            self._check_labels(labels, input_ids.shape[0])
        inputs = self.embeddings(input_ids).transpose(1, 2)  # (B, C, T)
        return self._classify(inputs, attention_mask, labels, SequenceClassifierOutput, **kwargs)


class PerceiverLiteForAudioClassification(PerceiverLiteClassificationMixin, PerceiverLitePreTrainedModel):
    """Raw 1-D signals (audio, sensors, time series) of any length, `(B, T)` or `(B, C, T)`, with padding masks."""

    main_input_name = "input_values"
    input_modalities = ("audio",)
    pipeline_tag = "audio-classification"

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__(config)
        self._build_classifier(config, one_dimensional=True)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        input_values (`torch.FloatTensor` of shape `(B, T)` or `(B, C, T)`): the signals.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for samples, 0 for padding.
        labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`, *optional*):
            Class ids, multi-hot targets or regression targets, by `config.problem_type`.
        """
        one_channel = self.config.data_shape[0] == 1
        if one_channel and isinstance(input_values, torch.Tensor) and input_values.dim() == 2:
            input_values = input_values[:, None]  # (B, 1, T)
        also_accepted = "[B, T]" if one_channel else ""
        self._check_classification_inputs(input_values, attention_mask, labels, "input_values", also_accepted)
        return self._classify(input_values, attention_mask, labels, SequenceClassifierOutput, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Auto classes. Registered here, not in the package's `__init__`, so that a copy of this file loaded as remote code
# (`trust_remote_code=True`) registers them too, and saves again with its code.
# ---------------------------------------------------------------------------------------------------------------------

AUTO_CLASSES = {
    "AutoModel": PerceiverLiteModel,
    "AutoModelForImageClassification": PerceiverLiteForImageClassification,
    "AutoModelForSequenceClassification": PerceiverLiteForSequenceClassification,
    "AutoModelForAudioClassification": PerceiverLiteForAudioClassification,
}

PerceiverLiteConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)


__all__ = [
    "PerceiverBlock",
    "PerceiverLayer",
    "PerceiverLiteBlock",
    "PerceiverLiteForAudioClassification",
    "PerceiverLiteForImageClassification",
    "PerceiverLiteForSequenceClassification",
    "PerceiverLiteModel",
    "PerceiverLitePreTrainedModel",
]
