"""PyTorch PerceiverLite: the Perceiver (Jaegle et al., 2021, "General Perception with Iterative Attention") as a
transformers model.

This file is the reference model, the paper's math step by step through transformers' attention interface (`eager` or
`sdpa`). The fast paths in `fast_perceiver_lite.py` are exact rewrites of it that read the same weights; one decision
per forward (`fast_plan`) runs them where they are proven exact (an allow-list: the classes marked
`@served_by_fast_paths`, the config fields it knows, listed devices and dtypes), and this file's modules otherwise.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.configuration_utils import GenerationMode
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_perceiver_lite import PerceiverLiteConfig
from .fast_perceiver_lite import (
    causal_cross_layer,
    decode,
    encode,
    fast_plan,
    perceiver_layer,
    served_by_fast_paths,
    token_key_values,
)
from .validation_perceiver_lite import (
    check_grid,
    check_keywords,
    check_labels,
    check_mask,
    check_tensor,
    check_token_ids,
    has_values,
    is_tracing,
)


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


@served_by_fast_paths
class PerceiverLiteFourierFeatures(nn.Module):
    """Fourier position features: per axis, coordinates `x` in [-1, 1] and `[x, sin(pi f x), cos(pi f x)]` over the
    bands `f`; the axes' features are concatenated, `axes * (2 * num_bands + 1)` channels per position.

    The coordinates of an axis of `n` elements are `linspace(-1, 1, n)`, and the angles `pi * (x * f)`, as in
    transformers' Perceiver. With per-sample `extents` they come from each
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

    @staticmethod
    def coordinates(size: int, extent: torch.Tensor | None, device) -> torch.Tensor:
        """`linspace(-1, 1, size)` `(n,)`, as transformers' Perceiver (whose checkpoints convert to this model); or,
        for per-sample extents `(B, 1)`, `linspace(-1, 1, extent)` over the first `extent` positions (the rest beyond
        1) `(B, n)`, computed in float64 and rounded once: within one float32 rounding of `torch.linspace`."""
        if extent is None:
            return torch.linspace(-1.0, 1.0, size, device=device)
        wide = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # mps has no float64
        index = torch.arange(size, device=device, dtype=wide)
        return (index * 2 / (extent.to(wide) - 1).clamp(min=1) - 1).float()  # (B, n)

    def _build(self, spatial_shape, extents, device) -> torch.Tensor:
        lead = () if extents is None else (extents.shape[0],)
        per_axis = []
        for axis, size in enumerate(spatial_shape):
            coordinates = self.coordinates(size, None if extents is None else extents[:, axis : axis + 1], device)
            scaled = math.pi * (coordinates[..., None] * self.frequencies(axis, device))  # (..., n, bands)
            features = torch.cat([coordinates[..., None], scaled.sin(), scaled.cos()], dim=-1)  # (..., n, 2 bands + 1)
            grid = [1] * len(spatial_shape)
            grid[axis] = size
            features = features.view(*lead, *grid, features.shape[-1])  # (..., 1, n, 1, K)
            per_axis.append(features.expand(*lead, *spatial_shape, features.shape[-1]))  # (..., *spatial_shape, K)
        return torch.cat(per_axis, dim=-1).flatten(len(lead), -2)  # (..., M, axes * K)


@served_by_fast_paths
class PerceiverLiteEmbeddings(nn.Module):
    """Channel-first inputs `(B, C, *axes)` to the cross-attention's inputs `(B, M, C + F)`: per element its data
    channels (through `input_projection` where configured), then its position features, concatenated (or added, with
    `concat_positions=False`).

    Fourier positions come from each sample's valid extent under a padding mask; learned positions are absolute (the
    rows of the element's own index in the nominal grid `data_shape[1:]`). Either way a padded sample gets the
    positions of the same sample unpadded.
    """

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.nominal_shape = tuple(config.data_shape[1:])
        self.concat_positions = config.concat_positions
        self.input_projection = (
            nn.Linear(config.data_shape[0], config.input_projection_dim) if config.input_projection_dim else None
        )
        if config.position_encoding_type == "rotary":
            raise ValueError(
                "position_encoding_type='rotary' rotates the queries and keys of PerceiverLiteForCausalLM; the "
                "other PerceiverLite models join position channels to their inputs: use 'fourier' or 'learned'"
            )
        learned = config.position_encoding_type == "learned"
        self.position_features = None if learned else PerceiverLiteFourierFeatures(config)
        self.position_embeddings = (
            nn.Parameter(torch.empty(config.num_positions, config.position_width)) if learned else None
        )

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: `(B, M)` or `(B, *axes)`, True for valid elements."""
        data = inputs.flatten(2).transpose(1, 2)  # (B, M, C)
        if self.input_projection is not None:
            data = self.input_projection(data.to(self.input_projection.weight.dtype))  # (B, M, input_projection_dim)
        positions = self.positions(inputs.shape[2:], attention_mask, inputs.device, data.dtype)
        positions = positions.expand(data.shape[0], *positions.shape[-2:])  # (B, M, F)
        return torch.cat([data, positions], dim=-1) if self.concat_positions else data + positions  # (B, M, cross_kv_dim)

    def positions(self, spatial_shape, attention_mask=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """The position features `(M, F)` of `spatial_shape`, shared by the batch, or `(B, M, F)` under a mask."""
        if self.position_features is None:
            return grid_rows(self.position_embeddings, self.nominal_shape, spatial_shape).to(dtype)
        return fourier_positions(self.position_features, spatial_shape, attention_mask, device, dtype)


def fourier_positions(features: PerceiverLiteFourierFeatures, spatial_shape, attention_mask, device, dtype):
    """Fourier features `(M, F)` of `spatial_shape`, or `(B, M, F)` of each sample's valid extent under a mask."""
    extents = None
    if attention_mask is not None:
        extents = valid_extents(attention_mask.reshape(-1, *spatial_shape))  # the mask as (B, *spatial_shape)
    return features(spatial_shape, extents, device=device, dtype=dtype)


def grid_rows(table: torch.Tensor, nominal_shape: tuple, spatial_shape) -> torch.Tensor:
    """The rows of a per-position `table` `(prod(nominal_shape), W)` for a grid of `spatial_shape` (each axis at most
    nominal): the positions `[0, n)` of every axis, row-major, `(M, W)`."""
    if tuple(spatial_shape) == nominal_shape:
        return table
    grid = table.view(*nominal_shape, table.shape[-1])  # (*nominal_shape, W)
    return grid[tuple(slice(0, n) for n in spatial_shape)].reshape(-1, table.shape[-1])  # (M, W)


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


@served_by_fast_paths
class PerceiverLiteAttention(nn.Module):
    """Multi-head attention, not causal, of one of three kinds (a structural switch):

    - `"self"`: the latents attend to themselves (`heads`, `qk_channels`, `v_channels`);
    - `"cross"`: the latents attend to `key_value_states`, the inputs (`cross_heads`, `cross_qk_channels`, ...);
    - `"decoder"`: output queries of width `decoder_dim` attend to the latents (`decoder_heads`, ...).

    Cross and decoder attention normalise their keys/values' source first (pre-norm). `kv_dim` overrides the width of
    that source (the standalone `PerceiverLayer` attends to contexts of width `dim`).

    The causal language model passes two more arguments: `rotary`, the `(cos, sin)` of the queries' and of this call's
    keys' positions, which rotate both, and `cache_update`, a function of this call's rotated keys and values
    `(B, H, L, D)` that returns the cached ones with them appended (its causal masks come as `attention_mask`).
    """

    def __init__(self, config: PerceiverLiteConfig, kind: str = "self", kv_dim: int | None = None):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.is_cross_attention = kind != "self"
        self.num_heads, qk_channels, v_channels = config.attention_channels(kind)
        self.head_dim = qk_channels // self.num_heads
        self.v_head_dim = v_channels // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        q_dim = config.decoder_width if kind == "decoder" else config.dim
        kv_dim = kv_dim or (config.cross_kv_dim if kind == "cross" else config.dim)
        self.kv_norm = nn.LayerNorm(kv_dim, eps=config.layer_norm_eps) if self.is_cross_attention and config.pre_norm else None
        self.q_proj = nn.Linear(q_dim, qk_channels)
        self.k_proj = nn.Linear(kv_dim, qk_channels)
        self.v_proj = nn.Linear(kv_dim, v_channels)
        self.o_proj = nn.Linear(v_channels, q_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_update=None,
        rotary: tuple | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_value_states is None:
            key_value_states = hidden_states
        elif self.kv_norm is not None:
            key_value_states = self.kv_norm(key_value_states)
        key_shape = (*key_value_states.shape[:-1], -1, self.head_dim)
        value_shape = (*key_value_states.shape[:-1], -1, self.v_head_dim)
        key = self.k_proj(key_value_states).view(key_shape).transpose(1, 2)  # (B, H, Lk, D)
        value = self.v_proj(key_value_states).view(value_shape).transpose(1, 2)  # (B, H, Lk, Dv)
        return self.attend(hidden_states, key, value, attention_mask, cache_update, rotary, **kwargs)

    def attend(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_update=None,
        rotary: tuple | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention of `hidden_states`' queries to the projected `key` `(B, H, Lk, D)` and `value`
        `(B, H, Lk, Dv)`: the forward after the key and value projections."""
        query_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(query_shape).transpose(1, 2)  # (B, H, Lq, D)
        if rotary is not None:  # the keys computed here: a cache keeps them rotated
            (query_cos, query_sin), (key_cos, key_sin) = rotary
            query, key = rotate(query, query_cos, query_sin), rotate(key, key_cos, key_sin)
        if cache_update is not None:
            key, value = cache_update(key, value)  # (B, H, cached + Lk, D)

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
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1)  # (B, Lq, H * Dv)
        return self.o_proj(attn_output), attn_weights


@served_by_fast_paths
class PerceiverLiteMLP(nn.Module):
    """The feed-forward of a `"self"` (latent), `"cross"` (cross-attend) or `"decoder"` layer: `fc1`, activation,
    `fc2`, dropout; hidden width `ff_dim` / `cross_ff_dim` / `decoder_dim * decoder_ff_dim_scale`. With
    `gated_feed_forward`, `fc1` gives twice the hidden width, values and gates, and the hidden units are
    `values * act(gates)` (GEGLU for `hidden_act="gelu"`, SwiGLU for `"silu"`)."""

    def __init__(self, config: PerceiverLiteConfig, kind: str = "self"):
        super().__init__()
        width = config.decoder_width if kind == "decoder" else config.dim
        ff_dim = config.ff_dim or int(config.dim * config.ff_dim_scale)
        if kind == "cross":
            ff_dim = config.cross_ff_dim or ff_dim
        elif kind == "decoder":
            ff_dim = int(width * config.decoder_ff_dim_scale)
        self.gated = config.gated_feed_forward
        self.fc1 = nn.Linear(width, 2 * ff_dim if self.gated else ff_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(ff_dim, width)
        self.dropout = nn.Dropout(config.ff_dropout)

    def activate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The hidden units from `fc1`'s output: the activation, or values times the activated gates."""
        if not self.gated:
            return self.act(hidden_states)
        values, gates = hidden_states.chunk(2, dim=-1)  # (..., ff_dim) each
        return values * self.act(gates)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activate(self.fc1(hidden_states))))


@served_by_fast_paths
class PerceiverLiteLayer(GradientCheckpointingLayer):
    """Optional self-attention, optional cross-attention, then an optional feed-forward; each a residual sublayer with
    its LayerNorm before (`pre_norm`) or after the residual sum.

    The Perceiver's cross-attend layer has only cross-attention, its latent transformer layers only self-attention, the
    standalone `PerceiverLayer` both, and the decoder's layer (`decoder=True`: queries of width `decoder_dim` attending
    to the latents) cross-attention, with the feed-forward where `decoder_ff_dim_scale > 0`. The residual around the
    cross-attention is `cross_attention_query_residual` (`decoder_query_residual` in the decoder).
    """

    def __init__(
        self,
        config: PerceiverLiteConfig,
        self_attention: bool = True,
        cross_attention: bool = False,
        cross_kv_dim: int | None = None,
        decoder: bool = False,
    ):
        super().__init__()
        self.pre_norm = config.pre_norm
        width = config.decoder_width if decoder else config.dim
        self.query_residual = config.decoder_query_residual if decoder else config.cross_attention_query_residual
        self.self_attention = PerceiverLiteAttention(config) if self_attention else None
        self.self_attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if self_attention else None
        kind = "decoder" if decoder else "cross"
        self.cross_attention = PerceiverLiteAttention(config, kind, kv_dim=cross_kv_dim) if cross_attention else None
        self.cross_attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if cross_attention else None
        has_mlp = not decoder or config.decoder_ff_dim_scale > 0
        mlp_kind = kind if decoder or not self_attention else "self"
        self.mlp = PerceiverLiteMLP(config, mlp_kind) if has_mlp else None
        self.mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if has_mlp else None

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
                self.cross_attention_norm, self.cross_attention, hidden_states, key_value_states, attention_mask,
                residual=self.query_residual, **kwargs,
            )  # fmt: skip
        if self.mlp is None:
            return hidden_states
        return self.sublayer(self.mlp_norm, self.mlp, hidden_states)

    def sublayer(self, norm, sublayer, hidden_states: torch.Tensor, *args, residual: bool = True, **kwargs):
        """`hidden_states + sublayer(norm(hidden_states))` (pre-norm) or `norm(hidden_states + sublayer(hidden_states))`,
        without the `hidden_states +` where `residual` is False. `norm` and `sublayer` are callables: this layer's
        modules, or the fast paths' functions of them."""
        residual_states = hidden_states
        if self.pre_norm:
            hidden_states = norm(hidden_states)
        hidden_states = sublayer(hidden_states, *args, **kwargs)
        if isinstance(hidden_states, tuple):  # attention: (output, weights)
            hidden_states = hidden_states[0]
        if residual:
            hidden_states = residual_states + hidden_states
        return hidden_states if self.pre_norm else norm(hidden_states)


@served_by_fast_paths
class PerceiverLiteBlock(nn.Module):
    """A cross-attend from the latents to the inputs (where `cross_attend`), then `num_self_attention_layers` latent
    self-attention layers (also importable as `PerceiverBlock`). Running a block again (a repeated index in
    `layers_indice`) shares its weights."""

    def __init__(self, config: PerceiverLiteConfig, num_self_attention_layers: int, cross_attend: bool = True):
        super().__init__()
        self.cross_layer = (
            PerceiverLiteLayer(config, self_attention=False, cross_attention=True) if cross_attend else None
        )
        self.layers = nn.ModuleList(PerceiverLiteLayer(config) for _ in range(num_self_attention_layers))

    def forward(self, latents, inputs_embeds, attention_mask=None, **kwargs) -> torch.Tensor:
        if self.cross_layer is not None:
            latents = self.cross_layer(latents, inputs_embeds, attention_mask, **kwargs)
        for layer in self.layers:
            latents = layer(latents, **kwargs)
        return latents


PerceiverBlock = PerceiverLiteBlock


@served_by_fast_paths
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
            gated_feed_forward=False,  # the seed's layer: a plain feed-forward of `ff_mult * dim` units
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
        plan = fast_plan(self, context, mask, queries=q)
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
# Decoder (Perceiver IO)
# ---------------------------------------------------------------------------------------------------------------------


@served_by_fast_paths
class PerceiverLiteDecoder(nn.Module):
    """Perceiver IO's decoder (Jaegle et al., 2021b): output queries cross-attend to the final latents, one output of
    width `decoder_dim` per query, through a `PerceiverLiteLayer` (`decoder=True`: query LayerNorm, cross-attention,
    optional query residual and feed-forward).

    The queries are `num_queries` learned vectors where given (1 for `classifier_pooling="decoder"`), else one per
    output position: learned per position of the nominal grid (`decoder_query_type="learned"`), or the Fourier
    features of the output positions through `query_proj` (`"fourier"`, any output size; of each sample's valid extent
    under a mask, so that padding changes no output of a valid position). With `decoder_query_inputs`, each
    per-element query also gets its own input element through `input_proj`.
    """

    def __init__(self, config: PerceiverLiteConfig, num_queries: int | None = None):
        super().__init__()
        self.nominal_shape = tuple(config.data_shape[1:])
        self.fixed_queries = num_queries is not None
        learned = self.fixed_queries or config.decoder_query_type == "learned"
        self.queries = nn.Parameter(torch.empty(num_queries or config.num_positions, config.decoder_width)) if learned else None
        self.position_features = None if learned else PerceiverLiteFourierFeatures(config)
        self.query_proj = None if learned else nn.Linear(config.num_position_features, config.decoder_width)
        joins_inputs = config.decoder_query_inputs and not self.fixed_queries
        self.input_proj = nn.Linear(config.data_shape[0], config.decoder_width) if joins_inputs else None
        self.config = config  # read by `fast_plan`
        self.layer = PerceiverLiteLayer(config, self_attention=False, cross_attention=True, decoder=True)

    def output_queries(self, batch_size: int, spatial_shape=(), attention_mask=None, device=None) -> torch.Tensor:
        """The queries `(B, Q, decoder_dim)` for outputs on a grid of `spatial_shape` (ignored for fixed queries)."""
        if self.fixed_queries:
            queries = self.queries  # (Q, decoder_dim)
        elif self.queries is not None:
            queries = grid_rows(self.queries, self.nominal_shape, spatial_shape)  # (M, decoder_dim)
        else:
            dtype = self.query_proj.weight.dtype
            positions = fourier_positions(self.position_features, spatial_shape, attention_mask, device, dtype)
            queries = self.query_proj(positions)  # (M, decoder_dim) or (B, M, decoder_dim)
        return queries.expand(batch_size, *queries.shape[-2:])  # (B, Q, decoder_dim)

    def forward(
        self, latents, inputs=None, attention_mask=None, output_attentions: bool = False, query_index=None, **kwargs
    ):
        """`(outputs (B, Q, decoder_dim), attention weights (B, H, Q, N) or None)` for the channel-first `inputs`
        `(B, C, *axes)` of one output each (none for fixed queries); the weights where `output_attentions` (eager
        attention; sdpa returns none, as in transformers). `query_index` `(B, K)`: decode only these flattened
        positions of each sample (`sparse_prediction`), `(B, K, decoder_dim)`."""
        spatial_shape = () if inputs is None else inputs.shape[2:]
        queries = self.output_queries(latents.shape[0], spatial_shape, attention_mask, latents.device)
        # each query sees only the latents: leaving the others out (`query_index`) changes nothing of its output
        queries = gather_rows(queries, query_index)  # (B, M or K, decoder_dim)
        if self.input_proj is not None:
            data = gather_rows(inputs.flatten(2).transpose(1, 2), query_index)  # (B, M or K, C)
            queries = queries + self.input_proj(data.to(self.input_proj.weight.dtype))  # (B, M or K, decoder_dim)
        if not output_attentions:
            plan = fast_plan(self, latents, queries=queries, kwargs=kwargs)
            outputs = self.layer(queries, latents, **kwargs) if plan is None else decode(self, plan, queries, latents)
            return outputs, None
        weights = []
        handle = self.layer.cross_attention.register_forward_hook(lambda module, args, output: weights.append(output[1]))
        try:
            outputs = self.layer(queries, latents, **kwargs)
        finally:
            handle.remove()
        return outputs, weights[-1]


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


def _sharded(model: nn.Module) -> bool:
    """Whether torch's `fully_shard` (FSDP2) sharded any of `model`'s weights: they are then `DTensor`s."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


class PerceiverLitePreTrainedModel(PreTrainedModel):
    config_class = PerceiverLiteConfig
    config: PerceiverLiteConfig
    base_model_prefix = "perceiver"
    main_input_name = "inputs"
    supports_gradient_checkpointing = True
    # False: Trainer divides each accumulated batch's mean loss by the batches per step. The token heads take its count
    # of labels instead (`num_items_in_batch`); the others cannot: multi-label and regression losses take no count,
    # and the causal LM scores its latent positions alone, not every label that Trainer counts
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
        each `AutoModelFor...` load the folder with `trust_remote_code=True` where this package is not installed.

        A model sharded with torch's `fully_shard` (FSDP2: its weights are `DTensor`s) is saved whole: every process
        must call this (gathering the weights is a collective), and the first process writes the folder, as the
        unsharded class (see `_save_sharded`)."""
        if _sharded(self):
            return self._save_sharded(save_directory, *args, **kwargs)
        module = self.__module__.rsplit(".", 1)[-1]  # `modeling_perceiver_lite`, also when loaded as remote code
        auto_map = {name: f"{module}.{model_class.__name__}" for name, model_class in AUTO_CLASSES.items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """transformers' `push_to_hub`. A model sharded with torch's `fully_shard` (FSDP2): every process must call it,
        as `save_pretrained` (gathering the weights is a collective); the first process creates the repository and
        uploads the unsharded model, the others take part in the gathering alone and return None."""
        if _sharded(self) and torch.distributed.get_rank() != 0:
            return self._save_sharded(None)  # the gathering and the barrier of the first process's `save_pretrained`
        return super().push_to_hub(*args, **kwargs)

    def _save_sharded(self, save_directory, *args, state_dict=None, **kwargs):
        """`save_pretrained` of a `fully_shard`ed model: its whole weights (`state_dict` if given, else gathered from
        every process to the first one's CPU memory), loaded into a model of its unsharded class, which rank 0 saves
        (with `is_main_process`). `fully_shard` changes a model's class to a subclass defined in torch, which
        transformers would otherwise copy into the folder as the model's code, and leaves `DTensor`s that safetensors
        cannot write. All processes wait until the folder is written."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        if state_dict is None:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the whole tensors, on rank 0 alone
            state_dict = get_model_state_dict(self, options=options)
        if torch.distributed.get_rank() == 0 and kwargs.get("is_main_process", True):
            unsharded_class = next(
                cls for cls in type(self).__mro__
                if issubclass(cls, PerceiverLitePreTrainedModel) and not issubclass(cls, FSDPModule)
            )  # fmt: skip
            model = unsharded_class(self.config)
            model.load_state_dict(state_dict, assign=True)  # the gathered tensors themselves, in their dtype
            model.tie_weights()  # `assign` replaced tied weights one by one
            model.save_pretrained(save_directory, *args, **kwargs)
        torch.distributed.barrier()

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
            std = self.config.latent_initializer_range or self.config.initializer_range
            init.trunc_normal_(module.latents, mean=0.0, std=std)
            self._init_data_channel_gain(module)
        if isinstance(module, PerceiverLiteDecoder) and module.queries is not None:
            init.trunc_normal_(module.queries, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, PerceiverLiteEmbeddings) and module.position_embeddings is not None:
            # Learned positions beside (or added to) data of unit scale, as the Fourier features are
            init.normal_(module.position_embeddings, mean=0.0, std=1.0)
        if isinstance(module, nn.Embedding):
            # The token embedding of PerceiverLiteForSequenceClassification: data channels beside Fourier features of
            # unit scale. At initializer_range they would vanish in the inputs' LayerNorm and the model learn slowly.
            init.normal_(module.weight, mean=0.0, std=1.0)

    def _init_data_channel_gain(self, model: "PerceiverLiteModel"):
        """The cross-attention's input norm sees `C` data channels beside `F` position channels (1 beside 66 for
        grayscale images with 8 bands per axis): at gain 1 the data are `C / (C + F)` of the keys' and values' inputs
        and the model learns the positions first, the data late. A gain of `sqrt(F / C)` on the data channels gives
        them the positions' share. Here, at the model's level, because transformers initialises a module's children
        (the norm, to ones) before the module; `init.copy_` leaves loaded weights alone."""
        config = self.config
        if not config.concat_positions:
            return
        channels, positions = config.data_width, config.position_width
        for block in model.blocks:
            norm = None if block.cross_layer is None else block.cross_layer.cross_attention.kv_norm
            if norm is not None:
                gain = torch.ones_like(norm.weight)
                gain[:channels] = math.sqrt(positions / channels)
                init.copy_(norm.weight, gain)


@served_by_fast_paths
class PerceiverLiteModel(PerceiverLitePreTrainedModel):
    """A learned latent array that cross-attends to the inputs and refines itself, block by block in `layers_indice`
    order. Returns the latents (`last_hidden_state`, `(B, N, dim)`) and their mean (`pooler_output`, `(B, dim)`)."""

    def __init__(self, config: PerceiverLiteConfig):
        config._validate()  # again: fields may have been set one by one since construction (`cross_kv_dim` stale)
        super().__init__(config)
        self.embeddings = PerceiverLiteEmbeddings(config)
        self.latents = nn.Parameter(torch.empty(config.num_latent_tokens, config.dim))
        self.blocks = nn.ModuleList(
            PerceiverLiteBlock(config, n, config.cross_attends(block))
            for block, n in enumerate(config.num_latent_transformers_in_layers)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

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
        check_keywords(self, kwargs)
        self._check_inputs(inputs, attention_mask, inputs_embeds)
        reference = inputs_embeds if inputs is None else inputs
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(reference.shape[0], -1).bool()  # (B, M)
        padding_mask = None if attention_mask is None else key_padding_mask(attention_mask)  # (B, 1, 1, M)
        plan = fast_plan(self, reference, attention_mask, embedded=inputs_embeds is not None, kwargs=kwargs)
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
            check_grid(config, input_name, inputs.shape, inputs.shape[2:])
            mask_shapes = [(inputs.shape[0], *inputs.shape[2:]), (inputs.shape[0], math.prod(inputs.shape[2:]))]
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, mask_shapes)


# ---------------------------------------------------------------------------------------------------------------------
# Heads. Each computes its logits and loss in its own `forward`, as transformers' heads do; what they share are the
# plain functions below (input checks, the token data, the Perceiver IO encode-decode).
# ---------------------------------------------------------------------------------------------------------------------


class PerceiverLiteClassifier(nn.Module):
    """The classification heads' reading of the latents, by `classifier_pooling`: `"mean"`, the paper's LayerNorm and
    linear layer on their mean; `"decoder"`, one learned decoder query cross-attends to them (Perceiver IO) and a
    linear layer reads its output."""

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        mean = config.classifier_pooling == "mean"
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if mean else None
        self.decoder = None if mean else PerceiverLiteDecoder(config, num_queries=1)
        self.dense = nn.Linear(config.dim if mean else config.decoder_width, config.num_labels)

    def forward(self, outputs: BaseModelOutputWithPoolingAndCrossAttentions) -> torch.Tensor:
        if self.decoder is None:
            return self.dense(self.norm(outputs.pooler_output))  # (B, num_labels)
        decoded, _ = self.decoder(outputs.last_hidden_state)  # (B, 1, decoder_dim)
        return self.dense(decoded[:, 0])  # (B, num_labels)


class PerceiverLiteLMHeadTransform(nn.Module):
    """`PerceiverLiteForMaskedLM`'s projection of the decoder's outputs to the token embedding's width, where the tied
    `lm_head` (the embedding's weight) is narrower or wider than `decoder_dim`: a linear layer, the activation and a
    LayerNorm, as ALBERT's masked-LM head before its tied decoder."""

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.dense = nn.Linear(config.decoder_width, config.data_shape[0])
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.data_shape[0], eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))  # (..., data_shape[0])


@dataclass
class PerceiverLiteDecoderOutput(ModelOutput):
    r"""
    Outputs of the per-element heads (masked LM, token classification, dense prediction).

    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` are given):
        The loss by the head's task.
    logits (`torch.FloatTensor`):
        One output per input element: `(B, T, vocab_size)`, `(B, T, num_labels)` or `(B, num_labels, *axes)`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`):
        The latents before the first and after every encoder layer, `(B, N, dim)` each.
    attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True` and eager attention):
        The latent self-attention probabilities, `(B, heads, N, N)` each.
    cross_attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True` and eager attention):
        The encoder's cross-attention probabilities `(B, cross_heads, N, M)`, then the decoder's
        `(B, decoder_heads, M, N)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def check_one_dimensional(head: str, config: PerceiverLiteConfig):
    """The heads on sequences (token ids, signals) need a 1-D `data_shape` `[C, T]`."""
    if config.num_axes != 1:
        raise ValueError(f"{head} needs a 1-D data_shape [C, T], got {config.data_shape}")


def check_token_inputs(
    config: PerceiverLiteConfig, input_ids, inputs_embeds, attention_mask, dtype: torch.dtype, decoder: bool = False
) -> tuple[int, int]:
    """Exactly one of `input_ids` `(B, T)` and `inputs_embeds` `(B, T, data_shape[0])` (in `dtype`, the model's), and
    the mask, before any compute; `(B, T)`. `decoder`: the head decodes one output per token (its grid is checked
    against `decoder_query_type` too)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        check_token_ids(input_ids, config.vocab_size)
        name, shape = "input_ids", tuple(input_ids.shape)
    else:
        width = config.data_shape[0]
        expected = f"[B, T, data_shape[0]={width}]"
        check_tensor("inputs_embeds", inputs_embeds, expected, ndim=3, floating=True, dtype=dtype)
        if inputs_embeds.shape[-1] != width:
            raise ValueError(f"`inputs_embeds` must have shape {expected}, got {list(inputs_embeds.shape)}")
        name, shape = "inputs_embeds", tuple(inputs_embeds.shape[:2])
    check_grid(config, name, shape, shape[1:], decoder=decoder)
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, [shape])
    return shape


def token_data(embeddings: nn.Embedding, input_ids, inputs_embeds) -> torch.Tensor:
    """The channel-first data `(B, C, T)` of checked token inputs."""
    embeds = embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
    return embeds.transpose(1, 2)  # (B, C, T)


def sparse_labels(config: PerceiverLiteConfig, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token heads' `(labels, labelled)`: with `config.sparse_prediction` the labelled ones `(num_labelled,)` and
    where they are `(B, T)`, else the labels as given and None."""
    if not config.sparse_prediction:
        return labels, None
    labelled = labels != -100
    return labels[labelled], labelled


def encode_and_decode(perceiver, decoder, inputs, attention_mask, labelled=None, **kwargs):
    """Perceiver IO: encode `inputs` `(B, C, *axes)` and decode one output per element. `labelled` `(B, M)`: decode only
    these elements (`sparse_prediction`). Returns `(encoder outputs, decoded, cross_attentions)`: decoded
    `(B, M, decoder_dim)`, or `(num_labelled, decoder_dim)` in row-major order; the cross-attentions the encoder's,
    then the decoder's where recorded."""
    output_attentions = kwargs.get("output_attentions", perceiver.config.output_attentions)
    if labelled is not None and output_attentions:
        raise ValueError(
            "output_attentions=True needs every position decoded; with sparse_prediction=True and labels the "
            "decoder skips the unlabelled ones: pass no labels, or set config.sparse_prediction=False"
        )
    outputs = perceiver(inputs, attention_mask=attention_mask, **kwargs)
    query_index, valid = (None, None) if labelled is None else labelled_positions(labelled)  # (B, K) each
    decoded, weights = decoder(
        outputs.last_hidden_state, inputs, attention_mask, bool(output_attentions), query_index
    )  # (B, M, decoder_dim), or (B, K, decoder_dim)
    if labelled is not None:
        decoded = decoded[valid]  # (num_labelled, decoder_dim), the labelled rows in row-major order
    cross_attentions = outputs.cross_attentions
    if weights is not None:
        cross_attentions = (*(cross_attentions or ()), weights)
    return outputs, decoded, cross_attentions


def labelled_positions(labelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index, valid)`, both `(B, K)` with `K` the largest count of True entries of `labelled` `(B, M)` in a sample:
    each sample's labelled positions, ascending, first, the rest of its columns other positions (`valid` False)."""
    counts = labelled.sum(1, keepdim=True)  # (B, 1)
    width = max(int(counts.max()), 1)  # one column at least: attention over no queries is not defined
    index = torch.argsort((~labelled).to(torch.uint8), dim=1, stable=True)[:, :width]  # (B, K)
    return index, torch.arange(width, device=labelled.device) < counts


def gather_rows(rows: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """`rows` `(B, M, D)` at `index` `(B, K)`: `(B, K, D)`; all of them where `index` is None."""
    if index is None:
        return rows
    return rows.gather(1, index[..., None].expand(-1, -1, rows.shape[-1]))  # (B, K, D)


def dense_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask, config: PerceiverLiteConfig) -> torch.Tensor:
    """`PerceiverLiteForDensePrediction`'s loss: transformers' classification loss by `problem_type`, with the valid
    elements of the logits `(B, num_labels, *axes)` as samples (not the padding of `attention_mask`)."""
    per_element = logits.flatten(2).transpose(1, 2)  # (B, M, num_labels)
    targets = labels.flatten(2).transpose(1, 2) if labels.dim() == logits.dim() else labels.flatten(1)  # (B, M, ...)
    if attention_mask is None:
        targets, per_element = targets.flatten(0, 1), per_element.flatten(0, 1)  # (B M, ...): every element a sample
        return ForSequenceClassificationLoss(targets, per_element, config)
    valid = attention_mask.reshape(logits.shape[0], -1).bool()  # (B, M)
    return ForSequenceClassificationLoss(targets[valid], per_element[valid], config)


class PerceiverLiteForImageClassification(PerceiverLitePreTrainedModel):
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    pipeline_tag = "image-classification"

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.classifier = PerceiverLiteClassifier(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.perceiver.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.perceiver.set_input_embeddings(value)

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
        check_keywords(self, kwargs)
        config = self.config
        self.perceiver._check_inputs(pixel_values, attention_mask, None, "pixel_values")
        if labels is not None:
            check_labels(labels, pixel_values.shape[0], config.num_labels, config.problem_type)
        outputs = self.perceiver(pixel_values, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(outputs)  # (B, num_labels)
        loss = None if labels is None else self.loss_function(labels, logits, config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class PerceiverLiteForSequenceClassification(PerceiverLitePreTrainedModel):
    """Token ids embedded into `data_shape[0]` channels with 1-D positions; padding is masked out."""

    main_input_name = "input_ids"
    input_modalities = ("text",)
    pipeline_tag = "text-classification"

    def __init__(self, config: PerceiverLiteConfig):
        check_one_dimensional(type(self).__name__, config)
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.classifier = PerceiverLiteClassifier(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.data_shape[0])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids in `[0, vocab_size)`.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`, *optional*):
            Class ids, multi-hot targets or regression targets, by `config.problem_type`.
        inputs_embeds (`torch.FloatTensor` of shape `(B, T, data_shape[0])`, *optional*): token embeddings instead
            of `input_ids`.
        """
        check_keywords(self, kwargs)
        config = self.config
        batch_size, _ = check_token_inputs(config, input_ids, inputs_embeds, attention_mask, self.dtype)
        if labels is not None:
            check_labels(labels, batch_size, config.num_labels, config.problem_type)
        inputs = token_data(self.embeddings, input_ids, inputs_embeds)  # (B, C, T)
        outputs = self.perceiver(inputs, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(outputs)  # (B, num_labels)
        loss = None if labels is None else self.loss_function(labels, logits, config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class PerceiverLiteForAudioClassification(PerceiverLitePreTrainedModel):
    """Raw 1-D signals (audio, sensors, time series) of any length, `(B, T)` or `(B, C, T)`, with padding masks."""

    main_input_name = "input_values"
    input_modalities = ("audio",)
    pipeline_tag = "audio-classification"

    def __init__(self, config: PerceiverLiteConfig):
        check_one_dimensional(type(self).__name__, config)
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.classifier = PerceiverLiteClassifier(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.perceiver.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.perceiver.set_input_embeddings(value)

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
        check_keywords(self, kwargs)
        config = self.config
        one_channel = config.data_shape[0] == 1
        if one_channel and isinstance(input_values, torch.Tensor) and input_values.dim() == 2:
            input_values = input_values[:, None]  # (B, 1, T)
        also_accepted = "[B, T]" if one_channel else ""
        self.perceiver._check_inputs(input_values, attention_mask, None, "input_values", also_accepted)
        if labels is not None:
            check_labels(labels, input_values.shape[0], config.num_labels, config.problem_type)
        outputs = self.perceiver(input_values, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(outputs)  # (B, num_labels)
        loss = None if labels is None else self.loss_function(labels, logits, config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class PerceiverLiteForMaskedLM(PerceiverLitePreTrainedModel):
    """Masked language modelling (Perceiver IO): token ids (transformers' byte-level `PerceiverTokenizer` fits the
    default `vocab_size`) in, one prediction per input token out, whatever the input length. The decoder's outputs go
    through `lm_head`, whose weight is the token embedding's where `tie_word_embeddings`; where that embedding's width
    `data_shape[0]` is not `decoder_dim`, `lm_transform` (a `PerceiverLiteLMHeadTransform`) projects to it first, as
    ALBERT's masked-LM head does."""

    main_input_name = "input_ids"
    input_modalities = ("text",)
    pipeline_tag = "fill-mask"
    accepts_loss_kwargs = True  # Trainer passes `num_items_in_batch` (see `forward`)
    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}

    def __init__(self, config: PerceiverLiteConfig):
        check_one_dimensional(type(self).__name__, config)
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.decoder = PerceiverLiteDecoder(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.data_shape[0])
        projects = config.tie_word_embeddings and config.decoder_width != config.data_shape[0]
        self.lm_transform = PerceiverLiteLMHeadTransform(config) if projects else None
        self.lm_head = nn.Linear(config.data_shape[0] if projects else config.decoder_width, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> PerceiverLiteDecoderOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids in `[0, vocab_size)`, with masked tokens.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*):
            The original token ids where masked, -100 elsewhere (not scored).
        inputs_embeds (`torch.FloatTensor` of shape `(B, T, data_shape[0])`, *optional*): token embeddings instead
            of `input_ids`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): the labelled tokens of every batch that one
            optimizer step accumulates, which `Trainer` passes: the loss is then the sum over this batch's divided by
            it, so that accumulated batches weigh each labelled token alike, as one large batch does (without it, the
            mean over this batch's).
        """
        check_keywords(self, kwargs)
        config = self.config
        batch_size, length = check_token_inputs(
            config, input_ids, inputs_embeds, attention_mask, self.dtype, decoder=True
        )
        labelled = None
        if labels is not None:
            check_labels(labels, batch_size, config.vocab_size, "single_label_classification", (length,))
            labels, labelled = sparse_labels(config, labels)
        inputs = token_data(self.embeddings, input_ids, inputs_embeds)  # (B, C, T)
        outputs, decoded, cross_attentions = encode_and_decode(
            self.perceiver, self.decoder, inputs, attention_mask, labelled, **kwargs
        )  # decoded (B, T, decoder_dim), or (num_labelled, decoder_dim)
        if self.lm_transform is not None:
            decoded = self.lm_transform(decoded)  # (..., data_shape[0])
        logits = self.lm_head(decoded)  # (B, T, vocab_size), or (num_labelled, vocab_size)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits, labels, vocab_size=config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        return PerceiverLiteDecoderOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=cross_attentions,
        )


class PerceiverLiteForTokenClassification(PerceiverLitePreTrainedModel):
    """Token classification (Perceiver IO): one class per input token (named entities, tags), through the decoder
    and a linear layer."""

    main_input_name = "input_ids"
    input_modalities = ("text",)
    pipeline_tag = "token-classification"
    accepts_loss_kwargs = True  # Trainer passes `num_items_in_batch` (see `forward`)

    def __init__(self, config: PerceiverLiteConfig):
        check_one_dimensional(type(self).__name__, config)
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.decoder = PerceiverLiteDecoder(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.data_shape[0])
        self.classifier = nn.Linear(config.decoder_width, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> PerceiverLiteDecoderOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids in `[0, vocab_size)`.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): class ids per token, -100 where not scored
            (padding, continuation pieces).
        inputs_embeds (`torch.FloatTensor` of shape `(B, T, data_shape[0])`, *optional*): token embeddings instead
            of `input_ids`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): the labelled tokens of every batch that one
            optimizer step accumulates, which `Trainer` passes: the loss is then the sum over this batch's divided by
            it, so that accumulated batches weigh each labelled token alike, as one large batch does (without it, the
            mean over this batch's).
        """
        check_keywords(self, kwargs)
        config = self.config
        batch_size, length = check_token_inputs(
            config, input_ids, inputs_embeds, attention_mask, self.dtype, decoder=True
        )
        labelled = None
        if labels is not None:
            check_labels(labels, batch_size, config.num_labels, "single_label_classification", (length,))
            labels, labelled = sparse_labels(config, labels)
        inputs = token_data(self.embeddings, input_ids, inputs_embeds)  # (B, C, T)
        outputs, decoded, cross_attentions = encode_and_decode(
            self.perceiver, self.decoder, inputs, attention_mask, labelled, **kwargs
        )  # decoded (B, T, decoder_dim), or (num_labelled, decoder_dim)
        logits = self.classifier(decoded)  # (B, T, num_labels), or (num_labelled, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, config, num_items_in_batch=num_items_in_batch)
        return PerceiverLiteDecoderOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=cross_attentions,
        )


class PerceiverLiteForDensePrediction(PerceiverLitePreTrainedModel):
    """Per-element outputs on grids (Perceiver IO): per-pixel classes (semantic segmentation), per-time-step classes or
    regression targets, for inputs `(B, C, *axes)` of any size; logits `(B, num_labels, *axes)`, channel-first like the
    inputs. The loss by `config.problem_type` counts the valid elements only: not the padding of `attention_mask`,
    nor class labels -100."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    pipeline_tag = "image-segmentation"

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__(config)
        self.perceiver = PerceiverLiteModel(config)
        self.decoder = PerceiverLiteDecoder(config)
        self.classifier = nn.Linear(config.decoder_width, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.perceiver.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.perceiver.set_input_embeddings(value)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> PerceiverLiteDecoderOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, C, *axes)`): images, signals or volumes of any size.
        labels (`torch.LongTensor` of shape `(B, *axes)` or `torch.FloatTensor` of shape `(B, num_labels, *axes)`,
            *optional*): class ids per element (-100: not scored), or regression / multi-hot targets per element, by
            `config.problem_type`.
        attention_mask (`torch.Tensor` of shape `(B, *axes)` or `(B, M)`, *optional*): 1 for valid elements.
        """
        check_keywords(self, kwargs)
        config = self.config
        self.perceiver._check_inputs(pixel_values, attention_mask, None, "pixel_values")
        batch_size, spatial_shape = pixel_values.shape[0], pixel_values.shape[2:]
        check_grid(config, "pixel_values", pixel_values.shape, spatial_shape, decoder=True)
        if labels is not None:
            check_labels(labels, batch_size, config.num_labels, config.problem_type, spatial_shape)
        outputs, decoded, cross_attentions = encode_and_decode(
            self.perceiver, self.decoder, pixel_values, attention_mask, **kwargs
        )  # decoded (B, M, decoder_dim)
        logits = self.classifier(decoded).transpose(1, 2).reshape(batch_size, -1, *spatial_shape)  # (B, L, *axes)
        loss = None if labels is None else dense_loss(logits, labels, attention_mask, config)
        return PerceiverLiteDecoderOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=cross_attentions,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Causal language model (Perceiver AR)
# ---------------------------------------------------------------------------------------------------------------------


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of queries or keys `(B, H, L, D)` by the `cos`, `sin` of their positions: each channel
    pair `(i, i + D/2)` turns by its angle, so that a query-key product depends on the difference of their positions."""
    first, second = states.chunk(2, dim=-1)  # (B, H, L, D / 2) each
    return states * cos + torch.cat([-second, first], dim=-1) * sin


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)`, `(B or 1, 1, L, head_dim)`, of the rotary angles of integer `positions` `(B or 1, L)`: frequencies
    `theta ** (-2i / head_dim)`, as Llama's. The angles are computed in float64 (float32 on mps, which has none) and
    rounded once to `dtype`: a product of a query and a key then depends on their positions' difference alone up to
    `dtype`'s rounding, so that a shifted window (a left-padded sample) agrees to float64 rounding in float64 too."""
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=wide) / head_dim
    angles = positions[..., None].to(wide) * theta**-exponents  # (B or 1, L, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B or 1, 1, L, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def causal_key_mask(query_positions, key_positions, key_valid=None) -> torch.Tensor:
    """The boolean attention mask `(B or 1, 1, Lq, Lk)`, True = attend: each query sees the valid keys (`key_valid`
    `(B, Lk)`, None: all) at its own position or before. A query always sees its own position: a padding position
    then attends to itself only, so that no row is empty (finite under eager and sdpa alike) and no row reads a later
    position. Positions are `(B or 1, L)` integers."""
    before = key_positions[:, None, :] <= query_positions[:, :, None]  # (B or 1, Lq, Lk)
    if key_valid is not None:
        before = before & key_valid[:, None, :]
    return (before | (key_positions[:, None, :] == query_positions[:, :, None]))[:, None]


class PerceiverLiteCausalLMCache(Cache):
    r"""
    The key/value cache of `PerceiverLiteForCausalLM`, a transformers `Cache` of `DynamicLayer`s:

    - one layer per unique cross-attending block: the keys and values of the context, the keys rotated by their
      position counted from the first token seen (a context position's keys and values depend only on its own token
      and that position, so they are computed once), sliding with the context window: at most `data_shape[1]`
      positions;
    - one layer per latent self-attention layer run (`layers_indice` order; a block run twice has two): the latents'
      keys and values, used while the latent window grows (every position so far is a latent), dropped once it is
      full, when each step moves the oldest latent into the prefix and the full forward's latents no longer see it;
    - `token_embeddings` `(B, <= num_latent_tokens, data_shape[0])`: the token embeddings of the last latent-window
      positions, the latents' starting states when the latent stack is recomputed;
    - `cross_states` `(B, <= num_latent_tokens, dim)`: the first cross-attend layer's outputs of those positions, while
      the context window still starts at the first token (at most `data_shape[1]` tokens seen): a latent's first
      cross-attend reads only its own token and the context before it, so it does not change when later tokens come;
      None once the window slides;
    - `seen_tokens`: the number of tokens processed, `get_seq_length()`.

    Beam search reorders it (`reorder_cache`); `batch_repeat_interleave` and `batch_select_indices` act on every part.
    transformers rolls it back where the model drafts for another model (assisted decoding): after
    `activate_past_recording()` it keeps every state since the last `crop` beyond the windows, and `crop(-n)` forgets
    the last `n` tokens as if they had not come, then keeps the windows alone (transformers' sliding-window layers do
    the same). The model makes one itself where `generate` or `use_cache=True` needs it;
    `PerceiverLiteSlidingCausalLMCache` is the approximate variant a user passes to trade exactness for speed.
    """

    slides_latent_states = False  # the latents' keys and values are dropped once the latent window is full
    is_croppable = True

    def __init__(self, config: PerceiverLiteConfig):
        self.context_blocks = [block for block in range(len(config.num_latent_transformers_in_layers))
                               if config.cross_attends(block)]  # fmt: skip
        num_latent_layers = sum(config.num_latent_transformers_in_layers[block] for block in config.layers_indice)
        super().__init__(layers=[DynamicLayer() for _ in range(len(self.context_blocks) + num_latent_layers)])
        self.context_window = config.data_shape[1]
        self.latent_window = config.num_latent_tokens
        self.token_embeddings: torch.Tensor | None = None
        self.cross_states: torch.Tensor | None = None
        self.seen_tokens = 0
        self.record_past = False
        self.recorded_tokens = 0  # tokens seen since recording began or the last `crop`: what `crop` can remove

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def context_update(self, block: int, window: int):
        """The `cache_update` of block `block`'s cross-attention: appends the new positions' keys and values and keeps
        the last `window` positions (the context window)."""
        layer = self.layers[self.context_blocks.index(block)]

        return self._windowed_update(layer, window)

    def latent_update(self, index: int):
        """The `cache_update` of the `index`-th latent self-attention layer run: appends the new latents' keys and
        values and keeps the last `num_latent_tokens` (the latent window)."""
        return self._windowed_update(self.layers[len(self.context_blocks) + index], self.latent_window)

    def _windowed_update(self, layer: DynamicLayer, window: int):
        """A `cache_update` that appends to `layer` and returns its last `window` positions' keys and values, the
        ones it keeps (all of them while recording the past)."""

        def update(key, value):
            key, value = layer.update(key, value)  # (B, H, kept + new, D)
            key, value = key[:, :, -window:], value[:, :, -window:]  # (B, H, <= window, D)
            if not self.record_past:
                layer.keys, layer.values = key, value
            return key, value

        return update

    def cached_latents(self) -> int:
        """The number of latents whose self-attention keys and values the cache holds."""
        latent_layers = self.layers[len(self.context_blocks) :]
        return latent_layers[0].get_seq_length() if latent_layers else 0

    def reusable_cross_states(self, total: int, num_queries: int, num_new: int) -> int:
        """How many of a forward's `num_queries` latents (the last positions of `total` tokens, `num_new` of them new)
        can take their first cross-attend's output from `cross_states`: those before the new tokens, while the
        context window starts at the first token."""
        reusable = num_queries - min(num_new, num_queries)
        if self.cross_states is None or total > self.context_window or self.cross_states.shape[1] < reusable:
            return 0  # (after a `crop` back from past the context window, it may hold fewer than the window's)
        return reusable

    def keep_cross_states(self, states: torch.Tensor, total: int):
        """Keeps the first cross-attend's outputs `states` `(B, new, dim)` of the newest positions: appended to the
        kept ones, or instead of them where `states` covers the latent window; forgets them once the context window
        slides past the first token (`total` tokens seen)."""
        if total > self.context_window:
            self.cross_states = None
            return
        if self.cross_states is not None and states.shape[1] < min(total, self.latent_window):
            states = torch.cat([self.cross_states, states], dim=1)  # (B, kept + new, dim)
        self.cross_states = states if self.record_past else states[:, -self.latent_window :]  # (B, <= N, dim)

    def keep_tokens(self, embeddings: torch.Tensor, total: int, num_new: int):
        """After a forward of `num_new` tokens: `total` tokens seen, `embeddings` `(B, kept + new, E)` the token
        embeddings of the last positions (the latent window's kept, all of them while recording the past)."""
        self.seen_tokens, self.recorded_tokens = total, self.recorded_tokens + num_new
        self.token_embeddings = embeddings if self.record_past else embeddings[:, -self.latent_window :]

    def activate_past_recording(self, **kwargs):
        """Keeps every state from now on beyond the windows until the next `crop`, which can then remove tokens
        (assisted decoding's draft tokens the model rejected)."""
        self.record_past, self.recorded_tokens = True, 0

    def crop(self, tokens_to_remove: int):
        """Forgets the last `-tokens_to_remove` tokens (transformers' convention: a count <= 0), as if they had not
        been seen, then keeps the windows alone: the last `data_shape[1]` positions' context keys and values, the last
        `num_latent_tokens` latents'. What was dropped past a window stays dropped (the latents' keys and values once
        the latent window was full, `cross_states` once the context window slid): the next forward recomputes it."""
        if type(tokens_to_remove) is not int or tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes minus the number of tokens to remove (an int <= 0), got {tokens_to_remove!r}"
            )
        remove = -tokens_to_remove
        if remove > self.recorded_tokens or (remove and not self.record_past):
            raise ValueError(
                f"`crop({tokens_to_remove})`: the cache can remove the tokens seen since `activate_past_recording()` "
                f"or the last `crop` ({self.recorded_tokens if self.record_past else 0})"
            )
        self.seen_tokens, self.recorded_tokens = self.seen_tokens - remove, 0

        def cut(states: torch.Tensor, window: int) -> torch.Tensor:
            """`states` `(..., positions, D)` without the last `remove` positions: the last `window` of the others."""
            return states[..., : states.shape[-2] - remove, :][..., -window:, :]  # (..., <= window, D)

        for index, layer in enumerate(self.layers):
            if layer.is_initialized:
                window = self.context_window if index < len(self.context_blocks) else self.latent_window
                layer.keys, layer.values = cut(layer.keys, window), cut(layer.values, window)  # (B, H, <= window, D)
        if self.token_embeddings is not None:
            self.token_embeddings = cut(self.token_embeddings, self.latent_window)  # (B, <= N, E)
        if self.cross_states is not None:
            rows = self.cross_states.shape[1]
            self.cross_states = cut(self.cross_states, self.latent_window) if rows > remove else None  # (B, <= N, dim)

    def drop_latent_states(self):
        """Frees the latents' self-attention keys and values (stale once the latent window is full)."""
        for index in range(len(self.context_blocks), len(self.layers)):
            self.layers[index] = DynamicLayer()

    def _per_sequence(self, select):
        """Applies `select` to the per-sequence tensors beside the layers (`token_embeddings`, `cross_states`)."""
        self.token_embeddings = select(self.token_embeddings)
        if self.cross_states is not None:
            self.cross_states = select(self.cross_states)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._per_sequence(lambda states: states.index_select(0, beam_idx.to(states.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._per_sequence(lambda states: states.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._per_sequence(lambda states: states[indices])


class PerceiverLiteSlidingCausalLMCache(PerceiverLiteCausalLMCache):
    r"""
    An approximate cache of `PerceiverLiteForCausalLM`: once the latent window is full, it keeps sliding the latents'
    self-attention keys and values (the last `num_latent_tokens` positions) instead of recomputing the latent stack, so
    that a generation step runs the new token alone through every layer, whatever the window sizes (as the cache of
    krasserm's perceiver-io). Opt in by passing it:

    ```python
    >>> tokens = model.generate(**inputs, max_new_tokens=200, cache=PerceiverLiteSlidingCausalLMCache(model.config))
    ```

    What differs from a full forward: a latent's keys and values are those computed when its position was the newest,
    so they were computed from latents that have since moved into the prefix (and a latent's first cross-attend from
    the context window of that time), which the full forward's latents no longer see. The predictions then differ
    from the exact cache's once more than `num_latent_tokens` tokens have been seen; up to there, and for the first
    forward over a prompt of any length, they are the same. The cross-attention's keys and values are exact: they
    depend on each position's token alone, and the rotary positions make the products depend only on the positions'
    differences. Every position past the prompt is then computed once, as in a transformer whose latent self-attention
    sees the last `num_latent_tokens` positions and whose cross-attention sees the last `data_shape[1]`.
    `scripts/benchmark_learning.py --text` reports the bits per byte of both caches on the validation text.
    """

    slides_latent_states = True

    def keep_cross_states(self, states: torch.Tensor, total: int):
        """Nothing to keep: the latent stack is never recomputed for older latents."""


@served_by_fast_paths
class PerceiverLiteCausalLayer(PerceiverLiteLayer):
    """A Perceiver AR layer: causal cross-attention from the latents to the context (`cross_attention=True`) or causal
    latent self-attention, then the feed-forward; the `PerceiverLiteLayer` residual sublayers, with the causal mask,
    rotary positions and cache update of `PerceiverLiteAttention`."""

    def forward(
        self, hidden_states, key_value_states=None, attention_mask=None, rotary=None, cache_update=None, num_outputs=None
    ):
        """`num_outputs`: where a self-attention layer's outputs are needed for the last `num_outputs` positions alone
        (the last layer of a generation step that recomputes the latent stack), only their queries attend, to every
        position's keys and values, and only they run the feed-forward; the same values for those positions."""
        cross = self.cross_attention is not None
        if not cross and num_outputs is not None and num_outputs < hidden_states.shape[1]:
            key_value_states = self.self_attention_norm(hidden_states) if self.pre_norm else hidden_states
            hidden_states = hidden_states[:, -num_outputs:]  # (B, K, dim)
            attention_mask = attention_mask[..., -num_outputs:, :]  # (B or 1, 1, K, L)
            (query_cos, query_sin), key_angles = rotary
            rotary = (query_cos[..., -num_outputs:, :], query_sin[..., -num_outputs:, :]), key_angles
        norm = self.cross_attention_norm if cross else self.self_attention_norm
        attention = self.cross_attention if cross else self.self_attention
        hidden_states = self.sublayer(
            norm, attention, hidden_states, key_value_states, attention_mask,
            residual=self.query_residual or not cross, rotary=rotary, cache_update=cache_update,
        )  # fmt: skip
        return hidden_states if self.mlp is None else self.sublayer(self.mlp_norm, self.mlp, hidden_states)


@served_by_fast_paths
class PerceiverLiteCausalBlock(nn.Module):
    """A causal cross-attend to the context (where `cross_attend`), then `num_self_attention_layers` causal latent
    self-attention layers. Running a block again (a repeated index in `layers_indice`) shares its weights."""

    def __init__(self, config: PerceiverLiteConfig, num_self_attention_layers: int, cross_attend: bool = True):
        super().__init__()
        self.cross_layer = (
            PerceiverLiteCausalLayer(config, self_attention=False, cross_attention=True) if cross_attend else None
        )
        self.layers = nn.ModuleList(PerceiverLiteCausalLayer(config) for _ in range(num_self_attention_layers))


@served_by_fast_paths
class PerceiverLiteForCausalLM(PerceiverLitePreTrainedModel, GenerationMixin):
    r"""
    Perceiver AR (Hawthorne et al., 2022, "General-purpose, long-context autoregressive modeling with Perceiver AR"):
    autoregressive language modelling over a context longer than the latent array. The last `N` positions of the
    sequence are the latents; one causal cross-attention lets the latent at position `p` attend to every position up to
    `p`, prefix and latents alike; causal self-attention layers over the latents alone follow.

    Config (`PerceiverLiteConfig`):
        - `data_shape=[E, C]`: token embedding width `E` and longest context `C` (the input length limit);
        - `num_latent_tokens=N`: the latent window, the last `min(T, N)` positions;
        - `position_encoding_type="rotary"` (required), `rope_theta`;
        - `layers_indice`, `num_latent_transformers_in_layers`, `cross_attend_blocks`: the blocks as in
          `PerceiverLiteModel`, each a causal cross-attend (where it cross-attends) then causal latent self-attention;
          `cross_attend_blocks=[0]` with `layers_indice=[0, 1, ...]` is the paper's single cross-attention;
        - `prefix_dropout`: the fraction of prefix positions each sample drops in training;
        - `vocab_size` (262: transformers' byte-level `PerceiverTokenizer`), `tie_word_embeddings` (default True: the
          LM head is the token embedding's transpose; where `dim != E` a linear layer `lm_proj` takes the latents to
          width `E` first, as ALBERT's), `dim`, `heads`, `cross_heads`, feed-forward and dropout fields as elsewhere.
        The latents start from the token embeddings of their positions (through `latent_proj` where `dim != E`).

    `forward(input_ids, attention_mask=None, labels=None, cache=None, use_cache=None, logits_to_keep=0,
    inputs_embeds=None)`:
        - `input_ids` `(B, T)`, `T <= C` (longer is an error; `generate` keeps the last `C` tokens itself), or
          `inputs_embeds` `(B, T, E)`, the tokens' embeddings (soft prompts: PEFT's prompt tuning passes them);
        - `attention_mask` `(B, T)` (with a cache: `(B, cache.get_seq_length() + T)`), left padding only: 0s, then 1s;
        - `labels` `(B, T)`: the `input_ids` (-100 not scored); shifted inside, as in transformers' causal LMs;
        - returns `CausalLMOutputWithCrossAttentions`: `logits` `(B, K, vocab_size)` for the last `K` positions: the
          latent positions among the given tokens, `K = min(T, N)` (with a cache: `min(T, N)` of the new tokens); `loss`
          the mean next-token cross-entropy of those positions (the last has no target in the input); `cache`;
        - `logits_to_keep=n`: the last `n` of those `K` positions alone (0: all), as transformers' causal LMs;
        - `output_hidden_states=True`: `hidden_states`, the latents `(B, Q, dim)` of the `Q` positions the latent
          stack ran for (the `K`, or with a cache the whole latent window where it is recomputed): before the first
          layer (their token embeddings, through `latent_proj`), then after every layer in the order they run (a
          repeated block's layers again), the last one after the final LayerNorm;
        - `output_attentions=True` (eager attention: sdpa computes no probabilities): `attentions`, the latent
          self-attentions' probabilities `(B, heads, Q, latent keys)`, and `cross_attentions`, the cross-attends'
          `(B, cross_heads, Q', context)`, one per layer run, for the queries each computed in this forward (`Q' < Q`
          where a cached step reuses the first cross-attend's outputs of older latents).

    Positions: rotary, on the queries and keys of every attention, by the position counted from the first token of
    the input (with a cache, from the first token the cache has seen). A query-key product depends only on the
    difference of the positions, so this is the same as right-aligned positions or positions in the current context
    window, and a left-padded sample gives the same predictions as unpadded.

    Generation (`GenerationMixin`: greedy, sampling, beam search):

    ```python
    >>> from transformers import PerceiverTokenizer
    >>> tokenizer = PerceiverTokenizer()  # byte level, vocab 262
    >>> config = PerceiverLiteConfig(data_shape=[64, 256], num_latent_tokens=32, dim=64, heads=4, cross_heads=4,
    ...     layers_indice=[0, 1], num_latent_transformers_in_layers=[0, 3], cross_attend_blocks=[0],
    ...     position_encoding_type="rotary", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    >>> model = PerceiverLiteForCausalLM(config)
    >>> inputs = tokenizer(["Hello"], add_special_tokens=False, return_tensors="pt")
    >>> tokens = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    ```

    The cache (`PerceiverLiteCausalLMCache`) holds the context's cross-attention keys (rotated) and values, and
    slides with the context window. While the latent window grows (all positions so far are latents), each step runs
    the new token alone and appends to the latents' self-attention keys and values too. Once it is full, each step
    moves the oldest latent into the prefix: the remaining latents no longer attend to it, so their cached states would
    be stale; the latent stack is then recomputed for the `N` latents from the cached cross-attention keys and values
    (one new position's projections per step). The first cross-attend's outputs of the latents do not change while the
    context window starts at the first token, so the cache keeps them and a step runs that cross-attend for the new
    token alone. Past `C` tokens, the context window's start moves too, and every latent's cross-attends run. The
    result equals a full forward on the last `C` tokens at every step. `PerceiverLiteSlidingCausalLMCache`, passed as
    `cache=`, keeps sliding the latents' keys and values instead: every step runs the new token alone (approximate
    once the latent window is full; see its docstring).

    Fast path (`use_fast_paths`, `fast_plan`): the context's cross-attention keys and values are functions of each
    position's token alone, so where a forward's new tokens (batch x length) are at least the vocabulary, the
    cross-attentions gather them from per-token tables of the whole vocabulary (`token_key_values`) instead of
    projecting every position.
    """

    main_input_name = "input_ids"
    input_modalities = ("text",)
    pipeline_tag = "text-generation"
    _can_record_outputs = {  # the hidden states: collected by `_latents` (a reused cross-attend runs for some queries)
        "attentions": OutputRecorder(PerceiverLiteAttention, index=1, layer_name="self_attention"),
        "cross_attentions": OutputRecorder(PerceiverLiteAttention, index=1, layer_name="cross_attention"),
    }
    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}
    _no_split_modules = ["PerceiverLiteCausalLayer"]

    def __init__(self, config: PerceiverLiteConfig):
        self._check_config(config)
        super().__init__(config)
        width = config.data_shape[0]
        self.embeddings = nn.Embedding(config.vocab_size, width)
        self.latent_proj = nn.Linear(width, config.dim) if config.dim != width else None
        self.blocks = nn.ModuleList(
            PerceiverLiteCausalBlock(config, n, config.cross_attends(block))
            for block, n in enumerate(config.num_latent_transformers_in_layers)
        )
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.lm_proj = nn.Linear(config.dim, width) if config.dim != width else None
        self.lm_head = nn.Linear(width, config.vocab_size)
        self.post_init()

    @staticmethod
    def _check_config(config: PerceiverLiteConfig):
        config._validate()
        problems = [(field, reason) for field, bad, reason in (
            ("data_shape", config.num_axes != 1, f"must be [embedding width, longest context], got {config.data_shape}"),
            ("position_encoding_type", config.position_encoding_type != "rotary",
             f"must be 'rotary', got {config.position_encoding_type!r}"),
            ("input_projection_dim", config.input_projection_dim is not None,
             f"must be None (the context is the token embeddings), got {config.input_projection_dim}"),
        ) if bad]  # fmt: skip
        if problems:
            field, reason = problems[0]
            raise ValueError(f"PerceiverLiteForCausalLM: `{field}` {reason}")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own `PerceiverLiteCausalLMCache` (its layers are not the config's)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Embedding):
            # tied to the LM head: at the other heads' unit scale, the first logits would be of size sqrt(E)
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")  # transformers' old name, as its models take it
    @can_return_tuple
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids in `[0, vocab_size)`, `T <= data_shape[1]`.
        attention_mask (`torch.Tensor` of shape `(B, T)`, or `(B, cached + T)` with a cache, *optional*):
            1 for tokens, 0 for padding; left padding only.
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): the `input_ids`, -100 where not scored.
        cache (`PerceiverLiteCausalLMCache`, *optional*): the cache of the previous steps (an empty transformers
            `Cache` is replaced by one).
        use_cache (`bool`, *optional*): return a cache (default: where one is given).
        logits_to_keep (`int`, *optional*): return the logits of the last `logits_to_keep` of the `K` positions only
            (0, the default: all `K`), and score only those with `labels`; `generate` passes 1. The last latent
            self-attention layer then runs for those positions alone.
        inputs_embeds (`torch.FloatTensor` of shape `(B, T, data_shape[0])`, *optional*): token embeddings instead of
            `input_ids` (soft prompts, as PEFT's prompt tuning passes them): the context and the latents' first
            states, as the embeddings of `input_ids` would be.
        output_hidden_states (`bool`, *optional*): return the latents before and after every layer
            (`hidden_states`; default `config.output_hidden_states`).
        output_attentions (`bool`, *optional*): return the attention probabilities (`attentions`, `cross_attentions`;
            default `config.output_attentions`); needs `attn_implementation="eager"`.
        """
        check_keywords(self, kwargs)
        if type(logits_to_keep) is not int or logits_to_keep < 0:
            raise TypeError(
                f"`logits_to_keep` must be an int >= 0 (how many of the last positions' logits to return, 0 for all), "
                f"got {logits_to_keep!r}"
            )
        output_attentions, output_hidden_states = (
            getattr(self.config, name) if kwargs.get(name) is None else kwargs[name]
            for name in ("output_attentions", "output_hidden_states")
        )  # None: the config's, as transformers' models read them
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs the eager attention, got attn_implementation="
                f"{self.config._attn_implementation!r}, which computes no probabilities: build or load the model with "
                "attn_implementation='eager' (or call model.set_attn_implementation('eager'))"
            )
        if type(output_hidden_states) is not bool:
            raise TypeError(f"`output_hidden_states` must be True or False, got {output_hidden_states!r}")
        use_cache = cache is not None if use_cache is None else use_cache
        if self.training and self.is_activation_checkpointing:
            use_cache = False  # as transformers' layers: recomputed layers would append twice
        cache = self._check_causal_inputs(input_ids, inputs_embeds, attention_mask, labels, cache if use_cache else None)
        if use_cache and cache is None:
            cache = PerceiverLiteCausalLMCache(self.config)
        plan = None if input_ids is None else fast_plan(self, input_ids, kwargs=kwargs)  # its tables are of token ids
        if inputs_embeds is None:
            embeds = self.embeddings(input_ids)  # (B, T, E)
        else:
            embeds = inputs_embeds.to(self.embeddings.weight.dtype)  # any float dtype, as the weights' (as ViT)
        all_hidden_states = [] if output_hidden_states or output_attentions else None  # every layer for all positions
        hidden_states = self._latents(input_ids, embeds, attention_mask, cache, plan, logits_to_keep, all_hidden_states)
        hidden_states = self.norm(hidden_states)  # (B, K, dim)
        if all_hidden_states is not None:
            all_hidden_states[-1] = self.norm(all_hidden_states[-1])  # after the final norm, as transformers' LMs
        if self.lm_proj is not None:
            hidden_states = self.lm_proj(hidden_states)  # (B, K, E)
        logits = self.lm_head(hidden_states)  # (B, K, vocab_size)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels[:, -logits.shape[1] :], vocab_size=self.config.vocab_size)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )  # `capture_outputs` adds the attentions

    def _latents(self, input_ids, embeds, attention_mask, cache, plan=None, logits_to_keep=0, all_hidden_states=None):
        """The final latents `(B, K, dim)` of the positions the forward returns, from the new tokens' embeddings
        `embeds` `(B, T, E)` (`input_ids`, their ids, are None where the forward was given embeddings): the latent
        positions among the new tokens, the last `logits_to_keep` of them where it is not 0. The latent stack runs
        for the last `Q` positions (the new tokens while a cache's latent window grows, else the whole latent
        window), its last layer, where it is a latent self-attention layer, for the `K` alone, unless
        `all_hidden_states` is a list: it then runs for the `Q` and the list gets the `Q` latents before the first
        layer and after every layer. Updates `cache`. With a fast `plan` (`fast_plan`), the cross-attentions take the
        context's keys and values from per-token tables (`token_key_values`)."""
        config = self.config
        (batch_size, length), past = embeds.shape[:2], 0 if cache is None else cache.seen_tokens
        total = past + length
        window, num_latents = min(total, config.data_shape[1]), min(total, config.num_latent_tokens)
        # Incremental: the new positions alone run the latent stack, beside the cached latents' keys and values; exact
        # while no latent has left the window yet (and the cache holds every earlier one's: a `crop` back from past the
        # window has none), and the sliding cache's approximation after
        incremental = cache is not None and (
            cache.slides_latent_states or (total <= config.num_latent_tokens and cache.cached_latents() == past)
        )
        num_queries = min(length, config.num_latent_tokens) if incremental else num_latents
        num_outputs = min(length, num_queries, logits_to_keep or length)  # K: the positions whose logits are returned
        num_latent_keys = num_queries  # the self-attention's keys: the latents, cached ones included
        if incremental:
            num_latent_keys = min(cache.cached_latents() + num_queries, config.num_latent_tokens)
        history = embeds  # (B, kept + T, E): the cache's kept token embeddings, then the new ones
        if cache is not None and cache.token_embeddings is not None:
            history = torch.cat([cache.token_embeddings, embeds], dim=1)
        recent = history[:, -config.num_latent_tokens :]  # (B, <= N, E)
        device = embeds.device
        query_positions = torch.arange(window - num_queries, window, device=device)[None]  # (1, Q)
        key_positions = torch.arange(window, device=device)[None]  # (1, W)
        valid = None if attention_mask is None else attention_mask[:, -window:].bool()  # (B, W)
        context, context_ids = embeds, input_ids
        if self.training and cache is None and config.prefix_dropout > 0:
            key_positions = self._kept_positions(batch_size, length, window - num_latents, device)  # (B or 1, W')
            if key_positions.shape[1] < length:  # a prefix dropped per sample
                context_ids = None if input_ids is None else input_ids.gather(1, key_positions)  # (B, W')
                context = embeds.gather(1, key_positions[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, W', E)
                valid = None if valid is None else valid.gather(1, key_positions)
        latent_keys = torch.arange(window - num_latent_keys, window, device=device)[None]  # (1, L): the latents
        latent_valid = None if valid is None else valid[:, -num_latent_keys:]
        cross_mask = causal_key_mask(query_positions, key_positions, valid)  # (B or 1, 1, Q, W)
        latent_mask = causal_key_mask(query_positions, latent_keys, latent_valid)  # (B or 1, 1, Q, L)
        # recomputed latents' keys and values: kept where every position is a latent (the latent window not yet full)
        keep_latent_states = incremental or (cache is not None and total <= config.num_latent_tokens)
        if cache is not None and not incremental:
            cache.drop_latent_states()

        # Rotary angles count from the first token the cache has seen (window index + `offset`): a cached key keeps the
        # rotation of its position, and only a forward's new keys are rotated
        offset, angles = total - window, {}

        def rotary(kind: str, attention: PerceiverLiteAttention):
            """The `(cos, sin)` of the queries' positions and of the keys the `kind` attention computes in this forward:
            the context's (its new positions, or every kept one without a cache) or the latents' (the queries'), once
            per head width."""
            width = attention.head_dim
            if width not in angles:
                angles[width] = tuple(
                    rotary_cos_sin(offset + positions, width, config.rope_theta, embeds.dtype)
                    for positions in (query_positions, key_positions[:, -context.shape[1] :])
                )  # fmt: skip
            queries, context_keys = angles[width]
            return queries, context_keys if kind == "cross" else queries

        hidden_states = recent[:, -num_queries:]  # (B, Q, E): the latents start from their tokens' embeddings
        if self.latent_proj is not None:
            hidden_states = self.latent_proj(hidden_states)  # (B, Q, dim)
        record = (lambda states: None) if all_hidden_states is None else all_hidden_states.append
        record(hidden_states)
        context_states, latent_layer = {}, 0
        table_key_values = None if plan is None else {}  # per cross-attend layer: a repeated block reads them again
        for step, block_index in enumerate(config.layers_indice):
            block = self.blocks[block_index]
            if block.cross_layer is not None:
                update = None if cache is None else self._context_update(cache, block_index, window, context_states)
                # the first cross-attend of the latents before the new tokens: from the cache where it holds them
                reused = 0 if cache is None or step > 0 else cache.reusable_cross_states(total, num_queries, length)
                (query_cos, query_sin), key_angles = rotary("cross", block.cross_layer.cross_attention)
                rotary_angles = (query_cos[..., reused:, :], query_sin[..., reused:, :]), key_angles
                fresh = self._cross_attend(
                    block.cross_layer, hidden_states[:, reused:], context, context_ids, cross_mask[..., reused:, :],
                    rotary_angles, update, table_key_values,
                )  # (B, Q - reused, dim)
                hidden_states = fresh if reused == 0 else torch.cat([cache.cross_states[:, -reused:], fresh], dim=1)
                if cache is not None and step == 0:
                    cache.keep_cross_states(fresh, total)
                record(hidden_states)
            for layer in block.layers:
                update = cache.latent_update(latent_layer) if keep_latent_states else None
                rotary_angles = rotary("latent", layer.self_attention)
                last = step == len(config.layers_indice) - 1 and layer is block.layers[-1]
                outputs = num_outputs if last and all_hidden_states is None else None
                hidden_states = layer(hidden_states, None, latent_mask, rotary_angles, update, num_outputs=outputs)
                record(hidden_states)
                latent_layer += 1
        if cache is not None:
            cache.keep_tokens(history, total, length)
        return hidden_states[:, -num_outputs:]  # (B, K, dim)

    def _cross_attend(self, layer, hidden_states, context, context_ids, mask, rotary_angles, update, table_key_values):
        """A causal cross-attend layer of the latents `hidden_states` to the `context` (its token embeddings, of the
        tokens `context_ids`); under a fast plan (`table_key_values` a dict, None otherwise), to keys and values from
        per-token tables (`token_key_values`), computed once per layer and forward and kept in `table_key_values`."""
        if table_key_values is None:
            return layer(hidden_states, context, mask, rotary_angles, update)
        if layer not in table_key_values:
            table_key_values[layer] = token_key_values(layer.cross_attention, self.embeddings, context_ids)
        key, value = table_key_values[layer]  # (B, H, W, D) each
        return causal_cross_layer(layer, hidden_states, key, value, mask, rotary_angles, update)

    @staticmethod
    def _context_update(cache, block_index, window, context_states):
        """The cache update of a block's cross-attention: appends once per forward; a block run again (its weights,
        so its keys and values, shared) reads what its first run stored."""
        if block_index in context_states:
            return lambda key, value: context_states[block_index]
        append = cache.context_update(block_index, window)

        def update(key, value):
            context_states[block_index] = append(key, value)
            return context_states[block_index]

        return update

    def _kept_positions(self, batch_size: int, length: int, prefix_length: int, device) -> torch.Tensor:
        """Prefix dropout (training): the context positions each sample keeps, `(B, W')`, a random
        `1 - prefix_dropout` of its prefix positions in order and all its latent positions; `(1, length)`, every
        position, where that drops none."""
        keep = prefix_length - int(prefix_length * self.config.prefix_dropout)
        if keep == prefix_length:
            return torch.arange(length, device=device)[None]
        scores = torch.rand(batch_size, prefix_length, device=device)
        kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)
        latents = torch.arange(prefix_length, length, device=device).expand(batch_size, -1)  # (B, N)
        return torch.cat([kept, latents], dim=1)  # (B, W')

    def _check_causal_inputs(self, input_ids, inputs_embeds, attention_mask, labels, cache):
        """Inputs, mask, labels and cache, before any compute; returns the cache to use (None for an empty foreign
        `Cache`, which the forward replaces)."""
        # the token heads' checks of the inputs; the mask covers the cached tokens too, checked below
        batch_size, length = check_token_inputs(self.config, input_ids, inputs_embeds, None, self.dtype)
        name, inputs = ("input_ids", input_ids) if inputs_embeds is None else ("inputs_embeds", inputs_embeds)
        if cache is not None and not isinstance(cache, PerceiverLiteCausalLMCache):
            if not isinstance(cache, Cache):
                raise TypeError(f"`cache` must be a PerceiverLiteCausalLMCache (or None), got {type(cache).__name__}")
            if cache.get_seq_length() > 0:
                raise TypeError(
                    f"`cache` must be a PerceiverLiteCausalLMCache (or empty), got a {type(cache).__name__} holding "
                    f"{cache.get_seq_length()} tokens"
                )
            cache = None
        past = 0 if cache is None else cache.seen_tokens
        context = self.config.data_shape[1]
        if length > context:
            raise ValueError(
                f"`{name}` has shape {list(inputs.shape)}: {length} tokens exceed the longest context "
                f"data_shape[1] = {context}; pass the last {context} tokens (generate keeps them itself)"
            )
        if cache is not None and cache.token_embeddings is not None and cache.token_embeddings.shape[0] != batch_size:
            raise ValueError(
                f"`cache` holds {cache.token_embeddings.shape[0]} sequences, `{name}` has shape {list(inputs.shape)}"
            )
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, [(batch_size, past + length)])
            check_left_padding(attention_mask)
        if labels is not None:
            check_labels(labels, batch_size, self.config.vocab_size, "single_label_classification", (length,))
        return cache

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """transformers' checks, after refusing assisted decoding: it takes the logits of several drafted tokens from
        one forward, and here a position's prediction depends on the latent window that ends at it (the full forward
        of the sequence up to it), which that forward's other positions do not share once the window is full; the
        tokens would differ from greedy decoding's. This model can be the assistant of another model."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "PerceiverLiteForCausalLM does not verify drafted tokens (`assistant_model`, `prompt_lookup_num_tokens`"
                " or another assisted decoding): a position's prediction depends on the latent window ending at it, so "
                "one forward cannot score several drafts as token-by-token decoding would; generate without them (it "
                "can be the assistant of another model)"
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """transformers' checks of a given cache; then, where `generate` uses a cache and none was given, this model's
        own (`PerceiverLiteCausalLMCache`: transformers' default would be a `DynamicCache`), recording its past when
        this model is another model's assistant (assisted decoding crops the drafts that model rejected)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = PerceiverLiteCausalLMCache(self.config)
            if generation_config.is_assistant:
                model_kwargs["cache"].activate_past_recording()

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):  # fmt: skip
        """transformers' preparation, then the last `data_shape[1]` tokens where there are more (without a cache every
        step sees the last context window; with one, the prompt's), and the mask cut to the tokens seen and given.
        A prompt given as `inputs_embeds` is the first step's input, as transformers prepares it. `position_ids`
        (which transformers passes to an assistant model, counted from each row's first unpadded token) are dropped:
        the rotary positions count from the first token of the input, and only their differences, the same in both,
        enter a query-key product."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, **kwargs,
        )  # fmt: skip
        inputs.pop("position_ids", None)
        name = "input_ids" if inputs.get("input_ids") is not None else "inputs_embeds"
        inputs[name] = inputs[name][:, -self.config.data_shape[1] :]  # (B, <= C) or (B, <= C, E)
        if inputs.get("attention_mask") is not None:
            past = 0 if cache is None else cache.get_seq_length()
            inputs["attention_mask"] = inputs["attention_mask"][:, -(past + inputs[name].shape[1]) :]
        return inputs


def check_left_padding(attention_mask: torch.Tensor):
    """Padding only before the tokens (0s, then 1s in each row): the causal LM's latents are the last positions."""
    if not has_values(attention_mask):
        return
    mask = attention_mask.bool()
    right_padded = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1)  # a 1 followed by a 0
    if right_padded.any():
        rows = right_padded.nonzero().flatten().tolist()[:8]
        raise ValueError(
            f"`attention_mask` must be left padding (0s before the tokens, then 1s), got a 0 after a 1 in rows {rows} "
            "(right padding); pad on the left: tokenizer.padding_side = 'left'"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Auto classes. Registered here, not in the package's `__init__`, so that a copy of this file loaded as remote code
# (`trust_remote_code=True`) registers them too, and saves again with its code.
# ---------------------------------------------------------------------------------------------------------------------

AUTO_CLASSES = {
    "AutoModel": PerceiverLiteModel,
    "AutoModelForImageClassification": PerceiverLiteForImageClassification,
    "AutoModelForSequenceClassification": PerceiverLiteForSequenceClassification,
    "AutoModelForAudioClassification": PerceiverLiteForAudioClassification,
    "AutoModelForMaskedLM": PerceiverLiteForMaskedLM,
    "AutoModelForTokenClassification": PerceiverLiteForTokenClassification,
    "AutoModelForSemanticSegmentation": PerceiverLiteForDensePrediction,
    "AutoModelForCausalLM": PerceiverLiteForCausalLM,
}

PerceiverLiteConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)


__all__ = [
    "PerceiverBlock",
    "PerceiverLayer",
    "PerceiverLiteBlock",
    "PerceiverLiteDecoder",
    "PerceiverLiteDecoderOutput",
    "PerceiverLiteCausalLMCache",
    "PerceiverLiteSlidingCausalLMCache",
    "PerceiverLiteForAudioClassification",
    "PerceiverLiteForCausalLM",
    "PerceiverLiteForDensePrediction",
    "PerceiverLiteForImageClassification",
    "PerceiverLiteForMaskedLM",
    "PerceiverLiteForSequenceClassification",
    "PerceiverLiteForTokenClassification",
    "PerceiverLiteModel",
    "PerceiverLitePreTrainedModel",
]
