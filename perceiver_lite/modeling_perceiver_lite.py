"""PyTorch PerceiverLite: the Perceiver (Jaegle et al., 2021) as a transformers model."""

import dataclasses
import functools
import math
import os
from collections.abc import Callable
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
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_perceiver_lite import PerceiverLiteConfig


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Input checks: every public forward validates before any compute.
# ---------------------------------------------------------------------------------------------------------------------


def _has_values(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds values to check; not on the meta device (shapes only: tracing, counting FLOPs), where the
    checks of shapes and dtypes still run and those of values are skipped."""
    return tensor.device.type != "meta"


def _describe(tensor) -> str:
    return f"{type(tensor).__name__}" if not isinstance(tensor, torch.Tensor) else f"shape {list(tensor.shape)}"


def _check_tensor(
    name: str,
    tensor,
    expected: str,
    ndim: int | None = None,
    floating: bool | None = None,
    dtype: torch.dtype | None = None,
):
    """Raise a clear error unless `tensor` is a tensor of rank `ndim` with a non-empty shape of the right kind of dtype
    and finite values, also once cast to `dtype` (the model's, when the forward casts its inputs)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {expected}, got {_describe(tensor)}")
    if 0 in tensor.shape:
        raise ValueError(f"`{name}` must not be empty (a zero-length batch or axis), expected {expected}, got {_describe(tensor)}")
    if floating is True and not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got dtype {tensor.dtype}; convert it with `.float()`")
    if floating is False and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {tensor.dtype}")
    if not tensor.is_floating_point() or not _has_values(tensor):
        return
    if not torch.isfinite(tensor.to(dtype or tensor.dtype)).all():
        beyond = f" (or values beyond the range of the model's {dtype})" if dtype not in (None, tensor.dtype) else ""
        raise ValueError(
            f"`{name}` contains NaN or Inf values{beyond}; clean the inputs (for example with torch.nan_to_num)"
        )


def _check_mask(name: str, mask, allowed_shapes: list[tuple[int, ...]]):
    """Check a mask (1/True = attend) against the shapes it may take."""
    expected = " or ".join(str(list(shape)) for shape in dict.fromkeys(allowed_shapes))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(mask).__name__}")
    if tuple(mask.shape) not in allowed_shapes:
        raise ValueError(f"`{name}` must have shape {expected}, got {list(mask.shape)}")
    if mask.dtype != torch.bool and _has_values(mask) and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"`{name}` must hold 1 (attend) or 0 (padding), got values {mask.unique().tolist()[:8]}")


def _key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) broadcastable to (B, H, Lq, Lk), from (B, Lk) or (B, Lq, Lk).

    A row with no valid key would give an all-masked softmax (NaN); such a row attends to every key instead, so that the
    output stays finite (and the same under eager and sdpa). That output is computed from the padding values, so it is
    meaningless: a sample with nothing valid has no meaningful prediction (README, "Design decisions").
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

    The coordinates of an axis of `n` elements are `linspace(-1, 1, n)`. With an attention mask they come from each
    sample's own valid extent along the axis (the last valid index + 1), so a padded sample gets exactly the features of
    the same sample unpadded. Features for an unmasked input depend only on its spatial shape: they are built once and
    reused until the shape changes. Nothing is stored in the state dict.
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
        if extents is not None:
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
    the Fourier position features of each element."""

    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        self.position_features = PerceiverLiteFourierFeatures(config)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None):
        data, positions, attention_mask = self.split(inputs, attention_mask)
        positions = positions.expand(data.shape[0], *positions.shape[-2:])  # (B, M, F)
        return torch.cat([data, positions], dim=-1), attention_mask  # (B, M, C + F)

    def split(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The two parts of `forward`'s output, not concatenated: the data `(B, M, C)` (a view of `inputs`), the position
        features `(M, F)` shared by the batch (or `(B, M, F)` for a padded batch) and the flattened mask `(B, M)`, None
        when every element is valid (a mask of all ones is no mask, and takes the same paths)."""
        batch_size, spatial_shape = inputs.shape[0], inputs.shape[2:]
        data = inputs.flatten(2).transpose(1, 2)  # (B, M, C)
        extents = None
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(batch_size, -1).bool()  # (B, M)
            if _has_values(attention_mask) and attention_mask.all():  # on the meta device: taken as padding
                attention_mask = None
            else:
                extents = _valid_extents(attention_mask.view(batch_size, *spatial_shape))
        positions = self.position_features(spatial_shape, extents, device=inputs.device, dtype=inputs.dtype)
        return data, positions, attention_mask


def _valid_extents(mask: torch.Tensor) -> torch.Tensor:
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


def masked_softmax(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of `scores`, with a boolean (True = attend) or additive mask, in the scores' dtype.
    Safe in half precision: torch's softmax subtracts the row maximum and accumulates half precision in float32."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    return scores.softmax(dim=-1)


def attention_probabilities(scaled_query, key, attention_mask) -> torch.Tensor:
    """Softmax attention weights `(..., Lq, Lk)` for queries `(..., Lq, D)`, already scaled (which keeps the product in
    float16's range), and keys `(..., Lk, D)`, in their dtype."""
    return masked_softmax(torch.matmul(scaled_query, key.transpose(-1, -2)), attention_mask)  # (..., Lq, Lk)


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
    attn_weights = attention_probabilities(query * scaling, key, attention_mask)  # (B, H, Lq, Lk)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Lq, H, D)
    return attn_output, attn_weights


class RecomputedAttention(torch.autograd.Function):
    """Softmax attention through plain batched matmuls that keeps nothing of size `(Lq, Lk)` for the backward pass: it
    saves the queries, keys and values and recomputes the probabilities there, a block of query rows and samples at a
    time, so its transient memory stays under `SCORES_BUDGET` scores. On the CPU in half precision this is faster than
    torch's fused attention kernel (bfloat16 / float16 matmuls run on the CPU's matrix instructions; the fused kernel's
    blocks do not), at the price of one extra `Q K^T` product in the backward pass. Its backward computes only the
    gradients asked for (the fused kernel's computes all three), which makes it the faster one in float32 too where the
    keys and values need none. The softmax and its gradient stay in the inputs' dtype: torch's CPU kernels accumulate
    half precision in float32."""

    SCORES_BUDGET = 1 << 22

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scaling):
        query = query * scaling
        key, value = key.contiguous(), value.contiguous()  # heads split from one projection: copied once, not per use
        ctx.save_for_backward(query, key, value, attention_mask)
        output = query.new_empty(*query.shape[:-1], value.shape[-1])  # (B, H, Lq, Dv)
        for rows, batch, mask in _score_blocks(*query.shape[:3], key.shape[2], attention_mask):
            probs = attention_probabilities(query[batch, :, rows], key[batch], mask)  # (b, H, n, Lk)
            _matmul_into(output[batch, :, rows], probs, value[batch])
        ctx.scaling = scaling
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, attention_mask = ctx.saved_tensors
        grad_query, grad_key, grad_value = (
            torch.empty_like(tensor) if needed else None for tensor, needed in zip((query, key, value), ctx.needs_input_grad)
        )  # only those asked for: keys and values of the inputs alone need none
        for rows, batch, mask in _score_blocks(*query.shape[:3], key.shape[2], attention_mask):
            query_block, grad = query[batch, :, rows], grad_output[batch, :, rows]  # (b, H, n, D), (b, H, n, Dv)
            probs = attention_probabilities(query_block, key[batch], mask)  # (b, H, n, Lk)
            later_rows = rows.start > 0  # the keys' and values' gradients sum over the blocks of rows
            if grad_value is not None:
                _matmul_into(grad_value[batch], probs.transpose(-1, -2), grad, accumulate=later_rows)
            grad_probs = torch.matmul(grad, value[batch].transpose(-1, -2))  # (b, H, n, Lk)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            if grad_query is not None:
                _matmul_into(grad_query[batch, :, rows], grad_scores, key[batch])
            if grad_key is not None:
                _matmul_into(grad_key[batch], grad_scores.transpose(-1, -2), query_block, accumulate=later_rows)
        grad_query = None if grad_query is None else grad_query.mul_(ctx.scaling)
        return grad_query, grad_key, grad_value, None, None


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False):
    """`out = a @ b`, written in place where `out` is contiguous, or `out += a @ b`."""
    if accumulate:
        out += a @ b
    elif out.is_contiguous():
        torch.matmul(a, b, out=out)
    else:
        out.copy_(a @ b)


def _score_blocks(batch_size: int, num_heads: int, num_rows: int, num_keys: int, attention_mask):
    """Blocks of query rows, then slices of the batch, whose `(b, H, n, Lk)` scores fit `RecomputedAttention.
    SCORES_BUDGET`, with their masks: `(rows, batch, mask)`."""
    row_scores = num_heads * num_keys
    row_step = max(1, min(num_rows, RecomputedAttention.SCORES_BUDGET // row_scores))
    batch_step = max(1, RecomputedAttention.SCORES_BUDGET // (row_scores * row_step))
    for row_start in range(0, num_rows, row_step):
        rows = slice(row_start, row_start + row_step)
        for batch_start in range(0, batch_size, batch_step):
            batch = slice(batch_start, batch_start + batch_step)
            if attention_mask is None:
                yield rows, batch, None
                continue
            mask = attention_mask.expand(batch_size, *attention_mask.shape[1:])[batch]  # (b, 1, 1 or Lq, Lk)
            yield rows, batch, mask[:, :, rows] if mask.shape[2] > 1 else mask


def recomputed_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention interface's signature for `RecomputedAttention` (no dropout)."""
    attn_output = RecomputedAttention.apply(query, key, value, attention_mask, scaling)
    return attn_output.transpose(1, 2).contiguous(), None  # (B, Lq, H, D)


def kept_probabilities_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The same batched matmuls through autograd, which keeps the probabilities for the backward pass (no dropout); no
    weights returned, as on torch's fused path."""
    return eager_attention_forward(module, query, key, value, attention_mask, scaling)[0], None


class SharedQueryAttention(torch.autograd.Function):
    """Attention of a query shared by every sample (the latents before their first cross-attend) to keys in the factored
    form of `FactoredProjection`, `K_b = X_b W_x^T + r_b * (P W_p^T) + c` with the positions `P` shared by the batch:

        Q K_b^T = (Q W_x) X_b^T + r_b * ((Q W_p) P^T) + (Q c) 1^T

    `(Q W_p) P^T`, as costly as one sample's `Q K^T`, is computed once for the whole batch, and `(Q W_x) X_b^T` has only
    `C + 1` terms per score, so the scores of `B` samples cost about one product instead of `B` (the backward likewise
    for the gradients of the query and keys). The last term is constant along each row and drops out of the softmax:
    the key bias `c` gets a zero gradient (it is an input for that alone: every parameter gets a gradient, as
    distributed data parallel expects). Like `RecomputedAttention` it keeps nothing of size `(Lq, Lk)` for the backward
    pass, and works through blocks of query rows and samples whose scores fit `SCORES_BUDGET`.

    Inputs: `query_data` `(H, N, C + 1)` and `query_positions` `(H, N, F)`, the scaled query times `W_x` and `W_p`;
    `data` `(B, M, C + 1)`, `positions` `(M, F)`, `rstd` `(B, M)` and `key_bias`; `value` `(B, H, M, Dv)`; a key padding
    `attention_mask` `(B, 1, 1, M)` or None. Output `(B, H, N, Dv)`.
    """

    @staticmethod
    def forward(ctx, query_data, query_positions, data, positions, rstd, key_bias, value, attention_mask):
        ctx.save_for_backward(query_data, query_positions, data, positions, rstd, value, attention_mask)
        ctx.key_bias_meta = key_bias.shape, key_bias.dtype
        output = value.new_empty(len(value), *query_data.shape[:2], value.shape[-1])  # (B, H, N, Dv)
        probabilities = SharedQueryAttention.probabilities
        blocks = SharedQueryAttention.blocks(query_positions, positions, len(value), attention_mask)
        for rows, shared_scores, batch, mask in blocks:
            probs = probabilities(query_data[:, rows], shared_scores, data[batch], rstd[batch], mask)  # (b, H, n, M)
            _matmul_into(output[batch, :, rows], probs, value[batch])  # (b, H, n, Dv)
        return output

    @staticmethod
    def blocks(query_positions, positions, batch_size, attention_mask):
        """`_score_blocks` with the shared scores `(H, n, M)` of each block of query rows."""
        shared_scores = None
        for rows, batch, mask in _score_blocks(batch_size, *query_positions.shape[:2], len(positions), attention_mask):
            if batch.start == 0:
                shared_scores = query_positions[:, rows] @ positions.T  # (H, n, M)
            yield rows, shared_scores, batch, mask

    @staticmethod
    def probabilities(query_data, shared_scores, data, rstd, attention_mask):
        scores = torch.matmul(query_data, data[:, None].transpose(-1, -2))  # (b, H, n, M)
        return masked_softmax(scores.addcmul_(shared_scores, rstd[:, None, None, :]), attention_mask)

    @staticmethod
    def backward(ctx, grad_output):
        query_data, query_positions, data, positions, rstd, value, attention_mask = ctx.saved_tensors
        needs_data, needs_positions, needs_rstd = (ctx.needs_input_grad[i] for i in (2, 3, 4))
        accumulate = torch.promote_types(query_data.dtype, torch.float32)  # sums over the batch in float32 at least
        grad_query_data = torch.zeros(query_data.shape, dtype=accumulate, device=query_data.device)
        grad_query_positions = torch.empty_like(query_positions)
        grad_positions = torch.zeros_like(positions) if needs_positions else None
        grad_data = torch.zeros_like(data) if needs_data else None
        grad_rstd = torch.zeros_like(rstd) if needs_rstd else None
        grad_value = torch.empty_like(value)
        probabilities, grad_shared = SharedQueryAttention.probabilities, None
        blocks = SharedQueryAttention.blocks(query_positions, positions, len(value), attention_mask)
        for rows, shared_scores, batch, mask in blocks:
            if batch.start == 0:  # a new block of rows: its shared scores' gradient sums over the batch
                grad_shared = torch.zeros(shared_scores.shape, dtype=accumulate, device=shared_scores.device)
            probs = probabilities(query_data[:, rows], shared_scores, data[batch], rstd[batch], mask)  # (b, H, n, M)
            grad = grad_output[batch, :, rows]  # (b, H, n, Dv)
            _matmul_into(grad_value[batch], probs.transpose(-1, -2), grad, accumulate=rows.start > 0)
            grad_probs = torch.matmul(grad, value[batch].transpose(-1, -2))  # (b, H, n, M)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_query_data[:, rows] += torch.matmul(grad_scores, data[batch, None]).sum(0)  # (H, n, C + 1)
            for sample_grad, sample_rstd in zip(grad_scores, rstd[batch]):
                grad_shared.addcmul_(sample_grad, sample_rstd)  # (H, n, M)
            if needs_data:
                grad_data[batch] += (grad_scores.transpose(-1, -2) @ query_data[:, rows]).sum(1)  # (b, M, C + 1)
            if needs_rstd:
                grad_rstd[batch] += (grad_scores * shared_scores).sum((1, 2))  # (b, M)
            if batch.stop >= len(value):  # the block of rows is complete
                grad_shared = grad_shared.to(query_positions.dtype)
                grad_query_positions[:, rows] = grad_shared @ positions  # (H, n, F)
                if needs_positions:
                    grad_positions += (grad_shared.transpose(-1, -2) @ query_positions[:, rows]).sum(0)  # (M, F)
        grad_key_bias = torch.zeros(ctx.key_bias_meta[0], dtype=ctx.key_bias_meta[1], device=value.device)
        return (
            grad_query_data.to(query_data.dtype),
            grad_query_positions,
            grad_data,
            grad_positions,
            grad_rstd,
            grad_key_bias,
            grad_value,
            None,
        )


def _round_up(number: int, multiple: int) -> int:
    return -(-number // multiple) * multiple


def _cat_padded(columns: list[torch.Tensor], width: int) -> torch.Tensor:
    """`torch.cat(columns, -1)` with zero columns appended up to `width`."""
    padding = columns[0].new_zeros(*columns[0].shape[:-1], width - sum(column.shape[-1] for column in columns))
    return torch.cat([*columns, padding], dim=-1)


@dataclasses.dataclass
class FactoredProjection:
    """`linear(norm(cat([data, positions], -1)))` in the factored form of `norm_and_project_concatenation`:
    `data @ weight_data.T + rstd * (positions @ weight_positions.T) + bias`, with `data` `(B, M, C + 1)` (normalised,
    `rstd` applied), `positions` `(M, F)` or `(B, M, F)` (centred), `rstd` `(B, M, 1)`. `materialize()` computes the
    projection `(B, M, out)`; for the positions of a grid, `grid_features() @ grid_weight().T` equals it."""

    data: torch.Tensor
    positions: torch.Tensor
    rstd: torch.Tensor
    weight_data: torch.Tensor
    weight_positions: torch.Tensor
    bias: torch.Tensor
    grid: tuple[int, ...] | None = None  # the spatial shape whose Fourier features `positions` are, if shared
    _tensor: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _features: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _weight: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def materialize(self) -> torch.Tensor:
        """The projection `(B, M, out)`, computed on the first call and kept for the next ones (repeats of a block)."""
        if self._tensor is None:
            weight_data = self.weight_data.T.expand(len(self.data), -1, -1)  # (B, C + 1, out)
            projected = torch.baddbmm(self.bias, self.data, weight_data)  # (B, M, out)
            positions = self.positions @ self.weight_positions.T  # (M, out) or (B, M, out)
            self._tensor = torch.addcmul(projected, positions, self.rstd.to(projected.dtype))
        return self._tensor

    @property
    def grid_width(self) -> int:
        """The width `r` of `grid_features()`."""
        return _round_up(self.data.shape[-1] + sum(self.grid) + 1, 8)

    def grid_features(self, dtype: torch.dtype) -> torch.Tensor:
        """The inputs as the `(B, M, r)` features that the projection is linear in, for positions of a grid:
        `[data, rstd * onehot(i_0), rstd * onehot(i_1), ..., 1]` at grid position `(i_0, i_1, ...)`, with zero columns
        up to a multiple of 8 (the head sizes fused kernels take), in `dtype`. Computed on the first call and kept for
        the next ones in the same dtype (repeats of a block)."""
        if self._features is None or self._features.dtype != dtype:
            one_hots = []
            for axis, size in enumerate(self.grid):
                shape = [1] * len(self.grid) + [size]
                shape[axis] = size
                eye = torch.eye(size, dtype=dtype, device=self.data.device)
                one_hots.append(eye.view(shape).expand(*self.grid, size).reshape(-1, size))  # (M, G_a)
            rstd = self.rstd.to(dtype)  # (B, M, 1)
            columns = [self.data.to(dtype), torch.cat(one_hots, dim=-1) * rstd, torch.ones_like(rstd)]
            self._features = _cat_padded(columns, self.grid_width)  # (B, M, r)
        return self._features

    def grid_weight(self) -> torch.Tensor:
        """The weight `(out, r)` of the projection on `grid_features()`: `[weight_data, weight_positions @ lines_0^T,
        weight_positions @ lines_1^T, ..., bias]` (see `axis_lines`), zero-padded as the features. Computed on the
        first call and kept for the next ones (repeats of a block)."""
        if self._weight is None:
            axis_weights = [self.weight_positions @ line.T for line in self.axis_lines()]  # (out, G_a) each
            columns = [self.weight_data, *axis_weights, self.bias[:, None]]
            self._weight = _cat_padded(columns, self.grid_width)  # (out, r)
        return self._weight

    def axis_lines(self) -> list[torch.Tensor]:
        """The positions as a sum over the grid's axes, `positions[(i, j, ...)] = lines[0][i] + lines[1][j] + ...`:
        each axis's line of positions through the origin `(G_a, F)`, the origin counted in the first only. Exact for
        Fourier features (per axis, concatenated) centred on their row mean (a sum over the axes too)."""
        grid_positions = self.positions.view(*self.grid, -1)  # (*grid, F)
        origin = grid_positions[(0,) * len(self.grid)]  # (F,)
        lines = []
        for axis in range(len(self.grid)):
            index = [0] * len(self.grid)
            index[axis] = slice(None)
            line = grid_positions[tuple(index)]  # (G_a, F)
            lines.append(line if axis == 0 else line - origin)
        return lines


def norm_and_project_concatenation(
    data: torch.Tensor,
    positions: torch.Tensor,
    norm: nn.LayerNorm | None,
    linears: list[nn.Linear],
    factored: bool = False,
    grid: tuple[int, ...] | None = None,
) -> list[torch.Tensor] | list[FactoredProjection]:
    """`[linear(norm(cat([data, positions], -1))) for linear in linears]`, exactly, without building the concatenation.

    `data` is `(B, M, C)` and `positions` `(M, F)` (the same for every sample) or `(B, M, F)`. The norm's statistics of
    each row combine those of its two parts (Chan et al.'s parallel mean and variance: each part is centred on its own
    mean, so the result is as stable as LayerNorm's), the norm's scale and shift fold into the weight and bias, and the
    weight splits along its input, `W [x_d, x_p] = W_d x_d + W_p x_p`:

        rstd * [x_d - mean_d, mean_p - mean_d] [W_d, h]^T + rstd * (x_p - mean_p) W_p^T + (W beta + b)

    with `h = (C W_p gamma_p - F W_d gamma_d) 1 / (C + F)`. The position part is one `(M, F)` matmul shared by the batch
    instead of `B` of them, which cuts the FLOPs by about `C / (C + F)` and never materialises `(B, M, C + F)`. With
    `factored` (and a norm) the projections come unevaluated, as `FactoredProjection`s, with the spatial shape `grid`
    of the Fourier features `positions` if they are shared by the batch.
    """
    batch_size, channels, num_positions = data.shape[0], data.shape[-1], positions.shape[-1]
    width = channels + num_positions
    if norm is None:
        return [
            torch.baddbmm(
                positions @ linear.weight[:, channels:].T + linear.bias,
                data,
                linear.weight[:, :channels].T.expand(batch_size, -1, -1),
            )
            for linear in linears
        ]

    dtype = linears[0].weight.dtype
    statistics = torch.promote_types(data.dtype, torch.float32)  # float32 at least, as LayerNorm's in half precision
    data, positions = data.to(statistics), positions.to(statistics)
    data_mean, positions_mean = data.mean(-1, keepdim=True), positions.mean(-1, keepdim=True)
    data, positions = data - data_mean, positions - positions_mean
    delta = positions_mean - data_mean  # (B, M, 1)
    variance = data.square().sum(-1, keepdim=True) + positions.square().sum(-1, keepdim=True)
    variance = (variance + delta.square() * (channels * num_positions / width)) / width  # (B, M, 1)
    rstd = torch.rsqrt(variance + norm.eps)
    data = (torch.cat([data, delta], dim=-1) * rstd).to(dtype)  # (B, M, C + 1), normalised: in range in any dtype
    positions = positions.to(dtype)

    factors = []
    for linear in linears:
        weight_data = linear.weight[:, :channels] * norm.weight[:channels]  # (out, C)
        weight_positions = linear.weight[:, channels:] * norm.weight[channels:]  # (out, F)
        mean_correction = (channels * weight_positions.sum(-1) - num_positions * weight_data.sum(-1)) / width
        weight_data = torch.cat([weight_data, mean_correction[:, None]], dim=-1)  # (out, C + 1)
        bias = linear.bias + linear.weight @ norm.bias
        shared_grid = grid if positions.dim() == 2 else None
        factors.append(FactoredProjection(data, positions, rstd, weight_data, weight_positions, bias, shared_grid))
    return factors if factored else [projection.materialize() for projection in factors]


def _batch_shared(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one sample expanded along the batch (stride 0), as the latents before their first
    cross-attend: what is computed per sample then needs computing only once."""
    return tensor.dim() > 1 and len(tensor) > 1 and tensor.stride(0) == 0


def _hooked(*modules) -> bool:
    """Whether accelerate's hooks manage these modules' weights (a `device_map` with offloading loads them only inside
    each module's own forward): the fast paths that read weights directly then call the modules instead."""
    return any(hasattr(module, "_hf_hook") for module in modules)


class PerceiverLiteAttention(nn.Module):
    """Multi-head attention, not causal. Self-attention projects its keys and values from the latents; cross-attention
    from the inputs, with `cross_heads` heads and a LayerNorm on the inputs (pre-norm)."""

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

    def project_key_value(
        self, key_value_states: torch.Tensor, positions: torch.Tensor | None = None, grid: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor | FactoredProjection, torch.Tensor | FactoredProjection]:
        """Keys and values `(B, H, Lk, D)` from `(B, Lk, kv_dim)`; reusable by every call that attends to the same states.

        With `positions` (`(Lk, F)` shared by the batch, the Fourier features of the spatial shape `grid`, or
        `(B, Lk, F)`), `key_value_states` holds only the data channels `(B, Lk, kv_dim - F)` and the result is that of
        their concatenation, computed without building it (`norm_and_project_concatenation`); the keys and values then
        come as `FactoredProjection`s, which `forward` evaluates (`as_tensor`) or uses as such (`_grid_attention` for
        positions of a grid, `SharedQueryAttention` for other positions and a query shared by the batch).
        """
        if positions is not None and not _hooked(self.k_proj, self.v_proj, self.kv_norm):
            projections = norm_and_project_concatenation(
                key_value_states, positions, self.kv_norm, [self.k_proj, self.v_proj], factored=True, grid=grid
            )  # without a norm: tensors (B, Lk, H * D)
            key, value = (p if isinstance(p, FactoredProjection) else self._split_heads(p) for p in projections)
            return key, value
        if positions is not None:
            positions = positions.expand(*key_value_states.shape[:-1], positions.shape[-1])  # (B, Lk, F)
            key_value_states = torch.cat([key_value_states, positions], dim=-1)  # (B, Lk, kv_dim)
        if self.kv_norm is not None:
            key_value_states = self.kv_norm(key_value_states)
        return self._split_heads(self.k_proj(key_value_states)), self._split_heads(self.v_proj(key_value_states))

    def as_tensor(self, projection: torch.Tensor | FactoredProjection) -> torch.Tensor:
        """Keys or values `(B, H, Lk, D)` as a tensor, from a `FactoredProjection` `(B, Lk, H * D)` if need be."""
        return self._split_heads(projection.materialize()) if isinstance(projection, FactoredProjection) else projection

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:-1], -1, self.head_dim).transpose(-3, -2)  # (..., H, L, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor | FactoredProjection | None = None,
        value: torch.Tensor | FactoredProjection | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(key, FactoredProjection):
            if self._attends_grid(key, value):
                return self._grid_attention(hidden_states, key, value, attention_mask, **kwargs)
            if self._shares_query(hidden_states, key):
                return self._shared_query_attention(hidden_states[0], key, self.as_tensor(value), attention_mask), None
        key, value = self.as_tensor(key), self.as_tensor(value)
        input_shape = hidden_states.shape[:-1]
        if key is None and not _hooked(self.q_proj, self.k_proj, self.v_proj):  # self-attention: one product
            weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3 H D, dim)
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            states = self._split_heads(nn.functional.linear(hidden_states, weight, bias))  # (B, 3 H, L, D)
            query, key, value = states.chunk(3, dim=1)  # (B, H, L, D) each
        else:
            query = self._split_heads(self.q_proj(hidden_states))  # (B, H, Lq, D)
            if key is None:
                key, value = self.project_key_value(hidden_states)

        attn_output, attn_weights = self._attend(query, key, value, attention_mask, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1)  # (B, Lq, H * D)
        return self.o_proj(attn_output), attn_weights

    def _attend(self, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `query` `(B, H, Lq, D)` to `key` and `value` `(B, H, Lk, D)` through the configured interface
        (or plain batched matmuls, see `_matmul_attention`): the output `(B, Lq, H, D)` and the weights."""
        attention_interface = self._matmul_attention(query, key, value) or ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )

    def _shared_query_attention(self, hidden_states, key: FactoredProjection, value, attention_mask) -> torch.Tensor:
        """`forward` for one sample's `hidden_states` `(N, dim)` shared by the batch; see `SharedQueryAttention`."""
        query = self._split_heads(self.q_proj(hidden_states) * self.scaling)  # (H, N, D)
        weight_data = key.weight_data.view(self.num_heads, self.head_dim, -1)  # (H, D, C + 1)
        weight_positions = key.weight_positions.view(self.num_heads, self.head_dim, -1)  # (H, D, F)
        query_data, query_positions = query @ weight_data, query @ weight_positions  # (H, N, C + 1), (H, N, F)
        data, positions, rstd = (t.to(query_data.dtype) for t in (key.data, key.positions, key.rstd[..., 0]))
        attn_output = SharedQueryAttention.apply(
            query_data, query_positions, data, positions, rstd, key.bias, value, attention_mask
        )
        attn_output = attn_output.transpose(1, 2).flatten(2)  # (B, N, H * D)
        return self.o_proj(attn_output)

    def _grid_attention(
        self, hidden_states, key: FactoredProjection, value: FactoredProjection, attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` for keys and values factored from the Fourier features of a grid. Both are linear in the same
        `(B, M, r)` features, `K = F W_k^T` and `V = F W_v^T` (`FactoredProjection.grid_features`, the biases in a
        column of ones), so each head attends with the query `q W_k` to `F` as keys and values and maps the result
        back, `P V = (P F) W_v^T`: exact, with `r` terms per score instead of the head size and no keys or values
        materialised."""
        heads, head_dim = self.num_heads, self.head_dim
        query = self._split_heads(self.q_proj(hidden_states))  # (B, H, N, D)
        query = query @ key.grid_weight().view(heads, head_dim, -1)  # (B, H, N, r)
        features = key.grid_features(query.dtype)[:, None].expand(-1, heads, -1, -1)  # (B, H, M, r)
        attn_output, attn_weights = self._attend(query, features, features, attention_mask, **kwargs)  # (B, N, H, r)
        value_weight = value.grid_weight().view(heads, head_dim, -1)  # (H, D, r)
        attn_output = torch.einsum("bnhr,hdr->bnhd", attn_output, value_weight)  # (B, N, H, D)
        return self.o_proj(attn_output.flatten(2)), attn_weights

    def _attends_grid(self, key: FactoredProjection, value) -> bool:
        """Whether `_grid_attention` serves this call: keys and values factored with the positions of a grid shared by
        the batch, whose features are narrower than a head."""
        factored = key.grid is not None and isinstance(value, FactoredProjection)
        return factored and key.grid_width < self.head_dim

    def _shares_query(self, hidden_states: torch.Tensor, key: FactoredProjection) -> bool:
        """Whether `SharedQueryAttention` serves this call: one query for the whole batch (`hidden_states` expanded
        along it), position features shared by the batch, on the sdpa path on the CPU (elsewhere torch's fused kernels
        are kept; see `_matmul_attention`) and without attention dropout."""
        return _batch_shared(hidden_states) and key.positions.dim() == 2 and self._own_cpu_path(hidden_states)

    def _matmul_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Callable | None:
        """On the sdpa path on the CPU, plain batched matmuls beat torch's fused kernel in half precision, and in float32
        where only the query needs a gradient (the fused kernel's backward computes all three); otherwise, and on GPUs,
        the fused kernels (None). Dropout needs the fused kernels. A self-attention whose `(Lq, Lk)` probabilities fit
        in `RecomputedAttention.SCORES_BUDGET` (8 MiB in half precision: the latents' own, never the inputs') keeps
        them for the backward pass, which saves recomputing them there; anything else keeps nothing of that size
        (`RecomputedAttention`)."""
        half = query.dtype in (torch.bfloat16, torch.float16)
        only_query_gradient = query.requires_grad and not (key.requires_grad or value.requires_grad)
        if not ((half or only_query_gradient) and self._own_cpu_path(query)):
            return None
        num_scores = query.shape[:-1].numel() * key.shape[-2]  # B * H * Lq * Lk
        if half and not self.is_cross_attention and num_scores <= RecomputedAttention.SCORES_BUDGET:
            return kept_probabilities_attention_forward
        return recomputed_attention_forward

    def _own_cpu_path(self, tensor: torch.Tensor) -> bool:
        """Whether this call may take one of this module's own attention functions instead of torch's fused kernels:
        the sdpa path, on the CPU (`tensor`'s device), without attention dropout (which needs the fused kernels)."""
        no_dropout = not (self.training and self.attention_dropout > 0)
        return self.config._attn_implementation == "sdpa" and tensor.device.type == "cpu" and no_dropout


# The `hidden_act`s with an in-place form (that of `ACT2FN[name]`), for the feed-forward where autograd keeps no input
IN_PLACE_ACTIVATIONS = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_pytorch_tanh": functools.partial(torch.ops.aten.gelu_, approximate="tanh"),
    "relu": torch.relu_,
    "silu": functools.partial(nn.functional.silu, inplace=True),
}


class PerceiverLiteMLP(nn.Module):
    def __init__(self, config: PerceiverLiteConfig):
        super().__init__()
        ff_dim = config.ff_dim or int(config.dim * config.ff_dim_scale)
        self.fc1 = nn.Linear(config.dim, ff_dim)
        self.hidden_act = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(ff_dim, config.dim)
        self.dropout = nn.Dropout(config.ff_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)  # (B, N, ff_dim)
        return self.dropout(self.fc2(self._activation(hidden_states)))

    def _activation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`act`, in place where autograd does not need its input (inference) and no hook watches it: one
        `(B, N, ff_dim)` tensor less to allocate and write (1-6 % of a float32 inference in the benchmark's scenario A,
        the most where large blocks come fresh from the system)."""
        in_place = IN_PLACE_ACTIVATIONS.get(self.hidden_act)
        needs_input = torch.is_grad_enabled() and hidden_states.requires_grad
        watched = self.act._forward_hooks or self.act._forward_pre_hooks
        if in_place is None or needs_input or watched:
            return self.act(hidden_states)
        return in_place(hidden_states)


class PerceiverLiteLayer(GradientCheckpointingLayer):
    """Optional self-attention, optional cross-attention, then feed-forward; each a residual sublayer with its LayerNorm
    before (`pre_norm`) or after the residual sum.

    The Perceiver's cross-attend layer has only cross-attention, its latent transformer layers only self-attention, and
    the seed's `PerceiverLayer` both.
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
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.self_attention is not None:
            hidden_states = self._sublayer(self.self_attention_norm, self.self_attention, hidden_states, **kwargs)
        if self.cross_attention is not None:
            hidden_states = self._sublayer(
                self.cross_attention_norm, self.cross_attention, hidden_states, key, value, attention_mask, **kwargs
            )
        return self._sublayer(self.mlp_norm, self.mlp, hidden_states)

    def _sublayer(self, norm: nn.LayerNorm, sublayer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        residual = hidden_states
        if self.pre_norm and _batch_shared(hidden_states):  # the latents before their first cross-attend
            hidden_states = norm(hidden_states[:1]).expand_as(hidden_states)
        elif self.pre_norm:
            hidden_states = norm(hidden_states)
        hidden_states = sublayer(hidden_states, *args, **kwargs)
        if isinstance(hidden_states, tuple):  # attention: (output, weights)
            hidden_states = hidden_states[0]
        hidden_states = residual + hidden_states
        return hidden_states if self.pre_norm else norm(hidden_states)


class PerceiverLiteBlock(nn.Module):
    """The seed's `PerceiverBlock`: a cross-attend from the latents to the inputs, then `num_self_attention_layers`
    latent self-attention layers. Running a block again (a repeated index in `layers_indice`) shares its weights."""

    def __init__(self, config: PerceiverLiteConfig, num_self_attention_layers: int):
        super().__init__()
        self.cross_layer = PerceiverLiteLayer(config, self_attention=False, cross_attention=True)
        self.layers = nn.ModuleList(PerceiverLiteLayer(config) for _ in range(num_self_attention_layers))

    def project_inputs(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor | None = None, grid: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor | FactoredProjection, torch.Tensor | FactoredProjection]:
        """The cross-attention's keys and values for `inputs_embeds` (or for its data channels and `positions`, the
        Fourier features of `grid`, see `PerceiverLiteAttention.project_key_value`); the same for every run of this
        block."""
        return self.cross_layer.cross_attention.project_key_value(inputs_embeds, positions, grid)

    def forward(self, latents, key, value, attention_mask=None, **kwargs) -> torch.Tensor:
        latents = self.cross_layer(latents, key, value, attention_mask, **kwargs)
        for layer in self.layers:
            latents = layer(latents, **kwargs)
        return latents


PerceiverBlock = PerceiverLiteBlock


class PerceiverLayer(nn.Module):
    """The seed's `PerceiverLayer`: `depth` x (self-attention on `q`; cross-attention from `q` to the concatenation of
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
        """Errors name the seed's arguments, not the config fields they fill (`dim_head` is the config's `head_dim`)."""
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
        for layer in self.layers:
            key, value = layer.cross_attention.project_key_value(context)
            q = layer(q, key, value, mask)
        return q

    def _check_inputs(self, q, k, v, mask):
        dim = self.config.dim
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, tensor, f"[B, L{name}, {dim}]", ndim=3, floating=True, dtype=self.dtype)
            if tensor.shape[-1] != dim or tensor.shape[0] != q.shape[0]:
                raise ValueError(f"`{name}` must have shape [{q.shape[0]}, L{name}, {dim}], got {list(tensor.shape)}")
        if mask is None:
            return None
        (batch_size, q_len), k_len, v_len = q.shape[:2], k.shape[1], v.shape[1]
        shapes = [(batch_size, k_len + v_len), (batch_size, q_len, k_len + v_len)]
        if k_len == v_len:
            shapes += [(batch_size, k_len), (batch_size, q_len, k_len)]
        _check_mask("mask", mask, shapes)
        if mask.shape[-1] == k_len:
            mask = torch.cat([mask, mask], dim=-1)  # the same positions of k and of v
        return _key_padding_mask(mask)


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
        positions = grid = None
        if inputs_embeds is None:  # the data channels and their position features, never concatenated
            inputs_embeds, positions, attention_mask = self.embeddings.split(inputs, attention_mask)
            grid = tuple(inputs.shape[2:])
        elif attention_mask is not None:
            attention_mask = attention_mask.bool()
        inputs_embeds = inputs_embeds.to(self.dtype)  # as ViT: inputs of any float dtype, computed in the weights' dtype
        positions = positions if positions is None else positions.to(self.dtype)
        if attention_mask is not None:
            attention_mask = _key_padding_mask(attention_mask)  # (B, 1, 1, M)

        latents = self.latents.expand(inputs_embeds.shape[0], -1, -1)  # (B, N, dim), one query for the batch
        checkpointing = self.is_activation_checkpointing and self.training  # checkpoints track only tensor arguments
        key_values = {}
        for step, index in enumerate(self.config.layers_indice):
            block = self.blocks[index]
            if index not in key_values:  # repeats of a block attend to the same keys and values
                key_values[index] = block.project_inputs(inputs_embeds, positions, grid)
            key, value = key_values[index]
            if checkpointing:  # factored projections are not tensor arguments
                attention = block.cross_layer.cross_attention
                key_values[index] = key, value = attention.as_tensor(key), attention.as_tensor(value)
            latents = block(latents, key, value, attention_mask, **kwargs)

        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=latents, pooler_output=latents.mean(dim=1))

    def _check_inputs(self, inputs, attention_mask, inputs_embeds, input_name: str = "inputs", also_accepted: str = ""):
        """Validate before any compute; `input_name` is the caller's name of `inputs` (`pixel_values`, say), and
        `also_accepted` a shape it takes besides the channel-first one (`[B, T]` for one channel, say)."""
        config = self.config
        if (inputs is None) == (inputs_embeds is None):
            raise ValueError(f"Pass exactly one of `{input_name}` and `inputs_embeds`")
        if inputs_embeds is not None:
            expected = f"[B, M, cross_kv_dim={config.cross_kv_dim}]"
            _check_tensor("inputs_embeds", inputs_embeds, expected, ndim=3, floating=True, dtype=self.dtype)
            if inputs_embeds.shape[-1] != config.cross_kv_dim:
                raise ValueError(f"`inputs_embeds` must have shape {expected}, got {list(inputs_embeds.shape)}")
            mask_shapes = [tuple(inputs_embeds.shape[:2])]
        else:
            axes = ", ".join(f"axis{i}" for i in range(config.num_axes))
            expected = f"[B, C={config.data_shape[0]}, {axes}]{also_accepted and ' or ' + also_accepted}"
            expected += f" (data_shape {config.data_shape})"
            _check_tensor(input_name, inputs, expected, ndim=config.num_axes + 2, floating=True, dtype=self.dtype)
            if inputs.shape[1] != config.data_shape[0]:
                raise ValueError(
                    f"`{input_name}` must have shape {expected}, got {list(inputs.shape)}: wrong channel count"
                )
            mask_shapes = [(inputs.shape[0], *inputs.shape[2:]), (inputs.shape[0], math.prod(inputs.shape[2:]))]
        if attention_mask is not None:
            _check_mask("attention_mask", attention_mask, mask_shapes)


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
        """Labels by `config.problem_type`, inferred from their dtype as transformers' loss does when it is None."""
        num_labels, problem_type = self.config.num_labels, self.config.problem_type
        if problem_type is None:
            integer = isinstance(labels, torch.Tensor) and labels.dtype in (torch.long, torch.int)
            problem_type = "regression" if num_labels == 1 else ("single_label_classification" if integer else None)
        if problem_type == "single_label_classification":
            shapes, kind = [(batch_size,), (batch_size, 1)], "torch.long class ids"
        elif problem_type == "regression":
            shapes, kind = [(batch_size, num_labels)] + [(batch_size,)] * (num_labels == 1), "regression targets"
        else:
            shapes, kind = [(batch_size, num_labels)], "multi-hot floats"
        expected = " or ".join(str(list(shape)) for shape in shapes) + f" ({kind})"
        _check_tensor("labels", labels, expected, floating=True if kind == "multi-hot floats" else None)
        if tuple(labels.shape) not in shapes:
            raise ValueError(f"`labels` must have shape {expected}, got {_describe(labels)}")
        if problem_type != "single_label_classification":
            return
        if labels.dtype != torch.long:
            raise TypeError(f"`labels` must be {expected}, got dtype {labels.dtype}; convert them with `.long()`")
        invalid = (labels != -100) & ((labels < 0) | (labels >= num_labels))
        if _has_values(labels) and invalid.any():
            raise ValueError(
                f"`labels` must be class ids in [0, {num_labels - 1}] (or -100 to ignore), "
                f"got {labels[invalid].unique().tolist()}"
            )


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
        _check_tensor("input_ids", input_ids, "[B, T]", ndim=2, floating=False)
        if _has_values(input_ids) and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"`input_ids` must be in [0, vocab_size={self.config.vocab_size}), got values in "
                f"[{input_ids.min().item()}, {input_ids.max().item()}]"
            )
        if attention_mask is not None:
            _check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])
        if labels is not None:
            self._check_labels(labels, len(input_ids))
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
