"""Fast paths of PerceiverLite: exact rewrites of the reference model's math (`modeling_perceiver_lite.py`) that make
the CPU (and, where they apply off it, any device) faster and leaner, with the same parameters and the same results up
to rounding.

Where they run. `fast_plan(module)` is the one decision, taken once per forward of `PerceiverLiteModel` and of
`PerceiverLayer`; it returns a `FastPlan`, or None and the reference runs. The fast paths read the modules' weights
directly, so they run only where that is exactly what the modules would compute:

- `config.use_fast_paths` is True and `config._attn_implementation` is `"sdpa"` (`"eager"` is the reference's own
  math, step by step);
- every projection is a plain `nn.Linear` and every norm a plain `nn.LayerNorm` (not PEFT's LoRA layers, quantised
  or parametrised modules, nor subclasses), with plain `nn.Parameter` weights and biases (none removed) off the meta
  device;
- no module of the model is watched: no forward or backward hooks (accelerate's offloading hooks included) other than
  transformers' output recorders, no global module hooks, and no hidden states or attentions are being recorded;
- the forward is not traced (`torch.export`, `torch.onnx.export`, `torch.compile`, `torch.jit.trace`, `torch.fx`);
- the module's attentions have equal query/key and value widths (`qk_channels == v_channels`, and for the
  cross-attention or the decoder's).

What they do (each is tested against the reference, outputs and gradients, in `tests/test_fast_paths.py`):

- **Inputs never concatenated.** A cross-attention's keys and values are `linear(norm(cat([data, positions])))` with
  `C` data channels and `F >> C` Fourier channels shared by the batch. `norm_and_project_concatenation` computes them
  from the two parts: the position part is one `(M, F)` product for the whole batch, and `(B, M, C + F)` is never
  built. Keys and values are computed once per unique block and reused by its repeats.
- **Cross-attention to grid features.** For the positions of a grid, the keys and values are linear in `r` features
  per input element (`FactoredProjection.grid_features`: data, one-hot grid coordinates scaled by the norm's `rstd`, a
  one); where `r` is below the head size each head attends with `q W_k` to those features directly (`grid_attention`).
- **A query shared by the batch.** The latents before their first cross-attend are one array for every sample: their
  norm runs once, and where the grid features do not apply `SharedQueryAttention` computes the position part of the
  scores once for the batch. The Perceiver IO decoder's learned queries (and the Fourier queries of an unpadded grid)
  are shared too: their norm and query projection run once (`decode`).
- **One product for q, k and v** of the latent self-attention.
- **Attention through plain batched matmuls on the CPU** (`RecomputedAttention`, which keeps nothing of size
  `(Lq, Lk)` for backward, and `kept_probabilities_attention_forward` for the latents' own small scores): faster than
  torch's fused CPU kernel in half precision, and in float32 where only the query needs a gradient. Off the CPU, and
  with attention dropout, torch's fused kernels run (the reference's sdpa path).
- **The feed-forward's activation recomputed in backward** (`RecomputedActivationMLP`): one `(B, N, ff_dim)`
  tensor kept per layer instead of two; in place where autograd keeps no input (inference).
"""

import dataclasses
import functools

import torch
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import output_capturing

from .validation_perceiver_lite import is_tracing


# ---------------------------------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
NORMS = ("kv_norm", "self_attention_norm", "cross_attention_norm", "mlp_norm")


@dataclasses.dataclass(frozen=True)
class FastPlan:
    """What one forward runs. `own_kernels`: this module's matmul attention functions may replace torch's fused
    kernels (on the CPU, without attention dropout); `checkpointing`: layers recompute their activations in backward."""

    own_kernels: bool
    checkpointing: bool


def fast_plan(module: nn.Module, device: torch.device) -> FastPlan | None:
    """The fast paths' plan for a forward of `module` (a `PerceiverLiteModel`, `PerceiverLayer` or
    `PerceiverLiteDecoder`) on `device`, or None where they cannot be exact and the reference must run (see the module
    docstring)."""
    config = module.config
    if not config.use_fast_paths or config._attn_implementation != "sdpa" or is_tracing() or _recording_outputs():
        return None
    modules = list(module.modules())
    if not _equal_head_widths(modules) or _global_hooks() or not all(_plain(child) for child in modules):
        return None
    dropout = module.training and config.attention_dropout > 0
    checkpointing = module.training and torch.is_grad_enabled() and any(
        vars(child).get("gradient_checkpointing", False) for child in modules
    )  # set on the instance by `gradient_checkpointing_enable`
    return FastPlan(own_kernels=device.type == "cpu" and not dropout, checkpointing=checkpointing)


# The checks below run on every module at every forward: they read the modules' own dictionaries (`vars`,
# `_modules`, `_parameters`) rather than `getattr`, whose misses go through `nn.Module.__getattr__`'s exception.


def _equal_head_widths(modules: list[nn.Module]) -> bool:
    """Whether every attention among `modules` has equal query/key and value head widths: the fast paths split, fuse
    and factor keys and values with one head size."""
    return all(vars(child)["head_dim"] == vars(child)["v_head_dim"] for child in modules if "v_head_dim" in vars(child))


def _plain(module: nn.Module) -> bool:
    """Whether the fast paths may read `module`'s weights instead of calling it: its projections and norms are plain
    `nn.Linear` / `nn.LayerNorm` with the weight and bias the model builds (not removed or replaced by `None`), its
    own parameters plain and with values, and no hook watches it."""
    children = module._modules
    for names, plain in ((PROJECTIONS, nn.Linear), (NORMS, nn.LayerNorm)):
        for child in (children.get(name) for name in names):
            if child is not None and (type(child) is not plain or child.weight is None or child.bias is None):
                return False
    if any(p is not None and (type(p) is not nn.Parameter or p.device.type == "meta") for p in module._parameters.values()):
        return False
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    watched = module._backward_hooks or module._backward_pre_hooks or "_hf_hook" in vars(module)
    return not watched and all(getattr(hook, "__module__", None) == output_capturing.__name__ for hook in hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook`) are set."""
    state = torch.nn.modules.module
    return bool(
        state._global_forward_hooks or state._global_forward_pre_hooks or state._global_backward_hooks
        or state._global_backward_pre_hooks
    )  # fmt: skip


def _recording_outputs() -> bool:
    """Whether transformers' `capture_outputs` is collecting hidden states or attentions in this forward: its hooks on
    the layers and attention modules must then see them called."""
    return bool(output_capturing._active_collector.get())


# ---------------------------------------------------------------------------------------------------------------------
# The encoder and its layers
# ---------------------------------------------------------------------------------------------------------------------


def encode(model, plan: FastPlan, inputs, inputs_embeds, attention_mask, padding_mask) -> torch.Tensor:
    """`PerceiverLiteModel`'s latents `(B, N, dim)`, as the reference computes them. `attention_mask` is the flattened
    `(B, M)` boolean mask (or None) and `padding_mask` the reference's `(B, 1, 1, M)` key mask from it."""
    positions = grid = None
    if attention_mask is not None and attention_mask.all():  # no padding: the routes of an unmasked batch
        attention_mask = padding_mask = None
    embeddings = model.embeddings
    if inputs_embeds is None and (embeddings.position_features is None or embeddings.input_projection is not None
                                  or not embeddings.concat_positions):  # fmt: skip
        inputs_embeds = embeddings(inputs, attention_mask)  # learned, added or projected: the module's own inputs
    if inputs_embeds is None:  # the data channels and their Fourier features, never concatenated
        inputs_embeds = inputs.flatten(2).transpose(1, 2)  # (B, M, C)
        positions = embeddings.positions(inputs.shape[2:], attention_mask, inputs.device, inputs.dtype)
        grid = tuple(inputs.shape[2:]) if attention_mask is None else None  # per-sample positions: no shared grid
        positions = positions.to(model.dtype)  # (M, F) or (B, M, F)
    inputs_embeds = inputs_embeds.to(model.dtype)

    latents = model.latents.expand(inputs_embeds.shape[0], -1, -1)  # (B, N, dim), one query for the batch
    key_values = {}
    for step, index in enumerate(model.config.layers_indice):
        block = model.blocks[index]
        if block.cross_layer is not None and index not in key_values:  # repeats attend to the same keys and values
            attention = block.cross_layer.cross_attention
            key_values[index] = project_inputs(attention, inputs_embeds, positions, grid)
            if plan.checkpointing:  # a checkpoint tracks tensor arguments only: no factored projections
                key_values[index] = tuple(as_tensor(attention, p) for p in key_values[index])
        if block.cross_layer is not None:
            key, value = key_values[index]
            latents = run_layer(block.cross_layer, plan, latents, key, value, padding_mask, step == 0)
        for layer in block.layers:
            latents = run_layer(layer, plan, latents)
    return latents


def decode(decoder, plan: FastPlan, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteDecoder`'s layer: its `queries` `(B, Q, decoder_dim)` attend to the final `latents`. Queries shared
    by the batch (learned, or the positions of an unmasked grid: stride 0 along it) are normalised and projected
    once."""
    key, value = project_inputs(decoder.layer.cross_attention, latents)
    shared_query = queries.shape[0] > 1 and queries.stride(0) == 0
    return run_layer(decoder.layer, plan, queries, key, value, None, shared_query)


def perceiver_layer(module, plan: FastPlan, q: torch.Tensor, context: torch.Tensor, padding_mask) -> torch.Tensor:
    """`PerceiverLayer`'s output: each layer attends from `q` to its projections of `context`."""
    for layer in module.layers:
        key, value = project_inputs(layer.cross_attention, context)
        q = run_layer(layer, plan, q, key, value, padding_mask)
    return q


def run_layer(layer, plan: FastPlan, hidden_states, key=None, value=None, padding_mask=None, shared_query=False):
    """`layer_forward`, through the layer's checkpointing function where it recomputes activations in backward."""
    forward = functools.partial(layer_forward, layer, plan, shared_query=shared_query)
    if plan.checkpointing and layer.gradient_checkpointing:
        return layer._gradient_checkpointing_func(forward, hidden_states, key, value, padding_mask)
    return forward(hidden_states, key, value, padding_mask)


def layer_forward(layer, plan: FastPlan, hidden_states, key=None, value=None, padding_mask=None, shared_query=False):
    """`PerceiverLiteLayer.forward` through the fast paths. `shared_query`: `hidden_states` is one array expanded along
    the batch (the latents before their first cross-attend, the decoder's learned queries), so its norm and query
    projection run once."""
    if layer.self_attention is not None:
        attend = functools.partial(self_attention, layer.self_attention, plan)
        hidden_states = layer.sublayer(layer.self_attention_norm, attend, hidden_states)
    if layer.cross_attention is not None:
        norm = layer.cross_attention_norm
        if shared_query and layer.pre_norm:  # post-norm normalises the residual sum, which differs per sample
            norm = shared_norm(norm)
        attend = functools.partial(cross_attention, layer.cross_attention, plan, shared_query=shared_query)
        hidden_states = layer.sublayer(norm, attend, hidden_states, key, value, padding_mask, residual=layer.query_residual)
    if layer.mlp is None:  # the decoder's layer without a feed-forward
        return hidden_states
    return layer.sublayer(layer.mlp_norm, functools.partial(mlp, layer.mlp), hidden_states)


def shared_norm(norm: nn.LayerNorm):
    """`norm` of a batch of copies of one array (stride 0 along the batch), computed once."""
    return lambda hidden_states: norm(hidden_states[:1]).expand_as(hidden_states)


RECOMPUTE_MIN_ELEMENTS = 1 << 19  # fc1 outputs from this size (2 MiB in float32) recompute their activation


def mlp(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteMLP.forward`. Where autograd records it and `fc1`'s output has `RECOMPUTE_MIN_ELEMENTS` or more,
    `RecomputedActivationMLP` keeps one such tensor for backward instead of two (below that the memory is small and
    autograd's own path is the faster); without gradients the activation runs in place: one tensor less to allocate
    and write."""
    parameters = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
    recorded = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (hidden_states, *parameters))
    if recorded and hidden_states.shape[:-1].numel() * module.fc1.out_features < RECOMPUTE_MIN_ELEMENTS:
        return module(hidden_states)
    if recorded:
        dtype = autocast_dtype(hidden_states.device)
        hidden_states = hidden_states if dtype is None else hidden_states.to(dtype)
        return module.dropout(RecomputedActivationMLP.apply(module.activate, dtype, hidden_states, *parameters))
    hidden_states = module.fc1(hidden_states)  # (B, N, ff_dim), or (B, N, 2 ff_dim) gated
    in_place = None if module.gated else in_place_activation(module.act)
    hidden_states = module.activate(hidden_states) if in_place is None else in_place(hidden_states)
    return module.dropout(module.fc2(hidden_states))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts a linear layer's operands to on `device`, or None where it is off there."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def in_place_activation(act: nn.Module):
    """The in-place form of the activation module `act`, where it has one that computes exactly the same, else None."""
    if type(act) is GELUActivation and act.act is nn.functional.gelu:
        return torch.ops.aten.gelu_
    if type(act) is GELUTanh:
        return functools.partial(torch.ops.aten.gelu_, approximate="tanh")
    if type(act) is nn.ReLU:
        return torch.relu_
    if type(act) in (SiLUActivation, nn.SiLU):
        return functools.partial(nn.functional.silu, inplace=True)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def split_heads(attention, states: torch.Tensor) -> torch.Tensor:
    return states.view(*states.shape[:-1], -1, attention.head_dim).transpose(-3, -2)  # (..., H, L, D)


def project_inputs(attention, key_value_states, positions=None, grid=None):
    """A cross-attention's keys and values `(B, H, Lk, D)` from `key_value_states` `(B, Lk, kv_dim)`; reused by every
    call that attends to the same states.

    With `positions` (`(Lk, F)` shared by the batch, the Fourier features of the spatial shape `grid`, or `(B, Lk, F)`)
    `key_value_states` holds only the data channels `(B, Lk, kv_dim - F)`, and the keys and values are those of their
    concatenation, computed without building it (`norm_and_project_concatenation`), as `FactoredProjection`s where the
    attention has an input norm.
    """
    if positions is not None:
        projections = norm_and_project_concatenation(
            key_value_states, positions, attention.kv_norm, [attention.k_proj, attention.v_proj], grid=grid
        )  # without a norm: tensors (B, Lk, H * D)
        return tuple(p if isinstance(p, FactoredProjection) else split_heads(attention, p) for p in projections)
    if attention.kv_norm is not None:
        key_value_states = attention.kv_norm(key_value_states)
    return split_heads(attention, attention.k_proj(key_value_states)), split_heads(attention, attention.v_proj(key_value_states))


def as_tensor(attention, projection) -> torch.Tensor:
    """Keys or values `(B, H, Lk, D)` as a tensor, from a `FactoredProjection` `(B, Lk, H * D)` if need be."""
    if isinstance(projection, FactoredProjection):
        return split_heads(attention, projection.materialize())
    return projection


def self_attention(attention, plan: FastPlan, hidden_states: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteAttention.forward` without keys and values: q, k and v from one product."""
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])  # (3 H D, dim)
    bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
    states = split_heads(attention, nn.functional.linear(hidden_states, weight, bias))  # (B, 3 H, L, D)
    query, key, value = states.chunk(3, dim=1)  # (B, H, L, D) each
    attn_output = attend(attention, plan, query, key, value, None)  # (B, L, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, L, dim)


def cross_attention(attention, plan: FastPlan, hidden_states, key, value, padding_mask, shared_query=False):
    """`PerceiverLiteAttention.forward` to keys and values from `project_inputs`: to grid features where they are
    narrower than a head (`grid_attention`), through `SharedQueryAttention` for a query shared by the batch and
    positions shared by it, else to the materialised keys and values."""
    if isinstance(key, FactoredProjection):
        if key.grid is not None and key.grid_width < attention.head_dim:
            return grid_attention(attention, plan, hidden_states, key, value, padding_mask)
        if shared_query and key.positions.dim() == 2 and plan.own_kernels:
            return shared_query_attention(attention, hidden_states[0], key, as_tensor(attention, value), padding_mask)
    key, value = as_tensor(attention, key), as_tensor(attention, value)
    if shared_query:  # one query for the batch, projected once
        query = split_heads(attention, attention.q_proj(hidden_states[:1])).expand(key.shape[0], -1, -1, -1)
    else:
        query = split_heads(attention, attention.q_proj(hidden_states))  # (B, H, Lq, D)
    attn_output = attend(attention, plan, query, key, value, padding_mask)  # (B, Lq, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, Lq, dim)


KEPT_SCORES_BUDGET = 1 << 22  # the most scores a half-precision self-attention keeps for backward


def attend(attention, plan: FastPlan, query, key, value, padding_mask) -> torch.Tensor:
    """Attention of `query` `(B, H, Lq, D)` to `key` and `value` `(B, H, Lk, D)`: the output `(B, Lq, H, D)`.

    With `plan.own_kernels` (the CPU, no attention dropout), plain batched matmuls beat torch's fused kernel in half
    precision, and in float32 where only the query needs a gradient (the fused kernel's backward computes all three).
    A self-attention whose `(Lq, Lk)` probabilities fit `KEPT_SCORES_BUDGET` (8 MiB in half precision: the latents'
    own, never the inputs') keeps them for backward (`kept_probabilities_attention_forward`); anything else
    keeps nothing of that size (`RecomputedAttention`). Otherwise torch's fused kernels, as the reference's sdpa path.
    """
    half = query.dtype in (torch.bfloat16, torch.float16)
    only_query_gradient = query.requires_grad and not (key.requires_grad or value.requires_grad)
    if plan.own_kernels and half and not attention.is_cross_attention:
        if query.shape[:-1].numel() * key.shape[-2] <= KEPT_SCORES_BUDGET:  # B * H * Lq * Lk
            return kept_probabilities_attention_forward(query * attention.scaling, key, value, padding_mask)
    if plan.own_kernels and (half or only_query_gradient):
        attn_output = RecomputedAttention.apply(query, key, value, padding_mask, attention.scaling)
        return attn_output.transpose(1, 2)  # (B, Lq, H, D)
    dropout = attention.attention_dropout if attention.training else 0.0
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa(attention, query, key, value, padding_mask, dropout=dropout, scaling=attention.scaling)[0]


def kept_probabilities_attention_forward(scaled_query, key, value, padding_mask) -> torch.Tensor:
    """Softmax attention through autograd's batched matmuls, which keeps the probabilities for backward: `(B, Lq, H, D)`."""
    return torch.matmul(attention_probabilities(scaled_query, key, padding_mask), value).transpose(1, 2)


def masked_softmax(scores: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of `scores` with a boolean mask (True = attend), in the scores' dtype. Safe in half
    precision: torch's softmax subtracts the row maximum and accumulates half precision in float32."""
    if padding_mask is not None:
        scores = scores.masked_fill(~padding_mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def attention_probabilities(scaled_query, key, padding_mask) -> torch.Tensor:
    """Softmax attention weights `(..., Lq, Lk)` for queries `(..., Lq, D)`, already scaled (which keeps the product in
    float16's range), and keys `(..., Lk, D)`, in their dtype."""
    return masked_softmax(torch.matmul(scaled_query, key.transpose(-1, -2)), padding_mask)  # (..., Lq, Lk)


def shared_query_attention(attention, hidden_states, key: "FactoredProjection", value, padding_mask) -> torch.Tensor:
    """`cross_attention` for one sample's `hidden_states` `(N, dim)` shared by the batch; see `SharedQueryAttention`."""
    heads, head_dim = attention.num_heads, attention.head_dim
    query = split_heads(attention, attention.q_proj(hidden_states) * attention.scaling)  # (H, N, D)
    weight_data = key.weight_data.view(heads, head_dim, -1)  # (H, D, C + 1)
    weight_positions = key.weight_positions.view(heads, head_dim, -1)  # (H, D, F)
    query_data, query_positions = query @ weight_data, query @ weight_positions  # (H, N, C + 1), (H, N, F)
    data, positions, rstd = (t.to(query_data.dtype) for t in (key.data, key.positions, key.rstd[..., 0]))
    attn_output = SharedQueryAttention.apply(
        query_data, query_positions, data, positions, rstd, key.bias, value, padding_mask
    )  # (B, H, N, D)
    return attention.o_proj(attn_output.transpose(1, 2).flatten(2))  # (B, N, dim)


def grid_attention(attention, plan: FastPlan, hidden_states, key: "FactoredProjection", value: "FactoredProjection",
                   padding_mask) -> torch.Tensor:  # fmt: skip
    """`cross_attention` to keys and values factored from the Fourier features of a grid. Both are linear in the same
    `(B, M, r)` features, `K = F W_k^T` and `V = F W_v^T` (`FactoredProjection.grid_features`, the biases in a column
    of ones), so each head attends with the query `q W_k` to `F` as keys and values and maps the result back,
    `P V = (P F) W_v^T`: exact, with `r` terms per score instead of the head size and no keys or values materialised."""
    heads, head_dim = attention.num_heads, attention.head_dim
    query = split_heads(attention, attention.q_proj(hidden_states))  # (B, H, N, D)
    query = query @ key.grid_weight().view(heads, head_dim, -1)  # (B, H, N, r)
    features = key.grid_features(query.dtype)[:, None].expand(-1, heads, -1, -1)  # (B, H, M, r)
    attn_output = attend(attention, plan, query, features, features, padding_mask)  # (B, N, H, r)
    value_weight = value.grid_weight().view(heads, head_dim, -1)  # (H, D, r)
    attn_output = torch.einsum("bnhr,hdr->bnhd", attn_output, value_weight)  # (B, N, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, N, dim)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd functions and factored projections
# ---------------------------------------------------------------------------------------------------------------------


class RecomputedAttention(torch.autograd.Function):
    """Softmax attention through plain batched matmuls that keeps nothing of size `(Lq, Lk)` for the backward pass: it
    saves the queries, keys and values and recomputes the probabilities there, a block of query rows and samples at a
    time, so its transient memory stays under `SCORES_BUDGET` scores. On the CPU in half precision this is faster than
    torch's fused attention kernel (bfloat16 / float16 matmuls run on the CPU's matrix instructions; the fused kernel's
    blocks do not), at the price of one extra `Q K^T` product in the backward pass. Its backward computes only the
    gradients asked for (the fused kernel's computes all three), which makes it the faster one in float32 too where the
    keys and values need none. The softmax and its gradient stay in the inputs' dtype: torch's CPU kernels accumulate
    half precision in float32."""

    SCORES_BUDGET = 1 << 21  # blocks of this many scores: large products, transients of a few MiB

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


class RecomputedActivationMLP(torch.autograd.Function):
    """`fc2(act(fc1(x)))` that saves `x` and `fc1`'s output for backward and recomputes the activation there: autograd
    would also keep the activation's output, for `fc2`'s weight gradient, one more `(B, N, ff_dim)` tensor per layer
    (the largest the latent layers keep). The activation's gradient is autograd's own, through the module, so any
    activation (a gated one too: `act` is `PerceiverLiteMLP.activate`) gets exactly its gradient. Under autocast
    (`dtype`: its dtype, `x` already cast) the products run in that dtype as autocast's would; the parameters are
    cast again in backward rather than kept in two dtypes, and their gradients come back in their own dtype."""

    @staticmethod
    def forward(ctx, act, dtype, hidden_states, weight_1, bias_1, weight_2, bias_2):
        ctx.act, ctx.dtype = act, dtype
        with torch.autocast(hidden_states.device.type, enabled=False):
            cast_weight_1, cast_bias_1, cast_weight_2, cast_bias_2 = _cast(dtype, weight_1, bias_1, weight_2, bias_2)
            pre_activation = nn.functional.linear(hidden_states, cast_weight_1, cast_bias_1)  # (B, N, fc1 width)
            output = nn.functional.linear(act(pre_activation), cast_weight_2, cast_bias_2)  # (B, N, width)
        ctx.save_for_backward(hidden_states, pre_activation, weight_1, weight_2)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, pre_activation, weight_1, weight_2 = ctx.saved_tensors
        needs_input, needs_weight_1, needs_bias_1, needs_weight_2, needs_bias_2 = ctx.needs_input_grad[2:]
        cast_weight_1, cast_weight_2 = _cast(ctx.dtype, weight_1, weight_2)
        with torch.enable_grad(), torch.autocast(hidden_states.device.type, enabled=False):
            leaf = pre_activation.detach().requires_grad_()
            activation = ctx.act(leaf)  # (B, N, ff_dim), as in forward
        grad_output = grad_output.flatten(0, -2)  # (B N, width)
        grad_weight_2 = grad_output.T @ activation.detach().flatten(0, -2) if needs_weight_2 else None
        grad_bias_2 = grad_output.sum(0) if needs_bias_2 else None
        grad_activation = (grad_output @ cast_weight_2).view_as(activation)  # (B, N, ff_dim)
        (grad_pre,) = torch.autograd.grad(activation, leaf, grad_activation)
        del activation, grad_activation
        grad_pre = grad_pre.flatten(0, -2)  # (B N, ff_dim)
        grad_input = (grad_pre @ cast_weight_1).view_as(hidden_states) if needs_input else None
        grad_weight_1 = grad_pre.T @ hidden_states.flatten(0, -2) if needs_weight_1 else None
        grad_bias_1 = grad_pre.sum(0) if needs_bias_1 else None
        grads = _cast(weight_1.dtype, grad_weight_1, grad_bias_1, grad_weight_2, grad_bias_2)
        return None, None, grad_input, *grads


def _cast(dtype: torch.dtype | None, *tensors):
    """`tensors` (None kept) in `dtype`, or as they are where it is None."""
    return tuple(t if t is None or dtype is None else t.to(dtype) for t in tensors)


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
    grid: tuple[int, ...] | None = None,
) -> list[torch.Tensor] | list[FactoredProjection]:
    """`[linear(norm(cat([data, positions], -1))) for linear in linears]`, exactly, without building the concatenation.

    `data` is `(B, M, C)` and `positions` `(M, F)` (the same for every sample) or `(B, M, F)`. The norm's statistics of
    each row combine those of its two parts (Chan et al.'s parallel mean and variance: each part is centred on its own
    mean, so the result is as stable as LayerNorm's), the norm's scale and shift fold into the weight and bias, and the
    weight splits along its input, `W [x_d, x_p] = W_d x_d + W_p x_p`:

        rstd * [x_d - mean_d, mean_p - mean_d] [W_d, h]^T + rstd * (x_p - mean_p) W_p^T + (W beta + b)

    with `h = (C W_p gamma_p - F W_d gamma_d) 1 / (C + F)`. The position part is one `(M, F)` matmul shared by the batch
    instead of `B` of them, which cuts the FLOPs by about `C / (C + F)` and never materialises `(B, M, C + F)`. With a
    norm the projections come unevaluated, as `FactoredProjection`s, with the spatial shape `grid`
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
    return factors


