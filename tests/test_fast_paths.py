"""The fast paths (`perceiver_lite/fast_perceiver_lite.py`): each gives the reference model's outputs and gradients, and
`fast_plan` steps aside, for the reference to run, wherever they could not be exact. No timing here: speed and memory
are measured by `scripts/benchmark.py`."""

import copy
import dataclasses
import functools
import pickle

import pytest
import torch
from conftest import PerceiverLiteModelTester, count_reference_attention
from torch import nn
from transformers.activations import ACT2FN

from perceiver_lite import (
    PerceiverLayer,
    PerceiverLiteConfig,
    PerceiverLiteForCausalLM,
    PerceiverLiteForMaskedLM,
    PerceiverLiteModel,
    PerceiverLiteSlidingCausalLMCache,
)
from perceiver_lite import fast_perceiver_lite as fast
from perceiver_lite import modeling_perceiver_lite as modeling
from perceiver_lite.modeling_perceiver_lite import (
    PerceiverLiteAttention,
    PerceiverLiteFourierFeatures,
    PerceiverLiteMLP,
    eager_attention_forward,
)


def make_model(config, attn_implementation="sdpa"):
    model = PerceiverLiteModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def plan_of(model, batch_size=3, **kwargs):
    """`fast_plan` for a forward of the tiny `model` on CPU inputs of its nominal shape."""
    return fast.fast_plan(model, torch.zeros(batch_size, *model.config.data_shape), **kwargs)


def padding_mask(batch_size=3, spatial_shape=(8, 8)):
    """Sample 1 is 5 x 6 inside the 8 x 8 frame: per-sample position features."""
    mask = torch.ones(batch_size, *spatial_shape, dtype=torch.bool)
    mask[1, 5:] = False
    mask[1, :, 6:] = False
    return mask


def gradients(model, output):
    """The parameters' gradients of `sum(output * cotangent)` for a fixed random cotangent (a post-norm model's output
    is normalised: a function of its norm, such as `output.square().mean()`, would have no gradient)."""
    model.zero_grad(set_to_none=True)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output.device)
    (output * cotangent).sum().backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def forward_and_gradients(model, inputs, mask=None, autocast_dtype=None):
    """The model's last hidden state (float32) and its parameters' gradients, under autocast to `autocast_dtype` if
    given; the inputs and mask go to the model's device."""
    device = next(model.parameters()).device
    mask = None if mask is None else mask.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        output = model(inputs.to(device), attention_mask=mask).last_hidden_state.float()
    return output.cpu(), {name: grad.cpu() for name, grad in gradients(model, output).items()}


def assert_close_gradients(actual: dict, expected: dict, **tolerance):
    """Gradients by parameter name, each relative to its largest entry (`tolerance` for `assert_close`). A key bias's
    gradient is zero but for rounding (the softmax over the keys ignores it): relative to its weight's instead."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale_name = name.removesuffix("k_proj.bias") + "k_proj.weight" if name.endswith("k_proj.bias") else name
        scale = expected[scale_name].abs().max()
        torch.testing.assert_close(actual[name] / scale, expected[name] / scale, **tolerance, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Fast paths against the reference
# ---------------------------------------------------------------------------------------------------------------------


def num_attentions(config) -> int:
    """Attention calls of one forward: a cross-attention per entry of `layers_indice` and its block's self-attentions."""
    return sum(1 + config.num_latent_transformers_in_layers[index] for index in config.layers_indice)


@pytest.mark.parametrize(
    "case", ["float32", "input-gradient", "bfloat16-autocast", "checkpointing", "all-ones-mask", "no-repeats"]
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "per-sample-positions"])
@pytest.mark.parametrize("cross_heads", [2, 1], ids=["materialized", "grid-features"])
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
def test_fast_paths_equal_the_reference(model_tester, pre_norm, cross_heads, masked, case, monkeypatch):
    """Every route of the fast paths (shared or per-sample positions, grid features or materialised keys and values,
    a query shared by the batch, matmul attention in float32 and bfloat16, checkpointed layers) gives the outputs and
    the parameter gradients of the reference, `config.use_fast_paths=False`, on the same weights."""
    overrides = {"pre_norm": pre_norm, "cross_heads": cross_heads}
    if case == "no-repeats":
        overrides.update(layers_indice=[0, 1])
    model = make_model(model_tester.get_config(**overrides)).train()
    inputs = model_tester.prepare_inputs() * 4 + 3  # off-centre data: stresses the combined norm statistics
    mask = padding_mask() if masked else None
    if case == "all-ones-mask":
        mask = torch.ones(3, 8, 8, dtype=torch.long)
    if case == "input-gradient":
        inputs.requires_grad_()
    if case == "checkpointing":
        model.activation_checkpointing_enable()
    autocast_dtype = torch.bfloat16 if case == "bfloat16-autocast" else None
    reference_calls = count_reference_attention(monkeypatch)

    def run(use_fast_paths: bool):
        model.config.use_fast_paths = use_fast_paths
        return forward_and_gradients(model, inputs, mask, autocast_dtype)

    fast_output, fast_grads = run(use_fast_paths=True)
    assert reference_calls == []
    expected, expected_grads = run(use_fast_paths=False)
    assert len(reference_calls) == num_attentions(model.config) * (2 if case == "checkpointing" else 1)
    tolerance = dict(rtol=0.05, atol=0.05) if autocast_dtype else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_output, expected, **tolerance)
    assert_close_gradients(fast_grads, expected_grads, **tolerance)


ENCODER_OPTIONS = {
    "cross-attend-once": dict(layers_indice=[0, 1, 1], num_latent_transformers_in_layers=[0, 2], cross_attend_blocks=[0]),
    "self-attention-first": dict(cross_attend_blocks=[1]),
    "learned-positions": dict(position_encoding_type="learned", position_dim=6),
    "added-positions": dict(position_encoding_type="learned", concat_positions=False),
    "input-projection": dict(input_projection_dim=5),
    "no-query-residual": dict(cross_attention_query_residual=False),
    "own-qk-widths": dict(qk_channels=16, v_channels=16, cross_qk_channels=8, cross_v_channels=8, cross_ff_dim=24),
    "gated-feed-forward": dict(gated_feed_forward=True),
}


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "per-sample-positions"])
@pytest.mark.parametrize("option", list(ENCODER_OPTIONS))
def test_fast_paths_equal_the_reference_with_encoder_options(model_tester, option, masked, monkeypatch):
    """The encoder options beyond the paper's model (transformers' checkpoints use them) run the fast paths too, with
    the reference's outputs and gradients."""
    model = make_model(model_tester.get_config(**ENCODER_OPTIONS[option])).train()
    inputs = (model_tester.prepare_inputs() * 4 + 3).requires_grad_()
    mask = padding_mask() if masked else None
    reference_calls = count_reference_attention(monkeypatch)

    def run(use_fast_paths: bool):
        model.config.use_fast_paths = use_fast_paths
        inputs.grad = None
        output, grads = forward_and_gradients(model, inputs, mask)
        return output, {**grads, "inputs": inputs.grad.clone()}

    fast_output, fast_grads = run(use_fast_paths=True)
    assert reference_calls == []
    expected, expected_grads = run(use_fast_paths=False)
    assert reference_calls
    torch.testing.assert_close(fast_output, expected, rtol=1e-4, atol=1e-5)
    # relative to the largest gradient of all: without the query residual the latents leave the first cross-attend
    # nearly equal, and the latent self-attention's query/key gradients are rounding noise (~1e-8)
    scale = max(grad.abs().max() for grad in expected_grads.values())
    for name, expected_grad in expected_grads.items():
        torch.testing.assert_close(fast_grads[name], expected_grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_fast_plan_steps_aside_for_unequal_value_widths(model_tester):
    """Keys and values of other widths than the queries' have no fused or factored route: the reference runs."""
    for overrides in (dict(v_channels=64), dict(cross_v_channels=16)):
        assert plan_of(make_model(model_tester.get_config(**overrides))) is None
    assert plan_of(make_model(model_tester.get_config(qk_channels=16, v_channels=16))) is not None


@pytest.mark.parametrize("mask_shape", [None, "keys", "queries-and-keys"])
def test_perceiver_layer_fast_paths_equal_the_reference(mask_shape, monkeypatch):
    layer = PerceiverLayer(32, 4, 2, 8, dropout=0.0, ff_dropout=0.0)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    mask = {None: None, "keys": torch.rand(2, 6) > 0.3, "queries-and-keys": torch.rand(2, 5, 12) > 0.3}[mask_shape]
    if mask is not None:
        mask[..., 0] = True
    reference_calls = count_reference_attention(monkeypatch)

    def run(use_fast_paths: bool):
        layer.config.use_fast_paths = use_fast_paths
        layer.zero_grad(set_to_none=True)
        output = layer(q, k, v, mask)
        output.square().mean().backward()
        return output, {name: p.grad.clone() for name, p in layer.named_parameters()}

    fast_output, fast_grads = run(use_fast_paths=True)
    assert reference_calls == []
    expected, expected_grads = run(use_fast_paths=False)
    assert len(reference_calls) == 4
    torch.testing.assert_close(fast_output, expected, rtol=1e-5, atol=1e-5)
    assert_close_gradients(fast_grads, expected_grads, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Where the fast paths step aside
# ---------------------------------------------------------------------------------------------------------------------


class LoraLikeLinear(nn.Module):
    """A projection that is not an `nn.Linear` (as PEFT's LoRA layer): its base weight plus a low-rank update."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_a = nn.Linear(base.in_features, 2, bias=False)
        self.lora_b = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


class SubclassedLinear(nn.Linear):
    """An `nn.Linear` subclass that computes something else (as a quantised linear would)."""

    def forward(self, x):
        return super().forward(x) * 1.5


def subclassed(linear: nn.Linear) -> SubclassedLinear:
    replacement = SubclassedLinear(linear.in_features, linear.out_features)
    replacement.load_state_dict(linear.state_dict())
    return replacement


def watch(model, case: str):
    """Change `model` as a user's tool would, for the case; returns what to undo, if anything."""
    attention = model.blocks[1].cross_layer.cross_attention
    if case == "eager":
        model.set_attn_implementation("eager")
    elif case == "use_fast_paths=False":
        model.config.use_fast_paths = False
    elif case == "lora-like-module":
        attention.q_proj = LoraLikeLinear(attention.q_proj)
    elif case == "linear-subclass":
        model.blocks[0].layers[0].mlp.fc1 = subclassed(model.blocks[0].layers[0].mlp.fc1)
    elif case == "norm-subclass":
        attention.kv_norm.__class__ = type("WrappedNorm", (nn.LayerNorm,), {})
    elif case == "bias-free-linear":
        attention.k_proj.register_parameter("bias", None)  # a user's edit the fast paths' fused biases cannot read
    elif case == "norm-without-affine":
        model.blocks[0].layers[0].mlp_norm.weight = None
    elif case == "parametrized-weight":
        nn.utils.parametrize.register_parametrization(attention.v_proj, "weight", nn.Identity())
    elif case == "forward-hook":
        attention.k_proj.register_forward_hook(lambda module, args, output: output * 2)
    elif case == "forward-pre-hook":
        model.blocks[0].layers[0].mlp.act.register_forward_pre_hook(lambda module, args: None)
    elif case == "backward-hook":
        model.blocks[0].layers[0].register_full_backward_hook(lambda module, grad_input, grad_output: None)
    elif case == "accelerate-hook":
        attention._hf_hook = object()  # accelerate's offloading marks the modules it moves weights for
    elif case == "global-hook":
        return nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    elif case == "instance-forward":
        mlp = model.blocks[0].layers[0].mlp
        mlp.forward = lambda hidden_states: PerceiverLiteMLP.forward(mlp, hidden_states) * 2
    elif case == "unserved-activation":
        model.blocks[0].layers[0].mlp.act = ACT2FN["gelu_new"]
    return None


STEP_ASIDE_CASES = [
    "eager",
    "use_fast_paths=False",
    "lora-like-module",
    "linear-subclass",
    "norm-subclass",
    "bias-free-linear",
    "norm-without-affine",
    "parametrized-weight",
    "forward-hook",
    "forward-pre-hook",
    "backward-hook",
    "accelerate-hook",
    "global-hook",
    "instance-forward",
    "unserved-activation",
]


@pytest.mark.parametrize("case", STEP_ASIDE_CASES)
def test_fast_paths_step_aside_for_what_they_cannot_read(model_tester, case, monkeypatch):
    """Where a projection or norm is not a plain `nn.Linear` / `nn.LayerNorm`, a hook watches a module, or the user
    asks for the reference, `fast_plan` returns None and the reference modules run: the model's output is that of the
    modules as they are (here, of the reference copy given the same change)."""
    model = make_model(model_tester.get_config())
    assert plan_of(model) is not None
    handle = watch(model, case)
    try:
        assert plan_of(model) is None
        reference = copy.deepcopy(model)
        reference.config.use_fast_paths = False
        inputs = model_tester.prepare_inputs()
        calls = count_reference_attention(monkeypatch)
        output = model(inputs).last_hidden_state
        assert len(calls) == num_attentions(model.config)
        torch.testing.assert_close(output, reference(inputs).last_hidden_state, rtol=0, atol=0)
    finally:
        if handle is not None:
            handle.remove()


def test_fast_paths_step_aside_on_the_meta_device_and_under_tracing(model_tester, monkeypatch):
    config = model_tester.get_config()
    with torch.device("meta"):
        assert plan_of(make_model(config)) is None
    model = make_model(config)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what torch.export and torch.compile report
    assert plan_of(model) is None


def test_recording_outputs_runs_the_reference_and_leaves_the_fast_paths_on(model_tester, monkeypatch):
    """Hidden states (and attentions) are recorded by hooks on the layers (and attention modules), so a forward that
    records them runs the reference; the recorders' hooks do not turn the fast paths off for the next forward."""
    model = make_model(model_tester.get_config())
    inputs = model_tester.prepare_inputs()
    expected = model(inputs).last_hidden_state
    calls = count_reference_attention(monkeypatch)
    outputs = model(inputs, output_hidden_states=True)
    assert len(calls) == num_attentions(model.config)
    assert len(outputs.hidden_states) == num_attentions(model.config) + 1  # each layer's input, and the last output
    torch.testing.assert_close(outputs.last_hidden_state, expected, rtol=1e-5, atol=1e-6)
    calls.clear()
    torch.testing.assert_close(model(inputs).last_hidden_state, expected, rtol=0, atol=0)
    assert calls == [] and plan_of(model) is not None


# ---------------------------------------------------------------------------------------------------------------------
# The allow-lists
# ---------------------------------------------------------------------------------------------------------------------


def test_every_config_field_has_a_fast_path_decision():
    """Each field of `PerceiverLiteConfig` is served, served for some values, or irrelevant to the fast paths
    (`CONFIG_DECISIONS`): a new option cannot be silently ignored by them. A field added without a decision (here by a
    config subclass, as a new model's options would be) makes the reference run."""
    fields = fast.config_fields(PerceiverLiteConfig)
    assert {"dim", "hidden_act", "use_fast_paths", "sparse_prediction"} <= set(fields)
    assert "output_hidden_states" not in fields  # transformers' own fields: read by the recording check
    missing = sorted(set(fields) - set(fast.CONFIG_DECISIONS))
    assert not missing, f"record whether the fast paths serve these config fields in CONFIG_DECISIONS: {missing}"
    assert not set(fast.CONFIG_DECISIONS) - set(fields), "CONFIG_DECISIONS names fields the config no longer has"
    for name, decision in fast.CONFIG_DECISIONS.items():
        assert decision in (fast.SERVED, fast.IRRELEVANT) or callable(decision), name

    class CausalConfig(PerceiverLiteConfig):
        causal: bool = False

    assert "causal" in fast.config_fields(CausalConfig)
    config = CausalConfig(**PerceiverLiteModelTester().get_config().to_diff_dict())
    config._attn_implementation = "sdpa"
    assert plan_of(make_model(config)) is None


def doubled(module_class):
    """A subclass of `module_class` whose forward doubles its output (as an untested variant would change it)."""

    def forward(self, *args, **kwargs):
        output = module_class.forward(self, *args, **kwargs)
        return (output[0] * 2, *output[1:]) if isinstance(output, tuple) else output * 2

    return type(f"Doubled{module_class.__name__}", (module_class,), {"forward": forward})


@pytest.mark.parametrize("part", ["self-attention", "cross-attention", "feed-forward", "decoder-attention"])
def test_fast_paths_step_aside_for_a_subclass_of_a_package_module(model_tester, part):
    """A subclass of `PerceiverLiteAttention` (self, cross or the decoder's) or `PerceiverLiteMLP` computes what its
    forward says: the default forward equals the reference's, which differs from the unchanged model's."""
    model = PerceiverLiteForMaskedLM(model_tester.get_config(data_shape=[8, 12], vocab_size=20, decoder_dim=8)).eval()
    model.set_attn_implementation("sdpa")
    input_ids = torch.randint(0, 20, (3, 12))
    unchanged = model(input_ids).logits
    layer = model.perceiver.blocks[1].layers[0]
    module = {
        "self-attention": layer.self_attention,
        "cross-attention": model.perceiver.blocks[0].cross_layer.cross_attention,
        "feed-forward": layer.mlp,
        "decoder-attention": model.decoder.layer.cross_attention,
    }[part]
    module.__class__ = doubled(type(module))
    output = model(input_ids).logits
    model.config.use_fast_paths = False
    expected = model(input_ids).logits
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)  # the other parts may run the fast paths
    assert not torch.allclose(expected, unchanged, rtol=1e-2, atol=1e-3)


def test_fast_paths_serve_dropout_with_the_reference_random_numbers(model_tester):
    """Attention and feed-forward dropout in training draw the same random numbers as the reference (its sdpa path:
    torch's math kernel), the attentions through kept probabilities."""
    model = make_model(model_tester.get_config(ff_dropout=0.3, attention_dropout=0.3)).train()
    inputs = model_tester.prepare_inputs()
    plan = plan_of(model)
    assert plan.latent_layer.self_attention is fast.Kernel.KEPT
    assert {route.cross_attention for route in plan.cross_layers if route is not None} == {fast.Kernel.KEPT}

    def run(use_fast_paths: bool):
        model.config.use_fast_paths = use_fast_paths
        torch.manual_seed(1)
        return forward_and_gradients(model, inputs)

    fast_output, fast_grads = run(use_fast_paths=True)
    expected, expected_grads = run(use_fast_paths=False)
    torch.testing.assert_close(fast_output, expected, rtol=1e-4, atol=1e-5)
    assert_close_gradients(fast_grads, expected_grads, rtol=1e-4, atol=1e-5)


def test_fast_paths_step_aside_for_unlisted_dtypes_kwargs_and_partial_checkpointing(model_tester):
    model = make_model(model_tester.get_config())
    assert plan_of(model) is not None and plan_of(model, kwargs={"output_hidden_states": False}) is not None
    assert plan_of(model, kwargs={"is_causal": True}) is None  # an argument the fast paths would not pass on
    assert plan_of(model, kwargs={"output_attentions": True}) is None
    assert plan_of(copy.deepcopy(model).to(torch.float16)) is None
    assert plan_of(copy.deepcopy(model).to(torch.float64)) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert plan_of(model) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan_of(model).autocast is torch.bfloat16
    model.train().blocks[1].layers[0].gradient_checkpointing = True  # one layer alone
    assert plan_of(model) is None
    model.activation_checkpointing_enable()
    assert plan_of(model).checkpointing


def test_gpu_routes_follow_the_gpu_benchmarks(model_tester):
    """On a CUDA device (decided here without one) the encoder's fast paths serve only as large an input as the GPU
    run where they were faster (32 images of 224 x 224), in bfloat16, or in float32 without gradients; never the
    decoder or `PerceiverLayer`. On the CPU they serve all."""
    model = make_model(model_tester.get_config())
    large, small = 32 * 224 * 224, 8 * 64 * 64
    assert fast.faster_on_cuda(model, torch.bfloat16, needs_grad=True, input_elements=large)
    assert fast.faster_on_cuda(model, torch.float32, needs_grad=False, input_elements=large)
    assert not fast.faster_on_cuda(model, torch.float32, needs_grad=True, input_elements=large)
    for dtype, needs_grad in [(torch.bfloat16, True), (torch.float32, False), (torch.bfloat16, False)]:
        assert not fast.faster_on_cuda(model, dtype, needs_grad, input_elements=small)
    layer = PerceiverLayer(32, 4, 2, 8)
    decoder = PerceiverLiteForMaskedLM(model_tester.get_config(data_shape=[8, 12], decoder_dim=8)).decoder
    for module in (layer, decoder):
        assert not fast.faster_on_cuda(module, torch.bfloat16, needs_grad=False, input_elements=large)
    assert fast.DEVICES == ("cpu", "cuda")  # mps, xpu...: no fast path proven there


def test_the_plan_records_every_route(model_tester):
    """One plan for the forward: the first cross-attend's query shared by the batch, the cross-attends on grid
    features narrower than a head (matmul attention: only the query needs a gradient), materialised keys and values
    under padding or checkpointing, and the feed-forward by autograd's state."""
    model = make_model(model_tester.get_config(cross_heads=1, layers_indice=[0, 1, 1])).train()
    plan = plan_of(model)
    assert [route.key_values for route in plan.cross_layers] == [fast.KeyValues.GRID] * 3
    assert [route.shared_query for route in plan.cross_layers] == [True, False, False]
    assert [route.shared_norm for route in plan.cross_layers] == [True, False, False]  # pre-norm
    assert plan.cross_layers[0].cross_attention is fast.Kernel.RECOMPUTED and plan.factored_inputs
    assert plan.latent_layer == fast.LayerRoute(self_attention=fast.Kernel.SDPA, feed_forward=fast.FeedForward.MODULE)
    masked = plan_of(model, attention_mask=padding_mask().flatten(1))
    assert masked.padded and {route.key_values for route in masked.cross_layers} == {fast.KeyValues.TENSORS}
    assert not plan_of(model, attention_mask=torch.ones(3, 64, dtype=torch.bool)).padded
    wide = make_model(model_tester.get_config(cross_heads=2))  # features wider than a head: the shared query's route
    assert [route.key_values for route in plan_of(wide).cross_layers] == [
        fast.KeyValues.SHARED_QUERY, fast.KeyValues.TENSORS, fast.KeyValues.TENSORS]  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan_of(model).latent_layer.self_attention is fast.Kernel.KEPT
    model.activation_checkpointing_enable()
    assert {route.key_values for route in plan_of(model).cross_layers} == {fast.KeyValues.TENSORS}


# ---------------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------------


def test_key_values_computed_once_per_unique_block(model_tester, monkeypatch):
    model = make_model(model_tester.get_config(layers_indice=[0, 1, 1, 1]))
    inputs = model_tester.prepare_inputs()
    calls = []
    project = fast.norm_and_project_concatenation
    monkeypatch.setattr(fast, "norm_and_project_concatenation", lambda *a, **k: calls.append(1) or project(*a, **k))
    model(inputs)
    assert calls == [1, 1]  # two unique blocks, four cross-attends


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

    (output,) = fast.norm_and_project_concatenation(data, positions, layer_norm, [linear])
    if norm:
        assert isinstance(output, fast.FactoredProjection)
        output = output.materialize()
    concatenated = torch.cat([data, positions.expand(batch_size, length, num_positions)], dim=-1)
    expected = linear(layer_norm(concatenated) if norm else concatenated)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)

    parameters = [data, *linear.parameters(), *(layer_norm.parameters() if norm else [])]
    upstream = torch.randn_like(expected)
    fast_grads = torch.autograd.grad(output, parameters, upstream)
    slow_grads = torch.autograd.grad(expected, parameters, upstream)
    for name, a, b in zip(["data", "weight", "bias", "norm.weight", "norm.bias"], fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def forward_saving(model, inputs, autocast_dtype=None):
    """The model's last hidden state (float32), and the shapes of the tensors its forward saved for backward."""
    shapes = []
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t),
        torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None),
    ):
        output = model(inputs).last_hidden_state.float()
    return output, shapes


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-autocast"])
@pytest.mark.parametrize("cross_heads", [2, 1], ids=["materialized", "grid-features"])
def test_fast_paths_keep_no_cross_attention_matrix_for_backward(model_tester, autocast_dtype, cross_heads):
    """Training saves tensors for the backward pass; the fast paths save no (latents x inputs) matrix, in float32
    (torch's fused kernel) as in half precision (`RecomputedAttention`), for materialised keys and values as for grid
    features. The eager reference does: the check sees the matrix where it exists."""
    config = model_tester.get_config(cross_heads=cross_heads)
    inputs = model_tester.prepare_inputs()
    num_latents, num_inputs = config.num_latent_tokens, inputs[0, 0].numel()

    def saved_attention_matrices(attn_implementation):
        output, shapes = forward_saving(make_model(config, attn_implementation).train(), inputs, autocast_dtype)
        output.sum().backward()
        return [shape for shape in shapes if shape[-2:] == (num_latents, num_inputs)]

    assert saved_attention_matrices("eager")
    assert not saved_attention_matrices("sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", list(fast.Kernel), ids=lambda kernel: kernel.name)
@pytest.mark.parametrize("is_cross_attention", [True, False], ids=["cross", "self"])
def test_half_precision_attention_is_safe(model_tester, kernel, is_cross_attention, dtype):
    """Half-precision `attend`: finite convex combinations of the values for logits far beyond the half-precision range
    of `exp`, on each of its routes."""
    config = model_tester.get_config()
    attention = PerceiverLiteAttention(config, "cross" if is_cross_attention else "self").eval()
    heads = attention.num_heads
    query = torch.randn(2, heads, 6, 8, dtype=dtype) * 40  # logits in the thousands: exp overflows
    key, value = torch.randn(2, heads, 10, 8, dtype=dtype) * 40, torch.randn(2, heads, 10, 8, dtype=dtype)
    output = fast.attend(attention, kernel, query, key, value, None).transpose(1, 2)
    assert torch.isfinite(output).all()
    low, high = value.amin(dim=2, keepdim=True), value.amax(dim=2, keepdim=True)  # (B, H, 1, D)
    assert ((output >= low - 1e-2) & (output <= high + 1e-2)).all()


@pytest.mark.parametrize(
    "scores_budget", [1, 30, 80, 1 << 22], ids=["one-row-one-sample", "two-rows", "all-rows-one-sample", "whole-batch"]
)
@pytest.mark.parametrize("mask_rows", [None, 1, 5], ids=["unmasked", "key-padding-mask", "per-row-mask"])
def test_recomputed_attention_matches_eager(mask_rows, scores_budget, monkeypatch):
    """`RecomputedAttention` equals the reference's `eager_attention_forward`, forward and backward (float64
    gradcheck, and float32 against the eager function), whatever blocks of query rows and samples it runs in."""
    monkeypatch.setattr(fast.RecomputedAttention, "SCORES_BUDGET", scores_budget)
    query = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    key = torch.randn(3, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(3, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    mask = None
    if mask_rows:
        mask = torch.rand(3, 1, mask_rows, 7) > 0.4
        mask[..., 0] = True
    apply = fast.RecomputedAttention.apply
    assert torch.autograd.gradcheck(lambda q, k, v: apply(q, k, v, mask, 0.5), (query, key, value))

    inputs = [tensor.detach().float().requires_grad_() for tensor in (query, key, value)]
    module = nn.Module()  # eager_attention_forward only reads `training`
    expected, _ = eager_attention_forward(module, *[t.detach().requires_grad_() for t in inputs], mask, scaling=0.5)
    torch.testing.assert_close(apply(*inputs, mask, 0.5).transpose(1, 2), expected, rtol=1e-5, atol=1e-6)


def test_recomputed_attention_computes_only_the_gradients_asked_for(monkeypatch):
    """With only the query needing a gradient, `RecomputedAttention`'s backward computes that gradient alone (one
    product written out instead of three), equal to the one of the full backward."""
    query, key, value = (torch.randn(3, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    products = []
    matmul_into = fast._matmul_into
    monkeypatch.setattr(fast, "_matmul_into", lambda *a, **k: products.append(1) or matmul_into(*a, **k))

    def backward_products(*inputs) -> int:
        output = fast.RecomputedAttention.apply(*inputs, None, 0.5)
        products.clear()
        output.sum().backward()
        return len(products)

    full = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    assert backward_products(*full) == 3
    assert backward_products(query.requires_grad_(), key, value) == 1
    torch.testing.assert_close(query.grad, full[0].grad)
    assert torch.autograd.gradcheck(lambda q: fast.RecomputedAttention.apply(q, key, value, None, 0.5), (query,))


def test_half_precision_self_attention_keeps_probabilities_within_the_scores_budget(model_tester, monkeypatch):
    """Under bfloat16 autocast each latent self-attention keeps its `(latents x latents)` probabilities for backward
    when they fit `KEPT_SCORES_BUDGET`, and recomputes them (keeping nothing of that size) when they do
    not; the gradients are the same. In float32 the fused kernel keeps none."""
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
    budget = probabilities_shape[0] * probabilities_shape[1] * 143
    monkeypatch.setattr(fast, "KEPT_SCORES_BUDGET", budget)
    recomputed, recomputed_gradients = kept_probabilities_and_gradients(autocast=True)
    assert recomputed == 0
    for name, gradient in kept_gradients.items():
        torch.testing.assert_close(recomputed_gradients[name], gradient, rtol=2e-2, atol=2e-3, msg=name)


def test_self_attention_single_product_matches_the_reference(model_tester):
    config = model_tester.get_config()
    config._attn_implementation = "sdpa"
    attention = PerceiverLiteAttention(config).eval()
    hidden_states = torch.randn(2, 6, config.dim)
    expected, _ = attention(hidden_states)
    for kernel in fast.Kernel:
        output = fast.self_attention(attention, kernel, hidden_states)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6, msg=kernel.name)


@pytest.mark.parametrize(
    "scores_budget", [1, 30, 100, 1 << 22], ids=["one-row-one-sample", "two-rows", "all-rows-one-sample", "whole-batch"]
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_shared_query_attention_matches_materialized_keys(masked, scores_budget, monkeypatch):
    """`SharedQueryAttention` equals softmax attention of the shared query to the materialised keys of a
    `FactoredProjection`, forward and backward (float64 gradcheck for every input, and against the eager function
    with the key bias included), whatever blocks of query rows and samples it runs in."""
    monkeypatch.setattr(fast.RecomputedAttention, "SCORES_BUDGET", scores_budget)
    batch_size, heads, num_latents, length, head_dim, channels, num_positions = 3, 2, 5, 7, 4, 3, 6
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()

    query = tensor(heads, num_latents, head_dim)
    data, positions = tensor(batch_size, length, channels + 1), tensor(length, num_positions)
    rstd = (torch.rand(batch_size, length, 1, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    weight_data = tensor(heads * head_dim, channels + 1, scale=0.5)
    weight_positions = tensor(heads * head_dim, num_positions, scale=0.5)
    bias, value = tensor(heads * head_dim), tensor(batch_size, heads, length, head_dim)
    mask = None
    if masked:
        mask = torch.rand(batch_size, 1, 1, length, generator=generator) > 0.4
        mask[..., 0] = True

    def shared(query, data, positions, rstd, weight_data, weight_positions, bias, value):
        query_data = query @ weight_data.view(heads, head_dim, -1)  # (H, N, C + 1)
        query_positions = query @ weight_positions.view(heads, head_dim, -1)  # (H, N, F)
        apply = fast.SharedQueryAttention.apply
        return apply(query_data, query_positions, data, positions, rstd[..., 0], bias, value, mask)

    def materialized(query, data, positions, rstd, weight_data, weight_positions, bias, value):
        keys = fast.FactoredProjection(data, positions, rstd, weight_data, weight_positions, bias).materialize()
        keys = keys.view(batch_size, length, heads, head_dim).transpose(1, 2)  # (B, H, M, D)
        module = nn.Module()  # eager_attention_forward only reads `training`
        output, _ = eager_attention_forward(module, query.expand(batch_size, -1, -1, -1), keys, value, mask, scaling=1.0)
        return output.transpose(1, 2)  # (B, H, N, D)

    inputs = (query, data, positions, rstd, weight_data, weight_positions, bias, value)
    assert torch.autograd.gradcheck(shared, inputs)
    torch.testing.assert_close(shared(*inputs), materialized(*inputs))
    upstream = torch.randn(batch_size, heads, num_latents, head_dim, dtype=torch.float64, generator=generator)
    fast_grads = torch.autograd.grad(shared(*inputs), inputs, upstream)
    slow_grads = torch.autograd.grad(materialized(*inputs), inputs, upstream)
    names = ["query", "data", "positions", "rstd", "weight_data", "weight_positions", "bias", "value"]
    for name, a, b in zip(names, fast_grads, slow_grads):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["shared-positions", "per-sample-positions"])
def test_only_the_first_cross_attend_shares_its_query(model_tester, masked, monkeypatch):
    """The latents are the same for every sample until their first cross-attend: that one (and only that one) runs as
    `SharedQueryAttention`, unless the position features differ per sample (padding)."""
    model = make_model(model_tester.get_config(layers_indice=[0, 0, 1]))
    calls = []
    apply = fast.SharedQueryAttention.apply
    monkeypatch.setattr(fast.SharedQueryAttention, "apply", lambda *args: calls.append(1) or apply(*args))
    model(model_tester.prepare_inputs(), attention_mask=padding_mask() if masked else None)
    assert len(calls) == (0 if masked else 1)


def grid_attention_setup(grid):
    """A float64 cross-attention with a non-trivial input norm, two heads wider than the grid's features, latents, and
    data channels with the Fourier features of `grid` shared by the batch."""
    generator = torch.Generator().manual_seed(0)
    config = PerceiverLiteConfig(
        data_shape=[3, *grid], num_latent_tokens=5, dim=16, heads=2, cross_heads=2, head_dim=24, num_bands=2,
        layers_indice=[0], num_latent_transformers_in_layers=[1],
    )  # fmt: skip
    config._attn_implementation = "sdpa"  # as a model sets it
    attention = PerceiverLiteAttention(config, "cross").double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3)
        attention.kv_norm.weight.add_(1)
    positions = PerceiverLiteFourierFeatures(config)(grid, dtype=torch.float64)  # (M, F)
    data = torch.randn(3, len(positions), 3, generator=generator, dtype=torch.float64) * 2 + 1  # (B, M, C)
    hidden_states = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    return attention, data, positions, hidden_states


def count_grid_attention(monkeypatch) -> list:
    """Calls of `grid_attention`, from now on."""
    calls, grid_attention = [], fast.grid_attention
    monkeypatch.setattr(fast, "grid_attention", lambda *a, **k: calls.append(1) or grid_attention(*a, **k))
    return calls


@pytest.mark.parametrize("grid", [(6,), (4, 5), (2, 3, 4)], ids=["1-D", "2-D", "3-D"])
@pytest.mark.parametrize("kernel", [fast.Kernel.RECOMPUTED, fast.Kernel.SDPA], ids=["matmul-attention", "fused-kernel"])
@pytest.mark.parametrize("case", ["plain", "masked", "data-gradient", "one-row-one-sample"])
def test_grid_attention_matches_the_reference(grid, kernel, case, monkeypatch):
    """For the Fourier features of a grid, attention to the grid features (`grid_attention`) equals the reference
    attention to the concatenated inputs, forward and backward (every parameter, the queries, and the data where it
    needs a gradient), with a key padding mask, on both attention routes, in any blocks of query rows and samples."""
    if case == "one-row-one-sample":
        monkeypatch.setattr(fast.RecomputedAttention, "SCORES_BUDGET", 1)
    attention, data, positions, hidden_states = grid_attention_setup(grid)
    data.requires_grad_(case == "data-gradient")
    mask = None
    if case == "masked":
        mask = torch.rand(3, 1, 1, len(positions), generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True
    calls = count_grid_attention(monkeypatch)
    inputs = [hidden_states, *attention.parameters(), *([data] if data.requires_grad else [])]

    def with_gradients(output):
        return output, torch.autograd.grad(output, inputs, torch.ones_like(output) + output.detach())

    key, value = fast.project_inputs(attention, data, positions, grid)
    route = fast.LayerRoute(key_values=fast.KeyValues.GRID, cross_attention=kernel)
    output, grads = with_gradients(fast.cross_attention(attention, route, hidden_states, key, value, mask))
    assert calls == [1]
    concatenated = torch.cat([data, positions.expand(3, -1, -1)], dim=-1)  # (B, M, C + F)
    expected, expected_grads = with_gradients(attention(hidden_states, concatenated, mask)[0])
    torch.testing.assert_close(output, expected)
    names = ["hidden_states", *(name for name, _ in attention.named_parameters()), "data"]
    for name, a, b in zip(names, grads, expected_grads):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    "case", ["grid", "per-sample-positions", "features-wider-than-heads", "eager", "checkpointing", "input-gradient"]
)
def test_grid_attention_serves_cross_attends_to_grid_features_narrower_than_a_head(model_tester, case, monkeypatch):
    """Every cross-attend to unpadded grid inputs runs on the grid features when they are narrower than a head (here
    `3 + 1 + 8 + 8 + 1` columns, 24 with padding, against heads of 32, or 16 with two heads), also for inputs that need
    a gradient; not with per-sample positions (padding), under gradient checkpointing (its arguments must be tensors)
    or in the eager reference."""
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
    assert len(calls) == (3 if case in ("grid", "input-gradient") else 0)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["grid-features", "per-sample-positions"])
def test_fused_kernels_as_on_a_gpu_match_the_cpu_paths(model_tester, autocast_dtype, masked, monkeypatch):
    """Off the CPU every attention takes torch's fused kernels (not in `OWN_KERNEL_DEVICES`): the cross-attends to
    the grid features (expanded along the heads, stride 0) and to per-sample positions included. Run here on the CPU's
    fused kernels, that plan gives the outputs and gradients of the CPU's own attention functions."""
    model = make_model(model_tester.get_config(cross_heads=1)).train()
    inputs, mask = model_tester.prepare_inputs(), padding_mask() if masked else None
    sdpa = nn.functional.scaled_dot_product_attention
    fused_calls = []
    monkeypatch.setattr(
        nn.functional, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k)
    )

    def run(fused: bool):
        monkeypatch.setattr(fast, "OWN_KERNEL_DEVICES", () if fused else ("cpu",))
        fused_calls.clear()
        return forward_and_gradients(model, inputs, mask, autocast_dtype)

    fast_output, fast_grads = run(fused=False)
    fused, fused_grads = run(fused=True)
    assert len(fused_calls) == model_tester.num_cross_attentions + model_tester.num_self_attention_layers
    tolerance = dict(rtol=0.05, atol=0.05) if autocast_dtype else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, fast_output, **tolerance)
    assert_close_gradients(fused_grads, fast_grads, **tolerance)


@pytest.mark.parametrize("hidden_act", fast.SERVED_ACTIVATIONS)
def test_feed_forward_activation_in_place_only_where_autograd_keeps_no_input(model_tester, hidden_act, monkeypatch):
    """Every served activation has an in-place form with the output of the module (the module still pickles:
    `torch.save` of a whole model, `copy.deepcopy`); the plan applies it where autograd records nothing, and not where
    autograd needs the activation's input, nor for a gated feed-forward."""
    mlp = PerceiverLiteMLP(model_tester.get_config(hidden_act=hidden_act))
    hidden_states = torch.randn(3, 5, model_tester.dim)
    expected = mlp(hidden_states)
    torch.testing.assert_close(pickle.loads(pickle.dumps(mlp))(hidden_states), expected, rtol=0, atol=0)
    in_place = fast.in_place_activation(mlp.act)
    assert in_place is not None
    act_calls = []
    monkeypatch.setattr(fast, "in_place_activation", lambda act: lambda x: act_calls.append(1) or in_place(x))
    with torch.no_grad():
        torch.testing.assert_close(fast.mlp(mlp, fast.FeedForward.IN_PLACE, None, hidden_states), expected, rtol=0, atol=0)
    assert act_calls == [1]
    for gated in (False, True):
        model = make_model(model_tester.get_config(hidden_act=hidden_act, gated_feed_forward=gated))
        with torch.no_grad():
            assert plan_of(model).latent_layer.feed_forward is (fast.FeedForward.MODULE if gated else fast.FeedForward.IN_PLACE)
        assert plan_of(model).latent_layer.feed_forward is fast.FeedForward.MODULE  # weights need gradients


def test_torch_compile_matches_eager_mode(model_tester):
    """`torch.compile` traces the reference (the fast paths step aside under tracing): the same outputs and gradients
    as the fast paths run eagerly."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    config = model_tester.get_config(layers_indice=[0, 0], num_latent_transformers_in_layers=[1], cross_heads=1)
    model = make_model(config)
    inputs = model_tester.prepare_inputs()
    compiled = torch.compile(model)  # the default backend, inductor
    torch.testing.assert_close(compiled(inputs).last_hidden_state, model(inputs).last_hidden_state,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    model.train()
    expected = gradients(model, model(inputs).last_hidden_state)
    output = gradients(model, compiled(inputs).last_hidden_state)
    for name in expected:
        torch.testing.assert_close(output[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def saved_for_backward(function, *args) -> list[torch.Size]:
    """The shapes of the tensors autograd keeps for the backward pass of `function(*args)`, parameters aside."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        output = function(*args)
    return output, shapes


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("hidden_act", fast.SERVED_ACTIVATIONS)
def test_training_feed_forward_recomputes_its_activation(model_tester, hidden_act, autocast_dtype, gated, monkeypatch):
    """Under autograd the recomputing feed-forward gives the module's output and the gradients of its input and
    parameters, and keeps one `(B, N, fc1 width)` tensor for backward where the module keeps two or more (the
    activation's input and output; gated, the gates and values too); the plan takes it from `RECOMPUTE_MIN_ELEMENTS`,
    the module below."""
    mlp = PerceiverLiteMLP(model_tester.get_config(hidden_act=hidden_act, gated_feed_forward=gated))
    hidden_states = torch.randn(3, 5, model_tester.dim, requires_grad=True)
    cotangent = torch.randn(3, 5, model_tester.dim)

    def run(function):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            output, saved = saved_for_backward(function, hidden_states)
        grads = torch.autograd.grad(output, [hidden_states, *mlp.parameters()], cotangent.to(output.dtype))
        return output, grads, [s for s in saved if s.numel() // s[-1] == 3 * 5 and s[-1] >= mlp.fc2.in_features]

    expected, expected_grads, expected_saved = run(mlp)
    output, grads, saved = run(functools.partial(fast.mlp, mlp, fast.FeedForward.RECOMPUTED, autocast_dtype))
    assert output.dtype == expected.dtype
    tolerance = dict(rtol=0, atol=0) if autocast_dtype is None else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(output, expected, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **(tolerance if autocast_dtype else dict(rtol=1e-5, atol=1e-6)))
    assert len(expected_saved) >= 2 and len(saved) == 1
    routes = fast._Routes(mlp, own_kernels=True, kept_dropout=False, half=False, needs_grad=True, checkpointing=False)
    monkeypatch.setattr(fast, "RECOMPUTE_MIN_ELEMENTS", 3 * 5 * mlp.fc1.out_features)
    assert routes.feed_forward(mlp, 3 * 5) is fast.FeedForward.RECOMPUTED
    monkeypatch.setattr(fast, "RECOMPUTE_MIN_ELEMENTS", 3 * 5 * mlp.fc1.out_features + 1)
    assert routes.feed_forward(mlp, 3 * 5) is fast.FeedForward.MODULE  # a smaller output: the module runs


# ---------------------------------------------------------------------------------------------------------------------
# The Perceiver IO heads: decoder, classifier_pooling="decoder" and encoder options against the reference
# ---------------------------------------------------------------------------------------------------------------------

from conftest import (  # noqa: E402
    ATOL,
    MODELS,
    PER_ELEMENT,
    PerceiverLiteModelTester,
    assert_same_logits_loss_and_gradients,
    labelled_inputs,
    make_head,
    logits_loss_and_gradients,
    tiny_config,
)


DECODER_QUERIES = {
    "fourier": {},
    "learned": {"decoder_query_type": "learned"},
    "query-inputs": {"decoder_query_inputs": True},
    "post-norm-no-ff": {"pre_norm": False, "decoder_ff_dim_scale": 0, "decoder_query_residual": False},
}


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("queries", DECODER_QUERIES)
@pytest.mark.parametrize("kind", PER_ELEMENT)
def test_fast_decoder_matches_the_reference(kind, queries, masked, autocast_dtype, monkeypatch):
    """The decoder runs the fast paths too (no reference attention is called), with the reference's outputs and
    gradients: queries shared by the batch (learned, or the Fourier positions of an unpadded input; normalised and
    projected once), per-sample ones (padded Fourier positions, query inputs), post-norm, without a feed-forward."""
    fields = DECODER_QUERIES[queries]
    fast = make_head(kind, **fields).train()
    reference = make_head(kind, tiny_config(kind, use_fast_paths=False, **fields), state_dict=fast.state_dict()).train()
    inputs = labelled_inputs(kind)
    if not masked:
        inputs.pop("attention_mask")
    calls = count_reference_attention(monkeypatch)

    def run(model):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return logits_loss_and_gradients(model, inputs)

    fast_run = run(fast)
    assert calls == []
    reference_run = run(reference)
    assert len(calls) == num_attentions(reference.config) + 1  # the encoder's, then the decoder's
    if autocast_dtype is None:
        assert_same_logits_loss_and_gradients(fast_run, reference_run)
        return
    # bfloat16: both runs round differently; each gradient within 5 % of its largest entry (post-norm gives some ~100)
    torch.testing.assert_close(fast_run[0], reference_run[0], rtol=0.05, atol=0.1)
    for name, expected in reference_run[2].items():
        error = (fast_run[2][name] - expected).abs().max()
        assert error <= 0.05 * expected.abs().max() + 1e-3, (name, error, expected.abs().max())


@pytest.mark.parametrize("kind", ["text", "image"])
def test_fast_decoder_pooling_matches_the_reference(kind, monkeypatch):
    """`classifier_pooling="decoder"`: the one learned query is shared by the batch; fast and reference agree."""
    tester = PerceiverLiteModelTester(kind)
    config = tester.get_config(classifier_pooling="decoder")
    fast = tester.model_class(config).train()
    reference = tester.model_class(copy.deepcopy(config)).train()
    reference.config.use_fast_paths = False
    reference.load_state_dict(fast.state_dict())
    inputs = {MODELS[kind].input_name: tester.prepare_main_input(3, (10,) if kind == "text" else None)}
    inputs["labels"] = torch.randint(0, 3, (3,))
    calls = count_reference_attention(monkeypatch)
    fast_run = logits_loss_and_gradients(fast, inputs)
    assert calls == []
    assert_same_logits_loss_and_gradients(fast_run, logits_loss_and_gradients(reference, inputs))


def _layer(model, block, index=None):
    blocks = model.perceiver.blocks
    return blocks[block].cross_layer if index is None else blocks[block].layers[index]


HEAD_ENCODER_OPTIONS = {
    "cross_attend_blocks": (
        {"cross_attend_blocks": [0]},
        lambda m: _layer(m, 1) is None and _layer(m, 0) is not None,
    ),
    "learned-positions-added": (
        {"position_encoding_type": "learned", "concat_positions": False},
        lambda m: m.perceiver.embeddings.position_embeddings.shape == (m.config.num_positions, m.config.data_shape[0])
        and m.config.cross_kv_dim == m.config.data_shape[0],
    ),
    "learned-positions-concatenated": (
        {"position_encoding_type": "learned", "position_dim": 6},
        lambda m: m.perceiver.embeddings.position_embeddings.shape[1] == 6
        and m.config.cross_kv_dim == m.config.data_shape[0] + 6,
    ),
    "input-projection": (
        {"input_projection_dim": 8},
        lambda m: m.perceiver.embeddings.input_projection.out_features == 8
        and _layer(m, 0).cross_attention.k_proj.in_features == 8 + m.config.num_position_features,
    ),
    "qk-v-widths": (
        {"qk_channels": 16, "v_channels": 24, "cross_qk_channels": 8, "cross_v_channels": 12, "cross_ff_dim": 20},
        lambda m: (_layer(m, 1, 0).self_attention.q_proj.out_features, _layer(m, 1, 0).self_attention.v_proj.out_features,
                   _layer(m, 0).cross_attention.q_proj.out_features, _layer(m, 0).cross_attention.v_proj.out_features,
                   _layer(m, 0).mlp.fc1.out_features, _layer(m, 1, 0).mlp.fc1.out_features) == (16, 24, 8, 12, 20, 128),
    ),  # fmt: skip
    "no-query-residual": ({"cross_attention_query_residual": False}, lambda m: not _layer(m, 0).query_residual),
    "first-block-self-attention-only": (
        {"cross_attend_blocks": [1]},
        lambda m: _layer(m, 0) is None and _layer(m, 1) is not None,
    ),
    "fourier-positions-added": (  # projected to the Fourier features' width, then added to them
        lambda kind: {"input_projection_dim": tiny_config(kind).num_position_features, "concat_positions": False},
        lambda m: m.config.cross_kv_dim == m.config.num_position_features and not m.perceiver.embeddings.concat_positions,
    ),
    "transformers-like": (
        {"layers_indice": [0, 1, 1], "num_latent_transformers_in_layers": [0, 2], "cross_attend_blocks": [0],
         "cross_attention_query_residual": False, "input_projection_dim": 8, "position_encoding_type": "learned",
         "concat_positions": False, "decoder_query_residual": False, "decoder_ff_dim_scale": 0, "decoder_heads": 2,
         "decoder_qk_channels": 8, "decoder_v_channels": 16},
        lambda m: m.decoder.layer.mlp is None and not m.decoder.layer.query_residual and len(m.perceiver.blocks[0].layers) == 0,
    ),  # fmt: skip
}


UNEQUAL_HEAD_WIDTHS = {"qk-v-widths"}


@pytest.mark.parametrize("option", HEAD_ENCODER_OPTIONS)
@pytest.mark.parametrize("kind", ["mlm", "dense"])
def test_heads_with_encoder_options_agree_with_the_reference(kind, option):
    """Each encoder option is built as configured and runs. Where the fast paths do not apply the model runs the
    reference itself (exactly `use_fast_paths=False`); where they do, they agree with it, outputs and gradients. Either
    way eager attention agrees and a padded sample gives its unpadded outputs."""
    fields, built_as_configured = HEAD_ENCODER_OPTIONS[option]
    fields = fields(kind) if callable(fields) else fields
    model = make_head(kind, **fields)
    assert built_as_configured(model)
    plan = fast.fast_plan(model.perceiver, torch.zeros(2, *model.config.data_shape))
    if option in UNEQUAL_HEAD_WIDTHS:
        assert plan is None
    reference = make_head(kind, tiny_config(kind, use_fast_paths=False, **fields), state_dict=model.state_dict())
    eager = make_head(kind, tiny_config(kind, **fields), "eager", state_dict=model.state_dict())
    inputs = labelled_inputs(kind)
    fast_run, reference_run = logits_loss_and_gradients(model, inputs), logits_loss_and_gradients(reference, inputs)
    if plan is None:
        assert torch.equal(fast_run[0], reference_run[0]) and torch.equal(fast_run[1], reference_run[1])
    assert_same_logits_loss_and_gradients(fast_run, reference_run)
    torch.testing.assert_close(eager(**inputs).logits, fast_run[0], rtol=0, atol=ATOL)
    # sample 1 alone, unpadded, gives the same outputs as in the padded batch
    with torch.no_grad():
        if kind == "dense":
            alone = model(inputs["pixel_values"][1:2, :, :4, :5]).logits
            torch.testing.assert_close(fast_run[0][1:2, :, :4, :5], alone, rtol=0, atol=ATOL)
        else:
            alone = model(inputs["input_ids"][1:2, :6]).logits
            torch.testing.assert_close(fast_run[0][1:2, :6], alone, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# The causal language model: keys and values of the context from per-token tables
# ---------------------------------------------------------------------------------------------------------------------


def causal_lm(**overrides) -> PerceiverLiteForCausalLM:
    """A tiny Perceiver AR, float32: context 24, latent window 8, vocabulary 40 (fewer than a batch's tokens, so the
    tables serve), block 1 cross-attending twice with shared weights, widths 16 (embeddings) and 24 (latents)."""
    fields = dict(
        data_shape=[16, 24], num_latent_tokens=8, dim=24, heads=2, cross_heads=2, layers_indice=[0, 1, 1],
        num_latent_transformers_in_layers=[1, 1], position_encoding_type="rotary", vocab_size=40,
        initializer_range=0.2, **overrides,
    )  # fmt: skip
    return PerceiverLiteForCausalLM(PerceiverLiteConfig(**fields))


def causal_ids(batch_size=3, length=24) -> torch.Tensor:
    return torch.randint(0, 40, (batch_size, length), generator=torch.Generator().manual_seed(1))


def causal_forward_and_gradients(model, input_ids, attention_mask=None, autocast_dtype=None):
    """The logits (float32) and the parameters' gradients of the loss, the random draws (dropout, prefix dropout)
    seeded alike for every call."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        output = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    output.loss.backward()
    return output.logits.float(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["float32", "left-padded", "prefix-dropout", "dropout", "bfloat16-autocast", "eval"])
def test_causal_lm_token_tables_equal_the_reference(case, monkeypatch):
    """The token-table keys and values give the reference's logits and gradients (the tied embedding's included):
    training and evaluation, left padding, prefix dropout and attention and feed-forward dropout (the same random
    draws), bfloat16 autocast; the cross-attentions' reference forward never runs."""
    overrides = {
        "prefix-dropout": dict(prefix_dropout=0.5),
        "dropout": dict(attention_dropout=0.2, ff_dropout=0.2),
    }.get(case, {})
    model = causal_lm(**overrides).train(case != "eval")
    input_ids, mask = causal_ids(), None
    if case == "left-padded":
        mask = torch.ones_like(input_ids)
        mask[0, :5] = 0
    autocast_dtype = torch.bfloat16 if case == "bfloat16-autocast" else None
    plan = fast.fast_plan(model, input_ids)
    assert plan is not None and plan.token_tables
    calls = count_reference_attention(monkeypatch)
    fast_logits, fast_grads = causal_forward_and_gradients(model, input_ids, mask, autocast_dtype)
    latent_layers = 3  # self-attention layers run: block 0's one, block 1's one twice
    assert len(calls) == latent_layers
    model.config.use_fast_paths = False
    logits, grads = causal_forward_and_gradients(model, input_ids, mask, autocast_dtype)
    assert len(calls) == 2 * latent_layers + 3  # and the three cross-attends
    tolerance = dict(rtol=0.05, atol=0.05) if autocast_dtype else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_logits, logits, **tolerance)
    assert_close_gradients(fast_grads, grads, **tolerance)


@pytest.mark.parametrize("sliding", [False, True], ids=["exact-cache", "sliding-cache"])
def test_causal_lm_generation_with_token_tables_equals_the_reference(sliding):
    """Greedy generation past the context (float32): the prompt's forward through the tables, then the cached steps,
    give the reference's tokens, with the exact cache and with the sliding one."""
    model = causal_lm().eval()
    prompt = causal_ids(length=20)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)

    def generate():
        cache = {"cache": PerceiverLiteSlidingCausalLMCache(model.config)} if sliding else {}
        return model.generate(prompt, **kwargs, **cache)

    tokens = generate()
    model.config.use_fast_paths = False
    assert torch.equal(tokens, generate())


def causal_lm_watched(model, case: str):
    """`model` changed as a user's tool would for `case`, where the tables must step aside."""
    attention = model.blocks[1].cross_layer.cross_attention
    if case == "lora-like-key-projection":
        attention.k_proj = LoraLikeLinear(attention.k_proj)
    elif case == "embedding-padding-idx":
        embeddings = nn.Embedding(40, 16, padding_idx=0)
        embeddings.weight.data.copy_(model.embeddings.weight.data)
        model.set_input_embeddings(embeddings)
        model.lm_head.weight = embeddings.weight
    elif case == "checkpointing":
        model.activation_checkpointing_enable()
    elif case == "eager":
        model.set_attn_implementation("eager")
    elif case == "forward-hook":
        attention.kv_norm.register_forward_hook(lambda module, args, output: output * 2)
    return model


@pytest.mark.parametrize(
    "case", ["few-tokens", "lora-like-key-projection", "embedding-padding-idx", "checkpointing", "eager", "forward-hook"]
)
def test_causal_lm_token_tables_step_aside(case, monkeypatch):
    """Fewer new tokens than the vocabulary (a generation step), a wrapped projection, an embedding whose gradient its
    options change, gradient checkpointing, eager attention or a hook: the reference runs, with the changed modules."""
    model = causal_lm_watched(causal_lm().train(), case)
    input_ids = causal_ids(batch_size=1, length=20) if case == "few-tokens" else causal_ids()
    reference = copy.deepcopy(model)
    reference.config.use_fast_paths = False
    assert fast.fast_plan(model, input_ids) is None
    calls = count_reference_attention(monkeypatch)
    logits, grads = causal_forward_and_gradients(model, input_ids)
    assert len(calls) == 6 * (2 if case == "checkpointing" else 1)
    expected_logits, expected_grads = causal_forward_and_gradients(reference, input_ids)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert_close_gradients(grads, expected_grads, rtol=0, atol=0)
