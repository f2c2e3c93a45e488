"""Fast paths of PerceiverLite: exact rewrites of the reference model's math (`modeling_perceiver_lite.py`) that read
the same weights, with the same results up to rounding and less time and memory where measured.

Where they run. At the start of a forward, `PerceiverLiteModel`, `PerceiverLayer`, `PerceiverLiteDecoder` and
`PerceiverLiteForCausalLM` call `fast_plan`, the one place where the fast paths are chosen: it returns None, and the
reference runs, unless everything the forward involves is on these allow-lists (anything not listed, a new config field
or module class included, runs the reference):

- config: every field of `PerceiverLiteConfig` has a recorded decision in `CONFIG_DECISIONS` (served, served for some
  values, or irrelevant to the replaced modules); `use_fast_paths=True`; `attn_implementation="sdpa"` (`"eager"` is the
  reference's own math, step by step); equal query/key and value head widths in every attention; `hidden_act` one of
  `SERVED_ACTIVATIONS`;
- modules: every module of the model is exactly (`type(m) is ...`) one of the package's classes marked
  `@served_by_fast_paths` or `nn.Linear`, `nn.LayerNorm`, `nn.Dropout`, `nn.ModuleList`, `nn.Embedding` (without the
  options that change its gradient: `padding_idx`, `max_norm`, `scale_grad_by_freq`, `sparse`) or a served
  activation, with no `forward` of its own instance; projections and norms with their weight and bias, plain `nn.Parameter`s off the
  meta device, all of one dtype (so not PEFT's LoRA layers, quantised, parametrised or subclassed modules);
- no hook: no forward or backward hooks on any module (accelerate's offloading hooks included) other than
  transformers' output recorders, no global module hooks; no hidden states or attentions requested; no keyword
  argument to the forward other than `output_attentions=False` / `output_hidden_states=False`; no tracing
  (`torch.export`, `torch.onnx.export`, `torch.compile`, `torch.jit.trace`, `torch.fx`);
- device and dtype (`DEVICES`, `DTYPES`): the CPU; a CUDA device only where the GPU benchmarks show the fast paths
  faster (`faster_on_cuda`); weights, or autocast, in float32 or bfloat16.

What they do (each tested against the reference, outputs and gradients, in `tests/test_fast_paths.py`); a `FastPlan`
records which of these each layer of the forward runs, and the functions below execute it:

- **Inputs never concatenated** (`FastPlan.factored_inputs`). A cross-attention's keys and values are
  `linear(norm(cat([data, positions])))` with `C` data channels and `F >> C` Fourier channels shared by the batch.
  `norm_and_project_concatenation` computes them from the two parts: the position part is one `(M, F)` product for
  the whole batch, and `(B, M, C + F)` is never built. Keys and values are computed once per unique block.
- **Cross-attention to grid features** (`KeyValues.GRID`). For the positions of a grid, the keys and values are linear
  in `r` features per input element (`FactoredProjection.grid_features`); where `r` is below the head size each head
  attends with `q W_k` to those features directly (`grid_attention`).
- **A query shared by the batch** (`LayerRoute.shared_query`, `KeyValues.SHARED_QUERY`). The latents before their
  first cross-attend are one array for every sample: their norm and query projection run once, and
  `SharedQueryAttention` computes the position part of the scores once for the batch. The decoder's learned queries
  (and the Fourier queries of an unpadded grid) are shared too.
- **One product for q, k and v** of the latent self-attention.
- **Attention kernels** (`Kernel`): torch's fused kernels (the reference's sdpa path); `RecomputedAttention`, plain
  batched matmuls that keep nothing of size `(Lq, Lk)` for backward; `kept_probabilities_attention_forward` for the
  latents' own small scores in half precision, and for every attention with attention dropout in training on the CPU
  (torch's kernel is then its math path: the same products and dropout draw, with more passes over the scores).
- **Feed-forward** (`FeedForward`): the module; `RecomputedActivationMLP`, which keeps one `(B, N, ff_dim)` tensor for
  backward instead of two; the activation in place where autograd records nothing.
- **Gradient checkpointing** (`FastPlan.checkpointing`): each layer through its checkpointing function.
- **Per-token tables** (`FastPlan.token_tables`, the causal language model). The cross-attentions' keys and values of
  the context are functions of each position's token alone: `token_key_values` projects the whole vocabulary once and
  gathers, where the forward's new tokens (batch x length) are at least the vocabulary; not under gradient
  checkpointing. The rest of the model runs its reference modules.
"""

import dataclasses
import enum
import functools
import math

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.activations import GELUActivation, GELUTanh, SiLUActivation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import output_capturing

from .validation_perceiver_lite import is_tracing


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


class Kernel(enum.Enum):
    """How an attention computes `softmax(q k^T) v` (`attend`)."""

    SDPA = "sdpa"  # torch's fused kernels, as the reference's sdpa path
    RECOMPUTED = "recomputed"  # RecomputedAttention
    KEPT = "kept probabilities"  # kept_probabilities_attention_forward


class KeyValues(enum.Enum):
    """The form of a cross-attention's keys and values (`cross_attention`)."""

    TENSORS = "tensors"  # (B, H, Lk, D), materialised
    GRID = "grid features"  # grid_attention
    SHARED_QUERY = "shared query"  # SharedQueryAttention on the factored keys


class FeedForward(enum.Enum):
    """How a feed-forward runs (`mlp`)."""

    MODULE = "module"
    RECOMPUTED = "recomputed activation"  # RecomputedActivationMLP
    IN_PLACE = "in place"  # the activation in place: autograd records nothing


@dataclasses.dataclass(frozen=True)
class LayerRoute:
    """What one `PerceiverLiteLayer` runs: its self-attention's kernel, its cross-attention's keys and values and
    kernel, whether the cross-attention's query is one array for the batch (projected once; `shared_norm`: normalised
    once too, pre-norm: post-norm normalises the residual sum, which differs per sample), and its feed-forward; None for
    a part the layer does not have."""

    self_attention: Kernel | None = None
    key_values: KeyValues | None = None
    cross_attention: Kernel | None = None
    shared_query: bool = False
    shared_norm: bool = False
    feed_forward: FeedForward | None = None


@dataclasses.dataclass(frozen=True)
class FastPlan:
    """Every route of one forward, decided by `fast_plan`.

    `cross_layers`: the route of each cross-attending layer in the order they run (the encoder's per entry of
    `layers_indice`, None where that block does not cross-attend; the decoder's layer; `PerceiverLayer`'s layers);
    `latent_layer`: the encoder's latent self-attention layers; `factored_inputs`: the encoder's data and Fourier
    positions are projected apart, never concatenated; `padded`: the key padding mask hides some input (else it is
    dropped); `checkpointing`: every layer recomputes its activations in backward; `autocast`: the dtype autocast
    casts products to, or None; `token_tables`: the causal language model's cross-attentions take the keys and
    values of the context's tokens from per-token tables (`token_key_values`)."""

    cross_layers: tuple[LayerRoute | None, ...]
    latent_layer: LayerRoute | None = None
    factored_inputs: bool = False
    padded: bool = False
    checkpointing: bool = False
    autocast: torch.dtype | None = None
    token_tables: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# The allow-lists
# ---------------------------------------------------------------------------------------------------------------------

SERVED, IRRELEVANT = "served", "irrelevant"


def _equal_head_widths(config) -> bool:
    """Every attention splits, fuses and factors its keys and values with one head size."""
    return all(len(set(config.attention_channels(kind)[1:])) == 1 for kind in ("self", "cross", "decoder"))


SERVED_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "silu", "swish")

# Every field of `PerceiverLiteConfig`: SERVED (every valid value runs the fast paths, tested against the reference),
# IRRELEVANT (read only outside the modules the fast paths replace: heads, initialisation), or a function of the
# config that says for which values the fast paths serve (the reference runs for the others).
CONFIG_DECISIONS = {
    "data_shape": SERVED,
    "cross_heads": SERVED,
    "num_latent_tokens": SERVED,
    "dim": SERVED,
    "heads": SERVED,
    "layers_indice": SERVED,
    "num_latent_transformers_in_layers": SERVED,
    "num_bands": SERVED,
    "resolution": SERVED,
    "frequency_base": SERVED,
    "pre_norm": SERVED,
    "ff_dim": SERVED,
    "ff_dim_scale": SERVED,
    "ff_dropout": SERVED,
    "attention_dropout": SERVED,
    "cross_kv_dim": SERVED,
    "head_dim": SERVED,
    "vocab_size": IRRELEVANT,
    "hidden_act": lambda config: config.hidden_act in SERVED_ACTIVATIONS,
    "layer_norm_eps": SERVED,
    "initializer_range": IRRELEVANT,
    "use_fast_paths": lambda config: config.use_fast_paths,
    "cross_attend_blocks": SERVED,
    "qk_channels": _equal_head_widths,
    "v_channels": _equal_head_widths,
    "cross_qk_channels": _equal_head_widths,
    "cross_v_channels": _equal_head_widths,
    "cross_ff_dim": SERVED,
    "cross_attention_query_residual": SERVED,
    "input_projection_dim": SERVED,
    "position_encoding_type": SERVED,
    "position_dim": SERVED,
    "concat_positions": SERVED,
    "decoder_dim": SERVED,
    "decoder_heads": SERVED,
    "decoder_qk_channels": _equal_head_widths,
    "decoder_v_channels": _equal_head_widths,
    "decoder_ff_dim_scale": SERVED,
    "decoder_query_residual": SERVED,
    "decoder_query_type": SERVED,
    "decoder_query_inputs": SERVED,
    "classifier_pooling": SERVED,
    "tie_word_embeddings": IRRELEVANT,
    "latent_initializer_range": IRRELEVANT,
    "gated_feed_forward": SERVED,
    "sparse_prediction": SERVED,
    "prefix_dropout": SERVED,
    "rope_theta": SERVED,
}


@functools.cache
def config_fields(config_class: type) -> tuple[str, ...]:
    """The fields a config class adds to transformers' `PreTrainedConfig`: those `CONFIG_DECISIONS` must cover."""
    inherited = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return tuple(field.name for field in dataclasses.fields(config_class) if field.name not in inherited)


@functools.cache
def value_decisions(config_class: type) -> tuple | None:
    """The distinct functions among the decisions on `config_class`'s fields (`_equal_head_widths` decides six fields:
    it runs once per forward, not six times), or None where a field has no decision."""
    decisions = [CONFIG_DECISIONS.get(name) for name in config_fields(config_class)]
    if None in decisions:
        return None
    return tuple(dict.fromkeys(decision for decision in decisions if decision not in (SERVED, IRRELEVANT)))


def _config_served(config) -> bool:
    decisions = value_decisions(type(config))
    return config._attn_implementation == "sdpa" and decisions is not None and all(
        decision(config) for decision in decisions)  # fmt: skip


SERVED_MODULES = {nn.Linear, nn.LayerNorm, nn.Dropout, nn.ModuleList, nn.Embedding}


def served_by_fast_paths(module_class: type) -> type:
    """Class decorator: the fast paths were proven exact for modules of exactly this class (not its subclasses)."""
    SERVED_MODULES.add(module_class)
    return module_class


def in_place_activation(act: nn.Module):
    """The in-place form of the activation module `act`, where it is a served activation (the same values as the
    module), else None."""
    if type(act) is GELUActivation and act.act is nn.functional.gelu:
        return torch.ops.aten.gelu_
    if type(act) is GELUTanh:
        return functools.partial(torch.ops.aten.gelu_, approximate="tanh")
    if type(act) is nn.ReLU:
        return torch.relu_
    if type(act) in (SiLUActivation, nn.SiLU):
        return functools.partial(nn.functional.silu, inplace=True)
    return None


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
NORMS = ("kv_norm", "self_attention_norm", "cross_attention_norm", "mlp_norm")
RECORDED_KWARGS = ("output_attentions", "output_hidden_states")


def _module_served(module: nn.Module) -> bool:
    """`module` is of a served class, computes as its class does (no instance `forward`, projections and norms with
    their weight and bias), and no hook watches it. Read from the module's own dictionaries (`vars`, `_modules`):
    `getattr`'s misses go through `nn.Module.__getattr__`'s exception, at every module of every forward."""
    own = vars(module)
    if (type(module) not in SERVED_MODULES and in_place_activation(module) is None) or "forward" in own:
        return False
    children = module._modules
    for names, plain in ((PROJECTIONS, nn.Linear), (NORMS, nn.LayerNorm)) if children else ():
        for child in (children.get(name) for name in names):
            if child is not None and (type(child) is not plain or child.weight is None or child.bias is None):
                return False
    if module._backward_hooks or module._backward_pre_hooks or "_hf_hook" in own:
        return False
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return all(getattr(hook, "__module__", None) == output_capturing.__name__ for hook in hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook`) are set."""
    state = torch.nn.modules.module
    return bool(
        state._global_forward_hooks or state._global_forward_pre_hooks or state._global_backward_hooks
        or state._global_backward_pre_hooks
    )  # fmt: skip


DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.bfloat16)
OWN_KERNEL_DEVICES = ("cpu",)  # where the matmul kernels replace torch's fused ones (see `Kernel`)
CUDA_MIN_INPUT_ELEMENTS = 32 * 224 * 224  # batch x input elements of the GPU run where the fast paths are faster


def faster_on_cuda(module: nn.Module, dtype: torch.dtype, needs_grad: bool, input_elements: int) -> bool:
    """Whether the fast paths serve a forward of `module` on a CUDA device, computing in `dtype`, recorded by autograd
    where `needs_grad`, over `input_elements` (batch x inputs): where the GPU benchmarks (scenario A, H200; see
    docs/design.md, "Fast paths off the CPU") show them faster than the reference. That is the encoder with inputs as
    large as 32 images of 224 x 224 (`benchmark-cuda-224.md`), in bfloat16, or in float32 without gradients; not
    float32 training (`benchmark-cuda-224.md`: slower), not smaller inputs (`benchmark-cuda.md`, 8 images of 64 x 64:
    slower in every dtype), not the decoder, `PerceiverLayer` or the causal language model (no GPU row shows them
    faster)."""
    if "latents" not in module._parameters or input_elements < CUDA_MIN_INPUT_ELEMENTS:
        return False
    return dtype is torch.bfloat16 or not needs_grad


# ---------------------------------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------------------------------


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts a linear layer's operands to on `device`, or None where it is off there."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def fast_plan(module: nn.Module, inputs: torch.Tensor, attention_mask=None, queries=None, embedded=False, kwargs=None):
    """The `FastPlan` of a forward of `module`, or None where the fast paths cannot serve it (see the module
    docstring) and the reference must run. `module` is a `PerceiverLiteModel` (`inputs` `(B, C, *axes)`, or
    `(B, M, cross_kv_dim)` where `embedded`; `attention_mask` `(B, M)` boolean or None), a `PerceiverLayer` (`queries`
    its `q`, `inputs` its context, `attention_mask` its key padding mask) or a `PerceiverLiteDecoder` (`queries` its
    queries, `inputs` the latents). `kwargs`: the forward's other keyword arguments."""
    config, device = module.config, inputs.device
    kwargs = kwargs or {}
    if (
        is_tracing() or device.type not in DEVICES or not _config_served(config) or _global_hooks()
        or any(name not in RECORDED_KWARGS for name in kwargs)
        or any(kwargs.get(name, getattr(config, name, False)) for name in RECORDED_KWARGS)  # hooks record them
    ):  # fmt: skip
        return None
    parameters, checkpointing = [], set()
    for child in module.modules():
        if not _module_served(child):
            return None
        parameters += [p for p in child._parameters.values() if p is not None]
        if isinstance(child, GradientCheckpointingLayer):  # switched by `gradient_checkpointing_enable`
            checkpointing.add(child.gradient_checkpointing)
    weights_dtype = {p.dtype for p in parameters}
    if len(weights_dtype) != 1 or any(type(p) is not nn.Parameter or p.device.type == "meta" for p in parameters):
        return None
    autocast = autocast_dtype(device)
    dtype = autocast or weights_dtype.pop()
    tensors = [inputs] if queries is None else [inputs, queries]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*tensors, *parameters])
    if dtype not in DTYPES:
        return None
    grid_inputs = "blocks" in module._modules and not embedded  # (B, C, *axes)
    input_elements = len(inputs) * (math.prod(inputs.shape[2:]) if grid_inputs else inputs.shape[1])
    if device.type == "cuda" and not faster_on_cuda(module, dtype, needs_grad, input_elements):
        return None
    if len(checkpointing) > 1:  # some layers only: not a state the fast paths were proven in
        return None
    checkpointing = module.training and torch.is_grad_enabled() and checkpointing == {True}
    dropout = module.training and config.attention_dropout > 0
    own_kernels = device.type in OWN_KERNEL_DEVICES and not dropout
    kept_dropout = device.type in OWN_KERNEL_DEVICES and dropout
    routes = _Routes(module, own_kernels, kept_dropout, dtype != torch.float32, needs_grad, checkpointing)
    if "lm_head" in module._modules:
        return routes.causal_lm(inputs, autocast)
    if "blocks" in module._modules:
        return routes.encoder(inputs, attention_mask, embedded, autocast)
    if "layers" in module._modules:
        return routes.perceiver_layer(queries, inputs, autocast)
    return routes.decoder(queries, inputs, autocast)


RECOMPUTE_MIN_ELEMENTS = 1 << 19  # fc1 outputs from this size (2 MiB in float32) recompute their activation
KEPT_SCORES_BUDGET = 1 << 22  # the most scores a half-precision self-attention keeps for backward


@dataclasses.dataclass
class _Routes:
    """The routes of each kind of layer, for `fast_plan`: `own_kernels` (the matmul kernels may replace torch's fused
    ones: on the CPU, without attention dropout), `kept_dropout` (attention dropout in training on the CPU: every
    attention keeps its probabilities), `half` (products in half precision), `needs_grad` (autograd records the
    forward), `checkpointing`."""

    module: nn.Module
    own_kernels: bool
    kept_dropout: bool
    half: bool
    needs_grad: bool
    checkpointing: bool

    def kernel(self, attention, scores: int, keys_need_grad: bool) -> Kernel:
        """With attention dropout in training on the CPU, kept probabilities: torch's fused kernel does not take
        dropout there, and its math path computes the same products and draw with more passes over the scores (a
        masked-row check, two scalings). With the matmul kernels: for a self-attention in half precision whose
        `scores` `(B H Lq Lk)` fit `KEPT_SCORES_BUDGET` (8 MiB: the latents' own, never the inputs'), kept
        probabilities; in half precision (bfloat16 / float16 matmuls run on the CPU's matrix instructions, the fused
        kernel's blocks do not), or where only the query needs a gradient (the fused kernel's backward computes all
        three), `RecomputedAttention`. Otherwise torch's fused kernels."""
        if self.kept_dropout:
            return Kernel.KEPT
        if not self.own_kernels:
            return Kernel.SDPA
        if self.half and not attention.is_cross_attention and scores <= KEPT_SCORES_BUDGET:
            return Kernel.KEPT
        if self.half or (self.needs_grad and not keys_need_grad):
            return Kernel.RECOMPUTED
        return Kernel.SDPA

    def feed_forward(self, mlp, rows: int) -> FeedForward | None:
        """Without autograd, the activation in place (not gated: the gate multiplies it); with autograd, where `fc1`'s
        output has `RECOMPUTE_MIN_ELEMENTS` or more, `RecomputedActivationMLP` (below that the memory is small and
        autograd's own path is the faster); else the module."""
        if mlp is None:
            return None
        if not self.needs_grad:
            return FeedForward.MODULE if mlp.gated else FeedForward.IN_PLACE
        return FeedForward.RECOMPUTED if rows * mlp.fc1.out_features >= RECOMPUTE_MIN_ELEMENTS else FeedForward.MODULE

    def layer(self, layer, batch_size, length, keys, key_values=None, keys_need_grad=True, shared_query=False):
        """The route of `layer` for `batch_size` samples of `length` queries attending to `keys` keys each."""
        rows, self_kernel, cross_kernel = batch_size * length, None, None
        if layer.self_attention is not None:
            self_kernel = self.kernel(layer.self_attention, rows * layer.self_attention.num_heads * length, True)
        if layer.cross_attention is not None:
            attention = layer.cross_attention
            cross_kernel = self.kernel(attention, rows * attention.num_heads * keys, keys_need_grad)
            key_values = key_values or KeyValues.TENSORS
        feed_forward = self.feed_forward(layer.mlp, rows)
        return LayerRoute(self_kernel, key_values, cross_kernel, shared_query, shared_query and layer.pre_norm, feed_forward)

    def keys_need_grad(self, attention, inputs: torch.Tensor, *modules) -> bool:
        """Whether a cross-attention's keys and values of `inputs` need a gradient: the inputs do, or a parameter of
        the attention's key path or of `modules` (those that compute the inputs) does."""
        parameters = [attention.k_proj, attention.v_proj, attention.kv_norm, *modules]
        return self.needs_grad and (inputs.requires_grad or any(
            p.requires_grad for module in parameters if module is not None for p in module.parameters()))  # fmt: skip

    def encoder(self, inputs, attention_mask, embedded: bool, autocast) -> FastPlan:
        """The encoder's plan: its data and Fourier positions projected apart where nothing else joins them (no
        `inputs_embeds`, no input projection, positions concatenated); for each cross-attend, keys and values as grid
        features where those are narrower than a head, else through `SharedQueryAttention` for the first one (the
        latents shared by the batch) with the matmul kernels, else as tensors (always under checkpointing: a checkpoint
        tracks tensor arguments only); the latents' and each layer's kernels and feed-forward."""
        model, config = self.module, self.module.config
        embeddings = model.embeddings
        padded = attention_mask is not None and not bool(attention_mask.all())
        factored = not embedded and embeddings.input_projection is None and embeddings.concat_positions and (
            embeddings.position_features is not None)  # fmt: skip
        grid = None if embedded or padded else tuple(inputs.shape[2:])
        batch_size, num_latents = len(inputs), config.num_latent_tokens
        num_inputs = inputs.shape[1] if embedded else math.prod(inputs.shape[2:])
        cross_layers = []
        for step, index in enumerate(config.layers_indice):
            layer = model.blocks[index].cross_layer
            if layer is None:
                cross_layers.append(None)
                continue
            attention = layer.cross_attention
            key_values, shared_query = KeyValues.TENSORS, step == 0
            keys_need_grad = self.keys_need_grad(attention, inputs, *([] if factored else [embeddings]))
            if factored and attention.kv_norm is not None and not self.checkpointing and grid is not None:
                if grid_width(config.data_shape[0], grid) < attention.head_dim:
                    key_values, keys_need_grad = KeyValues.GRID, self.needs_grad and inputs.requires_grad
                elif shared_query and self.own_kernels:
                    key_values = KeyValues.SHARED_QUERY
            route = self.layer(layer, batch_size, num_latents, num_inputs, key_values, keys_need_grad, shared_query)
            cross_layers.append(route)
        latent_layers = [layer for block in model.blocks for layer in block.layers]
        latent_layer = self.layer(latent_layers[0], batch_size, num_latents, num_latents) if latent_layers else None
        return FastPlan(tuple(cross_layers), latent_layer, factored, padded, self.checkpointing, autocast)

    def perceiver_layer(self, queries, context, autocast) -> FastPlan:
        """`PerceiverLayer`'s plan: each of its layers attends from the queries to its projections of the context."""
        layer = self.module.layers[0]
        keys_need_grad = self.keys_need_grad(layer.cross_attention, context)
        route = self.layer(layer, *queries.shape[:2], context.shape[1], keys_need_grad=keys_need_grad)
        return FastPlan((route,) * len(self.module.layers), checkpointing=self.checkpointing, autocast=autocast)

    def causal_lm(self, input_ids, autocast) -> FastPlan | None:
        """The causal language model's plan: the cross-attentions' keys and values from per-token tables where the
        forward's new tokens (batch x length) are at least the vocabulary, so that projecting every token of the
        vocabulary costs no more than projecting the context (a generation step's one new token runs the reference);
        not under checkpointing (the reference checkpoints each layer with its inputs), nor where the embedding's
        options change its gradient (`padding_idx`, `max_norm`, `scale_grad_by_freq`, `sparse`)."""
        embeddings = self.module.embeddings
        plain = embeddings.padding_idx is None and embeddings.max_norm is None and not (
            embeddings.scale_grad_by_freq or embeddings.sparse)  # fmt: skip
        if self.checkpointing or not plain or input_ids.numel() < embeddings.num_embeddings:
            return None
        return FastPlan((), token_tables=True, autocast=autocast)

    def decoder(self, queries, latents, autocast) -> FastPlan:
        """The decoder's plan: its queries are normalised and projected once where they are one array for the batch
        (stride 0 along it: learned queries, or the Fourier positions of an unpadded grid)."""
        layer = self.module.layer
        shared_query = queries.shape[0] > 1 and queries.stride(0) == 0
        keys_need_grad = self.keys_need_grad(layer.cross_attention, latents)
        route = self.layer(layer, *queries.shape[:2], latents.shape[1], None, keys_need_grad, shared_query)
        return FastPlan((route,), checkpointing=self.checkpointing, autocast=autocast)


# ---------------------------------------------------------------------------------------------------------------------
# The encoder and its layers
# ---------------------------------------------------------------------------------------------------------------------


def encode(model, plan: FastPlan, inputs, inputs_embeds, attention_mask, padding_mask) -> torch.Tensor:
    """`PerceiverLiteModel`'s latents `(B, N, dim)`, as the reference computes them. `attention_mask` is the flattened
    `(B, M)` boolean mask (or None) and `padding_mask` the reference's `(B, 1, 1, M)` key mask from it."""
    positions = grid = None
    if not plan.padded:
        attention_mask = padding_mask = None
    embeddings = model.embeddings
    if plan.factored_inputs:  # the data channels and their Fourier features, never concatenated
        inputs_embeds = inputs.flatten(2).transpose(1, 2)  # (B, M, C)
        positions = embeddings.positions(inputs.shape[2:], attention_mask, inputs.device, inputs.dtype)
        grid = None if plan.padded else tuple(inputs.shape[2:])  # per-sample positions: no shared grid
        positions = positions.to(model.dtype)  # (M, F) or (B, M, F)
    elif inputs_embeds is None:
        inputs_embeds = embeddings(inputs, attention_mask)  # learned, added or projected: the module's own inputs
    inputs_embeds = inputs_embeds.to(model.dtype)

    latents = model.latents.expand(inputs_embeds.shape[0], -1, -1)  # (B, N, dim), one query for the batch
    key_values = {}
    for index, route in zip(model.config.layers_indice, plan.cross_layers):
        block = model.blocks[index]
        if route is not None:
            attention = block.cross_layer.cross_attention
            if index not in key_values:  # repeats attend to the same keys and values
                key_values[index] = project_inputs(attention, inputs_embeds, positions, grid)
            key, value = key_values[index]
            if route.key_values is KeyValues.TENSORS:
                key, value = as_tensor(attention, key), as_tensor(attention, value)
            latents = run_layer(block.cross_layer, plan, route, latents, key, value, padding_mask)
        for layer in block.layers:
            latents = run_layer(layer, plan, plan.latent_layer, latents)
    return latents


def decode(decoder, plan: FastPlan, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteDecoder`'s layer: its `queries` `(B, Q, decoder_dim)` attend to the final `latents`."""
    key, value = project_inputs(decoder.layer.cross_attention, latents)
    return run_layer(decoder.layer, plan, plan.cross_layers[0], queries, key, value)


def perceiver_layer(module, plan: FastPlan, q: torch.Tensor, context: torch.Tensor, padding_mask) -> torch.Tensor:
    """`PerceiverLayer`'s output: each layer attends from `q` to its projections of `context`."""
    for layer, route in zip(module.layers, plan.cross_layers):
        key, value = project_inputs(layer.cross_attention, context)
        q = run_layer(layer, plan, route, q, key, value, padding_mask)
    return q


def token_key_values(attention, embeddings: nn.Embedding, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values `(B, H, L, D)` of a causal cross-attention to the context `token_ids` `(B, L)`, unrotated.
    They are `k_proj(kv_norm(E[x]))` and `v_proj(kv_norm(E[x]))`, functions of each position's token alone (the rotary
    positions turn the keys later), so they are the rows of two `(V, H * D)` tables of the whole vocabulary, gathered:
    `V` rows of norm and projections instead of `B * L` (2,048 bytes of context against 262 tokens), and in backward
    the rows' gradients summed per token before the products."""
    table = embeddings.weight  # (V, E)
    if attention.kv_norm is not None:
        table = attention.kv_norm(table)
    key = nn.functional.embedding(token_ids, attention.k_proj(table))  # (B, L, H * D)
    value = nn.functional.embedding(token_ids, attention.v_proj(table))  # (B, L, H * D)
    return split_heads(attention, key), split_heads(attention, value)


def causal_cross_layer(layer, hidden_states, key, value, attention_mask, rotary, cache_update) -> torch.Tensor:
    """`PerceiverLiteCausalLayer.forward` of a cross-attend layer, to the projected `key` and `value` of
    `token_key_values`: the same sublayers, with `PerceiverLiteAttention.attend` after the projections."""
    attention = layer.cross_attention

    def attend(queries):
        return attention.attend(queries, key, value, attention_mask, cache_update, rotary)

    hidden_states = layer.sublayer(layer.cross_attention_norm, attend, hidden_states, residual=layer.query_residual)
    return hidden_states if layer.mlp is None else layer.sublayer(layer.mlp_norm, layer.mlp, hidden_states)


def run_layer(layer, plan: FastPlan, route: LayerRoute, hidden_states, key=None, value=None, padding_mask=None):
    """`layer_forward`, through the layer's checkpointing function where the plan checkpoints."""
    forward = functools.partial(layer_forward, layer, plan, route)
    if plan.checkpointing:
        return layer._gradient_checkpointing_func(forward, hidden_states, key, value, padding_mask)
    return forward(hidden_states, key, value, padding_mask)


def layer_forward(layer, plan: FastPlan, route: LayerRoute, hidden_states, key=None, value=None, padding_mask=None):
    """`PerceiverLiteLayer.forward` along `route`."""
    if route.self_attention is not None:
        attend = functools.partial(self_attention, layer.self_attention, route.self_attention)
        hidden_states = layer.sublayer(layer.self_attention_norm, attend, hidden_states)
    if route.key_values is not None:
        norm = shared_norm(layer.cross_attention_norm) if route.shared_norm else layer.cross_attention_norm
        attend = functools.partial(cross_attention, layer.cross_attention, route)
        hidden_states = layer.sublayer(norm, attend, hidden_states, key, value, padding_mask, residual=layer.query_residual)
    if route.feed_forward is None:  # the decoder's layer without a feed-forward
        return hidden_states
    return layer.sublayer(layer.mlp_norm, functools.partial(mlp, layer.mlp, route.feed_forward, plan.autocast), hidden_states)


def shared_norm(norm: nn.LayerNorm):
    """`norm` of a batch of copies of one array (stride 0 along the batch), computed once."""
    return lambda hidden_states: norm(hidden_states[:1]).expand_as(hidden_states)


def mlp(module, route: FeedForward, autocast: torch.dtype | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteMLP.forward` along `route` (see `FeedForward`); `autocast`: the dtype autocast casts to, if on."""
    if route is FeedForward.MODULE:
        return module(hidden_states)
    if route is FeedForward.RECOMPUTED:
        hidden_states = hidden_states if autocast is None else hidden_states.to(autocast)
        parameters = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
        return module.dropout(RecomputedActivationMLP.apply(module.activate, autocast, hidden_states, *parameters))
    hidden_states = module.fc1(hidden_states)  # (B, N, ff_dim)
    return module.dropout(module.fc2(in_place_activation(module.act)(hidden_states)))


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


def self_attention(attention, kernel: Kernel, hidden_states: torch.Tensor) -> torch.Tensor:
    """`PerceiverLiteAttention.forward` without keys and values: q, k and v from one product."""
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])  # (3 H D, dim)
    bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
    states = split_heads(attention, nn.functional.linear(hidden_states, weight, bias))  # (B, 3 H, L, D)
    query, key, value = states.chunk(3, dim=1)  # (B, H, L, D) each
    attn_output = attend(attention, kernel, query, key, value, None)  # (B, L, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, L, dim)


def cross_attention(attention, route: LayerRoute, hidden_states, key, value, padding_mask):
    """`PerceiverLiteAttention.forward` to keys and values from `project_inputs`, along `route`: to grid features
    (`grid_attention`), through `SharedQueryAttention`, or to the keys and values as tensors, from a query projected
    once where it is shared by the batch."""
    if route.key_values is KeyValues.GRID:
        return grid_attention(attention, route.cross_attention, hidden_states, key, value, padding_mask)
    if route.key_values is KeyValues.SHARED_QUERY:
        return shared_query_attention(attention, hidden_states[0], key, as_tensor(attention, value), padding_mask)
    if route.shared_query:  # one query for the batch, projected once
        query = split_heads(attention, attention.q_proj(hidden_states[:1]))  # (1, H, Lq, D)
        query = query.expand(key.shape[0], -1, -1, -1)  # (B, H, Lq, D), a view
    else:
        query = split_heads(attention, attention.q_proj(hidden_states))  # (B, H, Lq, D)
    attn_output = attend(attention, route.cross_attention, query, key, value, padding_mask)  # (B, Lq, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, Lq, dim)


def attend(attention, kernel: Kernel, query, key, value, padding_mask) -> torch.Tensor:
    """Attention of `query` `(B, H, Lq, D)` to `key` and `value` `(B, H, Lk, D)` through `kernel`: `(B, Lq, H, D)`."""
    dropout = attention.attention_dropout if attention.training else 0.0
    if kernel is Kernel.KEPT:
        return kept_probabilities_attention_forward(query * attention.scaling, key, value, padding_mask, dropout)
    if kernel is Kernel.RECOMPUTED:
        attn_output = RecomputedAttention.apply(query, key, value, padding_mask, attention.scaling)
        return attn_output.transpose(1, 2)  # (B, Lq, H, D)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa(attention, query, key, value, padding_mask, dropout=dropout, scaling=attention.scaling)[0]


def kept_probabilities_attention_forward(scaled_query, key, value, padding_mask, dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention through autograd's batched matmuls, which keeps the probabilities for backward:
    `(B, Lq, H, D)`. `dropout` > 0: on the probabilities, one draw of their shape, as the reference's eager path and
    torch's math kernel draw it (the same random numbers in training)."""
    probabilities = attention_probabilities(scaled_query, key, padding_mask)  # (B, H, Lq, Lk)
    if dropout > 0:
        probabilities = nn.functional.dropout(probabilities, dropout, training=True)
    return torch.matmul(probabilities, value).transpose(1, 2)  # (B, Lq, H, D)


def masked_softmax(scores: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of `scores` with a boolean mask (True = attend), in the scores' dtype. Safe in half
    precision: torch's softmax subtracts the row maximum and accumulates half precision in float32."""
    return _masked(scores, padding_mask).softmax(dim=-1)


def _masked(scores: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    if padding_mask is None:
        return scores
    return scores.masked_fill(~padding_mask, torch.finfo(scores.dtype).min)


def softmax_with_backward(scores: torch.Tensor, padding_mask: torch.Tensor | None):
    """`(probabilities, backward)`: `masked_softmax(scores, padding_mask)` and the function that takes the
    probabilities' gradient to the scores' (autograd's softmax backward, `p * (g - sum(g * p))` in one kernel). The
    masked scores' gradient is zero either way (their probabilities are), so the mask stays out of the graph."""
    with torch.enable_grad():
        leaf = _masked(scores, padding_mask).detach().requires_grad_()
        probabilities = leaf.softmax(dim=-1)
    return probabilities, lambda grad: torch.autograd.grad(probabilities, leaf, grad)[0]


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


def grid_attention(attention, kernel: Kernel, hidden_states, key: "FactoredProjection", value: "FactoredProjection",
                   padding_mask) -> torch.Tensor:  # fmt: skip
    """`cross_attention` to keys and values factored from the Fourier features of a grid. Both are linear in the same
    `(B, M, r)` features, `K = F W_k^T` and `V = F W_v^T` (`FactoredProjection.grid_features`, the biases in a column
    of ones), so each head attends with the query `q W_k` to `F` as keys and values and maps the result back,
    `P V = (P F) W_v^T`: exact, with `r` terms per score instead of the head size and no keys or values materialised."""
    heads, head_dim = attention.num_heads, attention.head_dim
    query = split_heads(attention, attention.q_proj(hidden_states))  # (B, H, N, D)
    query = query @ key.grid_weight().view(heads, head_dim, -1)  # (B, H, N, r)
    features = key.grid_features(query.dtype)[:, None].expand(-1, heads, -1, -1)  # (B, H, M, r)
    attn_output = attend(attention, kernel, query, features, features, padding_mask)  # (B, N, H, r)
    value_weight = value.grid_weight().view(heads, head_dim, -1)  # (H, D, r)
    attn_output = torch.einsum("bnhr,hdr->bnhd", attn_output, value_weight)  # (B, N, H, D)
    return attention.o_proj(attn_output.flatten(2))  # (B, N, dim)


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
    half precision in float32. Where it pays in float32: `benchmarks/autograd-functions-cpu.md`, row "query-only
    attention"."""

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
            scores = torch.matmul(query_block, key[batch].transpose(-1, -2))  # (b, H, n, Lk)
            probs, softmax_backward = softmax_with_backward(scores, mask)
            later_rows = rows.start > 0  # the keys' and values' gradients sum over the blocks of rows
            if grad_value is not None:
                _matmul_into(grad_value[batch], probs.transpose(-1, -2), grad, accumulate=later_rows)
            grad_scores = softmax_backward(torch.matmul(grad, value[batch].transpose(-1, -2)))  # (b, H, n, Lk)
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
    cast again in backward rather than kept in two dtypes, and their gradients come back in their own dtype. Where it
    pays (memory, at the module's speed): `benchmarks/autograd-functions-cpu.md`, row "feed-forward"."""

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
        activation_rows = activation.detach().flatten(0, -2)  # (B N, ff_dim)
        grad_weight_2 = grad_output.T @ activation_rows if needs_weight_2 else None  # (width, ff_dim)
        grad_bias_2 = grad_output.sum(0) if needs_bias_2 else None
        grad_activation = (grad_output @ cast_weight_2).view_as(activation)  # (B, N, ff_dim)
        (grad_pre,) = torch.autograd.grad(activation, leaf, grad_activation)
        del activation, activation_rows, grad_activation
        grad_pre = grad_pre.flatten(0, -2)  # (B N, ff_dim)
        grad_input = (grad_pre @ cast_weight_1).view_as(hidden_states) if needs_input else None
        grad_weight_1 = grad_pre.T @ hidden_states.flatten(0, -2) if needs_weight_1 else None  # (ff_dim, width)
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
    `attention_mask` `(B, 1, 1, M)` or None. Output `(B, H, N, Dv)`. Where it pays:
    `benchmarks/autograd-functions-cpu.md`, row "shared-query cross-attend".
    """

    @staticmethod
    def forward(ctx, query_data, query_positions, data, positions, rstd, key_bias, value, attention_mask):
        ctx.save_for_backward(query_data, query_positions, data, positions, rstd, value, attention_mask)
        ctx.key_bias_meta = key_bias.shape, key_bias.dtype
        output = value.new_empty(len(value), *query_data.shape[:2], value.shape[-1])  # (B, H, N, Dv)
        scores = SharedQueryAttention.scores
        blocks = SharedQueryAttention.blocks(query_positions, positions, len(value), attention_mask)
        for rows, shared_scores, batch, mask in blocks:
            probs = masked_softmax(scores(query_data[:, rows], shared_scores, data[batch], rstd[batch]), mask)
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
    def scores(query_data, shared_scores, data, rstd):
        scores = torch.matmul(query_data, data[:, None].transpose(-1, -2))  # (b, H, n, M)
        return scores.addcmul_(shared_scores, rstd[:, None, None, :])

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
        scores, grad_shared = SharedQueryAttention.scores, None
        blocks = SharedQueryAttention.blocks(query_positions, positions, len(value), attention_mask)
        for rows, shared_scores, batch, mask in blocks:
            if batch.start == 0:  # a new block of rows: its shared scores' gradient sums over the batch
                grad_shared = torch.zeros(shared_scores.shape, dtype=accumulate, device=shared_scores.device)
            block_scores = scores(query_data[:, rows], shared_scores, data[batch], rstd[batch])  # (b, H, n, M)
            probs, softmax_backward = softmax_with_backward(block_scores, mask)
            grad = grad_output[batch, :, rows]  # (b, H, n, Dv)
            _matmul_into(grad_value[batch], probs.transpose(-1, -2), grad, accumulate=rows.start > 0)
            grad_scores = softmax_backward(torch.matmul(grad, value[batch].transpose(-1, -2)))  # (b, H, n, M)
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


def grid_width(channels: int, grid: tuple[int, ...]) -> int:
    """The width `r` of the grid features (`FactoredProjection.grid_features`) of `channels` data channels on `grid`:
    the data, their mean correction, a one-hot column per grid line and a column of ones, rounded up to a multiple of
    8 (the head sizes fused kernels take)."""
    return -(-(channels + 1 + sum(grid) + 1) // 8) * 8


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
        return grid_width(self.data.shape[-1] - 1, self.grid)

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
                linear.weight[:, :channels].T.expand(batch_size, -1, -1),  # (B, C, out)
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


