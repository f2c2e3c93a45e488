"""Correctness of the fast paths: each equals the straightforward computation it replaces (no timing here; speed and
memory are measured by `scripts/benchmark.py`)."""

import pickle

import pytest
import torch
from torch import nn

from perceiver_lite import PerceiverLiteConfig, PerceiverLiteModel
from perceiver_lite import modeling_perceiver_lite as modeling
from perceiver_lite.modeling_perceiver_lite import (
    PerceiverLiteAttention,
    PerceiverLiteFourierFeatures,
    PerceiverLiteMLP,
    RecomputedAttention,
    SharedQueryAttention,
    eager_attention_forward,
    norm_and_project_concatenation,
)


def make_model(config, attn_implementation="sdpa"):
    model = PerceiverLiteModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def padding_mask(batch_size=3, spatial_shape=(8, 8)):
    """Sample 1 is 5 x 6 inside the 8 x 8 frame: per-sample position features."""
    mask = torch.ones(batch_size, *spatial_shape, dtype=torch.bool)
    mask[1, 5:] = False
    mask[1, :, 6:] = False
    return mask


def straightforward_forward(model, inputs, attention_mask=None):
    """`PerceiverLiteModel.forward` without its shortcuts: concatenated embeddings, keys and values projected again
    for every cross-attend."""
    inputs_embeds, mask = model.embeddings(inputs, attention_mask)
    mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
    latents = model.latents.expand(inputs.shape[0], -1, -1)
    for index in model.config.layers_indice:
        block = model.blocks[index]
        latents = block(latents, *block.project_inputs(inputs_embeds), mask)
    return latents


def forward_saving(model, inputs, autocast_dtype=None):
    """The model's last hidden state (float32), and the shapes of the tensors its forward saved for backward."""
    shapes = []
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t),
        torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None),
    ):
        output = model(inputs).last_hidden_state.float()
    return output, shapes


def gradients(model, output):
    model.zero_grad(set_to_none=True)
    output.square().mean().backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def forward_and_gradients(model, inputs, mask=None, autocast_dtype=None):
    """The model's last hidden state (float32) and its parameters' gradients, on the CPU, under autocast to
    `autocast_dtype` if given; the inputs and mask go to the model's device."""
    device = next(model.parameters()).device
    mask = None if mask is None else mask.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        output = model(inputs.to(device), attention_mask=mask).last_hidden_state.float()
    return output.cpu(), {name: grad.cpu() for name, grad in gradients(model, output).items()}


def assert_close_gradients(actual: dict, expected: dict, **tolerance):
    """Gradients by parameter name, each relative to its largest entry (`tolerance` for `assert_close`). A key bias's
    gradient is zero but for rounding (the softmax over the keys ignores it): relative to its weight's instead."""
    for name in expected:
        scale_name = name.removesuffix("k_proj.bias") + "k_proj.weight" if name.endswith("k_proj.bias") else name
        scale = expected[scale_name].abs().max()
        torch.testing.assert_close(actual[name] / scale, expected[name] / scale, **tolerance, msg=name)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "per-sample-positions"])
@pytest.mark.parametrize("cross_heads", [2, 1], ids=["materialized", "grid-features"])
def test_shared_key_values_and_split_embeddings_match_recomputation(model_tester, pre_norm, masked, cross_heads):
    config = model_tester.get_config(pre_norm=pre_norm, cross_heads=cross_heads)
    assert len(set(config.layers_indice)) < len(config.layers_indice)  # a block runs twice
    model = make_model(config).train()
    inputs = model_tester.prepare_inputs() * 4 + 3  # off-centre data: stresses the combined norm statistics
    mask = padding_mask() if masked else None

    output = model(inputs, attention_mask=mask).last_hidden_state
    expected = straightforward_forward(model, inputs, mask)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    fast, slow = gradients(model, output), gradients(model, expected)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_key_values_computed_once_per_unique_block(model_tester, monkeypatch):
    model = make_model(model_tester.get_config(layers_indice=[0, 1, 1, 1]))
    inputs = model_tester.prepare_inputs()
    calls = []
    for block in model.blocks:
        block.cross_layer.cross_attention.k_proj.register_forward_pre_hook(lambda *_: calls.append("inputs_embeds"))
    split_projection = modeling.norm_and_project_concatenation
    monkeypatch.setattr(
        modeling, "norm_and_project_concatenation", lambda *a, **k: calls.append("split") or split_projection(*a, **k)
    )
    model(inputs)
    assert calls == ["split"] * 2  # two unique blocks, four cross-attends
    calls.clear()
    model(inputs_embeds=model.embeddings(inputs)[0])
    assert calls == ["inputs_embeds"] * 2


@pytest.mark.parametrize("norm", [True, False], ids=["layer-norm", "no-norm"])
@pytest.mark.parametrize("shared_positions", [True, False], ids=["shared-positions", "per-sample-positions"])
def test_norm_and_project_concatenation_is_exact(norm, shared_positions):
    batch_size, length, channels, num_positions, out = 3, 10, 4, 9, 12
    layer_norm = nn.LayerNorm(channels + num_positions) if norm else None
    if norm:
        nn.init.normal_(layer_norm.weight, 1.0, 0.5)
        nn.init.normal_(layer_norm.bias, 0.0, 0.5)
    linear = nn.Linear(channels + num_positions, out)
    data = (torch.randn(batch_size, length, channels) * 30 + 100).requires_grad_()  # raw pixel-like values
    positions_shape = (length, num_positions) if shared_positions else (batch_size, length, num_positions)
    positions = torch.rand(positions_shape) * 2 - 1

    (output,) = norm_and_project_concatenation(data, positions, layer_norm, [linear])
    concatenated = torch.cat([data, positions.expand(batch_size, length, num_positions)], dim=-1)
    expected = linear(layer_norm(concatenated) if norm else concatenated)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)

    parameters = [data, *linear.parameters(), *(layer_norm.parameters() if norm else [])]
    upstream = torch.randn_like(expected)
    fast = torch.autograd.grad(output, parameters, upstream)
    slow = torch.autograd.grad(expected, parameters, upstream)
    for name, a, b in zip(["data", "weight", "bias", "norm.weight", "norm.bias"], fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-autocast"])
@pytest.mark.parametrize("cross_heads", [2, 1], ids=["materialized", "grid-features"])
def test_sdpa_path_keeps_no_cross_attention_matrix_for_backward(model_tester, autocast_dtype, cross_heads):
    """Training saves tensors for the backward pass; on the sdpa path none of them is a (latents x inputs) matrix, in
    float32 (torch's fused kernel) as in half precision (`RecomputedAttention`), for materialised keys and values as
    for grid features."""
    config = model_tester.get_config(cross_heads=cross_heads)
    inputs = model_tester.prepare_inputs()
    num_latents, num_inputs = config.num_latent_tokens, inputs[0, 0].numel()

    def saved_attention_matrices(attn_implementation):
        output, shapes = forward_saving(make_model(config, attn_implementation).train(), inputs, autocast_dtype)
        output.sum().backward()
        return [shape for shape in shapes if shape[-2:] == (num_latents, num_inputs)]

    assert saved_attention_matrices("eager")  # the check sees the matrix where it exists
    assert not saved_attention_matrices("sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_half_precision_softmax_is_safe(model_tester, attn_implementation, dtype):
    """Half-precision attention: close to float32 at ordinary scales, and finite convex combinations of the values for
    logits far beyond the half-precision range of `exp`."""
    config = model_tester.get_config()
    config._attn_implementation = attn_implementation
    attention = PerceiverLiteAttention(config).eval()
    hidden_states = torch.randn(2, 6, config.dim)
    expected, _ = attention(hidden_states)
    output, _ = attention.to(dtype)(hidden_states.to(dtype))
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.02)

    query = torch.randn(2, config.heads, 6, 8, dtype=dtype) * 40  # logits in the thousands: exp overflows
    key, value = torch.randn(2, config.heads, 10, 8, dtype=dtype) * 40, torch.randn(2, config.heads, 10, 8, dtype=dtype)
    attention.q_proj, attention.o_proj = nn.Identity(), nn.Identity()
    output, _ = attention(query.transpose(1, 2).flatten(2), key, value)  # (B, Lq, H * D)
    output = output.unflatten(-1, (config.heads, 8)).transpose(1, 2)  # (B, H, Lq, D)
    assert torch.isfinite(output).all()
    low, high = value.amin(dim=2, keepdim=True), value.amax(dim=2, keepdim=True)  # (B, H, 1, D)
    assert ((output >= low - 1e-2) & (output <= high + 1e-2)).all()


@pytest.mark.parametrize("cross_heads", [2, 1], ids=["materialized", "grid-features"])
def test_torch_compile_matches_eager_mode(model_tester, cross_heads):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    config = model_tester.get_config(layers_indice=[0, 0], num_latent_transformers_in_layers=[1], cross_heads=cross_heads)
    model = make_model(config)
    inputs = model_tester.prepare_inputs()
    expected = model(inputs).last_hidden_state
    compiled = torch.compile(model)  # the default backend, inductor
    torch.testing.assert_close(compiled(inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled(inputs * 2).last_hidden_state, model(inputs * 2).last_hidden_state,
                               rtol=1e-4, atol=1e-5)  # fmt: skip

    model.train()  # training: the same gradients through the compiled custom autograd functions
    expected = gradients(model, model(inputs).last_hidden_state)
    output = gradients(model, compiled(inputs).last_hidden_state)
    for name in expected:
        torch.testing.assert_close(output[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "scores_budget", [1, 30, 80, 1 << 22], ids=["one-row-one-sample", "two-rows", "all-rows-one-sample", "whole-batch"]
)
@pytest.mark.parametrize("mask_rows", [None, 1, 5], ids=["unmasked", "key-padding-mask", "per-row-mask"])
def test_recomputed_attention_matches_eager(mask_rows, scores_budget, monkeypatch):
    """`RecomputedAttention` (the sdpa path in half precision on the CPU) equals matmul-softmax attention, forward and
    backward (float64 gradcheck, and float32 against the eager function), whatever blocks of query rows and samples it
    runs in."""
    monkeypatch.setattr(RecomputedAttention, "SCORES_BUDGET", scores_budget)
    query = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    key = torch.randn(3, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(3, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    mask = None
    if mask_rows:
        mask = torch.rand(3, 1, mask_rows, 7) > 0.4
        mask[..., 0] = True
    assert torch.autograd.gradcheck(lambda q, k, v: RecomputedAttention.apply(q, k, v, mask, 0.5), (query, key, value))

    inputs = [tensor.detach().float().requires_grad_() for tensor in (query, key, value)]
    output = RecomputedAttention.apply(*inputs, mask, 0.5)
    module = nn.Module()  # eager_attention_forward only reads `training`
    expected, _ = eager_attention_forward(module, *[t.detach().requires_grad_() for t in inputs], mask, scaling=0.5)
    torch.testing.assert_close(output.transpose(1, 2), expected, rtol=1e-5, atol=1e-6)

def test_half_precision_self_attention_keeps_probabilities_within_the_scores_budget(model_tester, monkeypatch):
    """On the sdpa path under bfloat16 autocast, each latent self-attention keeps its `(latents x latents)`
    probabilities for backward when they fit `RecomputedAttention.SCORES_BUDGET`, and recomputes them (keeping nothing
    of that size) when they do not; the gradients are the same. In float32 the fused kernel keeps none."""
    config = model_tester.get_config(num_latent_tokens=12)  # (12 x 12) probabilities, (12 x 8) heads
    model = make_model(config).train()
    inputs = model_tester.prepare_inputs()
    probabilities_shape = (model_tester.batch_size, config.heads, config.num_latent_tokens, config.num_latent_tokens)
    num_self_attentions = sum(len(model.blocks[index].layers) for index in config.layers_indice)

    def kept_probabilities_and_gradients(autocast: bool):
        output, shapes = forward_saving(model, inputs, torch.bfloat16 if autocast else None)
        return shapes.count(probabilities_shape), gradients(model, output)

    kept, kept_gradients = kept_probabilities_and_gradients(autocast=True)
    assert kept >= num_self_attentions  # the softmax saves its output (the product after it may save a view)
    assert kept_probabilities_and_gradients(autocast=False)[0] == 0
    monkeypatch.setattr(RecomputedAttention, "SCORES_BUDGET", probabilities_shape[0] * probabilities_shape[1] * 143)
    recomputed, recomputed_gradients = kept_probabilities_and_gradients(autocast=True)
    assert recomputed == 0
    for name, gradient in kept_gradients.items():
        torch.testing.assert_close(recomputed_gradients[name], gradient, rtol=2e-2, atol=2e-3, msg=name)


def test_self_attention_single_product_matches_separate_projections(model_tester):
    config = model_tester.get_config()
    config._attn_implementation = "eager"
    attention = PerceiverLiteAttention(config).eval()
    hidden_states = torch.randn(2, 6, config.dim)

    def heads(projection):
        return projection(hidden_states).view(2, 6, config.heads, -1).transpose(1, 2)  # (B, H, L, D)

    query, key, value = heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj)
    context, _ = eager_attention_forward(attention, query, key, value, None, scaling=attention.scaling)
    expected = attention.o_proj(context.reshape(2, 6, -1))
    torch.testing.assert_close(attention(hidden_states)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scores_budget", [1, 30, 100, 1 << 22], ids=["one-row-one-sample", "two-rows", "all-rows-one-sample", "whole-batch"]
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_shared_query_attention_matches_materialized_keys(masked, scores_budget, monkeypatch):
    """`SharedQueryAttention` equals softmax attention of the shared query to the materialised keys of a
    `FactoredProjection`, forward and backward (float64 gradcheck for every input, and float32 against the eager
    function with the key bias included), whatever blocks of query rows and samples it runs in."""
    monkeypatch.setattr(RecomputedAttention, "SCORES_BUDGET", scores_budget)
    batch_size, heads, num_latents, length, head_dim, channels, num_positions = 3, 2, 5, 7, 4, 3, 6
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()

    query = tensor(heads, num_latents, head_dim)
    key = modeling.FactoredProjection(
        data=tensor(batch_size, length, channels + 1),
        positions=tensor(length, num_positions),
        rstd=(torch.rand(batch_size, length, 1, generator=generator, dtype=torch.float64) + 0.5).requires_grad_(),
        weight_data=tensor(heads * head_dim, channels + 1, scale=0.5),
        weight_positions=tensor(heads * head_dim, num_positions, scale=0.5),
        bias=tensor(heads * head_dim),
    )
    value = tensor(batch_size, heads, length, head_dim)
    mask = None
    if masked:
        mask = torch.rand(batch_size, 1, 1, length, generator=generator) > 0.4
        mask[..., 0] = True

    def shared(query, data, positions, rstd, weight_data, weight_positions, bias, value):
        query_data = query @ weight_data.view(heads, head_dim, -1)  # (H, N, C + 1)
        query_positions = query @ weight_positions.view(heads, head_dim, -1)  # (H, N, F)
        return SharedQueryAttention.apply(query_data, query_positions, data, positions, rstd[..., 0], bias, value, mask)

    def materialized(query, data, positions, rstd, weight_data, weight_positions, bias, value):
        keys = modeling.FactoredProjection(data, positions, rstd, weight_data, weight_positions, bias).materialize()
        keys = keys.view(batch_size, length, heads, head_dim).transpose(1, 2)  # (B, H, M, D)
        module = nn.Module()  # eager_attention_forward only reads `training`
        output, _ = eager_attention_forward(module, query.expand(batch_size, -1, -1, -1), keys, value, mask, scaling=1.0)
        return output.transpose(1, 2)  # (B, H, N, D)

    inputs = (query, key.data, key.positions, key.rstd, key.weight_data, key.weight_positions, key.bias, value)
    assert torch.autograd.gradcheck(shared, inputs)
    torch.testing.assert_close(shared(*inputs), materialized(*inputs))
    upstream = torch.randn(batch_size, heads, num_latents, head_dim, dtype=torch.float64, generator=generator)
    fast = torch.autograd.grad(shared(*inputs), inputs, upstream)
    slow = torch.autograd.grad(materialized(*inputs), inputs, upstream)
    for name, a, b in zip(["query", "data", "positions", "rstd", "weight_data", "weight_positions", "bias", "value"], fast, slow):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["shared-positions", "per-sample-positions"])
def test_only_the_first_cross_attend_shares_its_query(model_tester, masked, monkeypatch):
    """The latents are the same for every sample until their first cross-attend: that one (and only that one) runs as
    `SharedQueryAttention` on the CPU sdpa path, unless the position features differ per sample (padding)."""
    model = make_model(model_tester.get_config(layers_indice=[0, 0, 1]))
    calls = []
    apply = SharedQueryAttention.apply
    monkeypatch.setattr(SharedQueryAttention, "apply", lambda *args: calls.append(args[-2].shape) or apply(*args))
    model(model_tester.prepare_inputs(), attention_mask=padding_mask() if masked else None)
    assert len(calls) == (0 if masked else 1)
    model.set_attn_implementation("eager")
    model(model_tester.prepare_inputs())
    assert len(calls) == (0 if masked else 1)


def grid_attention_setup(grid):
    """A float64 cross-attention with a non-trivial input norm, two heads wider than the grid's features, latents, and
    data channels with the Fourier features of `grid` shared by the batch."""
    generator = torch.Generator().manual_seed(0)
    config = PerceiverLiteConfig(
        data_shape=[3, *grid], num_latent_tokens=5, dim=16, heads=2, cross_heads=2, head_dim=24, num_bands=2,
        layers_indice=[0], num_latent_transformers_in_layers=[1],
    )
    config._attn_implementation = "sdpa"  # as a model sets it
    attention = PerceiverLiteAttention(config, is_cross_attention=True).double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3)
        attention.kv_norm.weight.add_(1)
    positions = PerceiverLiteFourierFeatures(config)(grid, dtype=torch.float64)  # (M, F)
    data = torch.randn(3, len(positions), 3, generator=generator, dtype=torch.float64) * 2 + 1  # (B, M, C)
    hidden_states = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    return attention, data, positions, hidden_states


def count_grid_attention(monkeypatch) -> list:
    """Calls of `PerceiverLiteAttention._grid_attention`, from now on."""
    calls, grid_attention = [], PerceiverLiteAttention._grid_attention
    monkeypatch.setattr(
        PerceiverLiteAttention, "_grid_attention", lambda *a, **k: calls.append(1) or grid_attention(*a, **k)
    )
    return calls


@pytest.mark.parametrize("grid", [(6,), (4, 5), (2, 3, 4)], ids=["1-D", "2-D", "3-D"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["plain", "masked", "data-gradient", "one-row-one-sample"])
def test_grid_attention_matches_materialized_keys_and_values(grid, attn_implementation, case, monkeypatch):
    """For the Fourier features of a grid, attention to the grid features (`_grid_attention`) equals attention to the
    materialised keys and values, forward and backward (every parameter, the queries, and the data where it needs a
    gradient), with a key padding mask, on both attention paths, in any blocks of query rows and samples."""
    if case == "one-row-one-sample":
        monkeypatch.setattr(RecomputedAttention, "SCORES_BUDGET", 1)
    attention, data, positions, hidden_states = grid_attention_setup(grid)
    attention.config._attn_implementation = attn_implementation
    data.requires_grad_(case == "data-gradient")
    mask = None
    if case == "masked":
        mask = torch.rand(3, 1, 1, len(positions), generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True
    calls = count_grid_attention(monkeypatch)

    def run(materialize: bool):
        key, value = attention.project_key_value(data, positions, grid)
        if materialize:
            key, value = attention.as_tensor(key), attention.as_tensor(value)
        output, weights = attention(hidden_states, key, value, mask)
        inputs = [hidden_states, *attention.parameters(), *([data] if data.requires_grad else [])]
        return output, weights, torch.autograd.grad(output, inputs, torch.ones_like(output) + output.detach())

    fast, fast_weights, fast_grads = run(materialize=False)
    assert calls == [1]
    slow, slow_weights, slow_grads = run(materialize=True)
    assert calls == [1]
    torch.testing.assert_close(fast, slow)
    if attn_implementation == "eager":  # the attention weights are those of the materialised keys
        torch.testing.assert_close(fast_weights, slow_weights)
    names = ["hidden_states", *(name for name, _ in attention.named_parameters()), "data"]
    for name, a, b in zip(names, fast_grads, slow_grads):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    "case", ["grid", "per-sample-positions", "features-wider-than-heads", "eager", "checkpointing", "input-gradient"]
)
def test_grid_attention_serves_cross_attends_to_grid_features_narrower_than_a_head(model_tester, case, monkeypatch):
    """Every cross-attend to unpadded grid inputs runs on the grid features when they are narrower than a head (here
    `3 + 1 + 8 + 8 + 1` columns, 24 with padding, against heads of 32, or 16 with two heads), on either attention path
    and for inputs that need a gradient; not with per-sample positions (padding) or under gradient checkpointing (its
    arguments must be tensors)."""
    cross_heads = 2 if case == "features-wider-than-heads" else 1
    model = make_model(model_tester.get_config(layers_indice=[0, 0, 1], cross_heads=cross_heads))
    inputs = model_tester.prepare_inputs()
    calls = count_grid_attention(monkeypatch)
    if case == "eager":
        model.set_attn_implementation("eager")
    if case == "checkpointing":
        model.train().activation_checkpointing_enable()
    if case == "input-gradient":
        inputs.requires_grad_()
    model(inputs, attention_mask=padding_mask() if case == "per-sample-positions" else None)
    served = case in ("grid", "eager", "input-gradient")
    assert len(calls) == (3 if served else 0)


def test_recomputed_attention_computes_only_the_gradients_asked_for(monkeypatch):
    """With only the query needing a gradient (keys and values of the inputs alone), `RecomputedAttention`'s backward
    computes that gradient alone (one product written out instead of three), equal to the one of the full backward."""
    query, key, value = (torch.randn(3, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    products = []
    matmul_into = modeling._matmul_into
    monkeypatch.setattr(modeling, "_matmul_into", lambda *a, **k: products.append(1) or matmul_into(*a, **k))

    def backward_products(*inputs) -> int:
        output = RecomputedAttention.apply(*inputs, None, 0.5)
        products.clear()
        output.sum().backward()
        return len(products)

    full = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    assert backward_products(*full) == 3
    assert backward_products(query.requires_grad_(), key, value) == 1
    torch.testing.assert_close(query.grad, full[0].grad)
    assert torch.autograd.gradcheck(lambda q: RecomputedAttention.apply(q, key, value, None, 0.5), (query,))


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["grid-features", "per-sample-positions"])
def test_fused_kernels_as_on_a_gpu_match_the_cpu_paths(model_tester, autocast_dtype, masked, monkeypatch):
    """Off the CPU every attention takes torch's fused kernels (`_own_cpu_path` is False): the cross-attends to the grid
    features (expanded along the heads, stride 0) and to per-sample positions included. Run here on the CPU's fused
    kernels, that path gives the outputs and gradients of this CPU's own attention functions."""
    model = make_model(model_tester.get_config(cross_heads=1)).train()
    inputs, mask = model_tester.prepare_inputs(), padding_mask() if masked else None
    own_cpu_path, sdpa = PerceiverLiteAttention._own_cpu_path, nn.functional.scaled_dot_product_attention
    fused_calls = []
    monkeypatch.setattr(
        nn.functional, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k)
    )

    def run(fused: bool):
        monkeypatch.setattr(PerceiverLiteAttention, "_own_cpu_path", lambda *a: not fused and own_cpu_path(*a))
        fused_calls.clear()
        return forward_and_gradients(model, inputs, mask, autocast_dtype)

    fast, fast_grads = run(fused=False)
    fused, fused_grads = run(fused=True)
    assert len(fused_calls) == model_tester.num_cross_attentions + model_tester.num_self_attention_layers
    tolerance = dict(rtol=0.05, atol=0.05) if autocast_dtype else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, fast, **tolerance)
    assert_close_gradients(fused_grads, fast_grads, **tolerance)


@pytest.mark.parametrize("hidden_act", sorted(modeling.IN_PLACE_ACTIVATIONS))
def test_feed_forward_activation_in_place_only_where_autograd_keeps_no_input(model_tester, hidden_act, monkeypatch):
    """Without gradients the feed-forward applies its activation in place, with the output of `ACT2FN[hidden_act]`;
    where autograd needs the activation's input, or a hook watches `act`, the module itself runs. The module still
    pickles (`torch.save` of a whole model, `copy.deepcopy`)."""
    mlp = PerceiverLiteMLP(model_tester.get_config(hidden_act=hidden_act))
    hidden_states = torch.randn(3, 5, model_tester.dim)
    expected = mlp.fc2(mlp.act(mlp.fc1(hidden_states)))
    torch.testing.assert_close(pickle.loads(pickle.dumps(mlp))(hidden_states), expected, rtol=0, atol=0)
    in_place, act_calls = modeling.IN_PLACE_ACTIVATIONS[hidden_act], []
    monkeypatch.setitem(modeling.IN_PLACE_ACTIVATIONS, hidden_act, lambda x: act_calls.append("in place") or in_place(x))
    hook = mlp.act.register_forward_pre_hook(lambda *_: act_calls.append("module"))
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden_states), expected, rtol=0, atol=0)
    assert act_calls == ["module"]  # watched by the hook
    hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden_states), expected, rtol=0, atol=0)
    assert act_calls == ["module", "in place"]
    output = mlp(hidden_states)  # parameters need gradients: the activation's input is kept
    assert act_calls == ["module", "in place"]
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
