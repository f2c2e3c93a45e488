"""PerceiverLiteModel, the seed's PerceiverLayer and the Perceiver IO decoder on tiny configs: Fourier features, shapes,
outputs, weight sharing, padding invariance, attention backends, gradient checkpointing, save/load, the seed examples
and a training step; the decoder against a hand computation, and the Perceiver IO heads' backends, attention weights
and gradient checkpointing."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PER_ELEMENT,
    VOCAB_SIZE,
    PerceiverLiteModelTester,
    assert_same_logits_loss_and_gradients,
    labelled_inputs,
    logits_loss_and_gradients,
    make_head,
    tiny_config,
    token_ids,
)
from safetensors import safe_open
from transformers import AutoModel

from perceiver_lite import (
    PerceiverLayer,
    PerceiverLiteConfig,
    PerceiverLiteForImageClassification,
    PerceiverLiteModel,
)
from perceiver_lite.modeling_perceiver_lite import PerceiverLiteDecoder, PerceiverLiteLayer, PerceiverLiteMLP


ATOL = 1e-5


def make_model(config, attn_implementation="sdpa", state_dict=None):
    # `_from_config` sets the implementation on the config it gets: give each model its own
    model = PerceiverLiteModel._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def reference_position_features(spatial_shape, resolutions, num_bands, frequency_base):
    """Independent NumPy version of the paper's Fourier features: per axis `[x, sin(pi f x), cos(pi f x)]`,
    `x = linspace(-1, 1, n)`, bands linear from 1 (`frequency_base=None`) or geometric from `frequency_base` to
    `resolution / 2`; the axes' features concatenated, positions flattened row-major. `(M, axes * (2 bands + 1))`."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in spatial_shape], indexing="ij")
    per_axis = []
    for x, resolution in zip(grids, resolutions):
        nyquist = resolution / 2
        if frequency_base is None:
            bands = np.linspace(1, nyquist, num_bands)
        else:
            bands = np.geomspace(frequency_base, nyquist, num_bands)
        x = x.reshape(-1, 1)
        per_axis.append(np.concatenate([x, np.sin(np.pi * bands * x), np.cos(np.pi * bands * x)], axis=1))
    return torch.from_numpy(np.concatenate(per_axis, axis=1)).float()


def pad_and_mask(samples, padded_shape):
    """Pad channel-first samples `(C, *axes_i)` at the end of each axis to `(C, *padded_shape)` with noise (which the
    mask must hide). Returns inputs `(B, C, *padded_shape)` and the mask `(B, *padded_shape)`."""
    batch = torch.randn(len(samples), samples[0].shape[0], *padded_shape) * 100
    mask = torch.zeros(len(samples), *padded_shape, dtype=torch.long)
    for i, sample in enumerate(samples):
        region = tuple(slice(0, n) for n in sample.shape[1:])
        batch[(i, slice(None), *region)] = sample
        mask[(i, *region)] = 1
    return batch, mask


# ---------------------------------------------------------------------------------------------------------------------
# Fourier position features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frequency_base", [None, 2, 1.5])
@pytest.mark.parametrize("resolution", [16, [16, 10]])
def test_frequency_bands(frequency_base, resolution):
    config = PerceiverLiteConfig(data_shape=[1, 16, 10], dim=32, heads=4, num_bands=6, resolution=resolution,
                                 frequency_base=frequency_base)  # fmt: skip
    features = PerceiverLiteModel(config).embeddings.position_features
    for axis, res in enumerate(config.resolutions):
        bands = features.frequencies(axis, device="cpu").double().numpy()
        if frequency_base is None:  # the paper's spacing: linear from 1 to Nyquist
            expected = np.linspace(1, res / 2, 6)
        else:  # geometric from frequency_base to Nyquist
            expected = frequency_base * (res / 2 / frequency_base) ** (np.arange(6) / 5)
        np.testing.assert_allclose(bands, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("data_shape", "spatial_shape", "resolution", "frequency_base"),
    [
        ([2, 12], [12], 12, None),
        ([2, 12], [7], 12, 2),  # another length than data_shape's
        ([3, 8, 8], [8, 8], [8, 6], None),
        ([3, 8, 8], [5, 11], 8, 1.5),  # another resolution than data_shape's
        ([1, 3, 4, 5], [3, 4, 5], 6, None),
    ],
)
def test_fourier_features_match_reference(data_shape, spatial_shape, resolution, frequency_base):
    config = PerceiverLiteConfig(data_shape=data_shape, dim=32, heads=4, cross_heads=1, num_latent_tokens=4,
                                 layers_indice=[0], num_latent_transformers_in_layers=[1], num_bands=3,
                                 resolution=resolution, frequency_base=frequency_base)  # fmt: skip
    model = make_model(config)
    inputs = torch.randn(2, data_shape[0], *spatial_shape)
    embeds = model.embeddings(inputs)
    num_positions = math.prod(spatial_shape)
    assert embeds.shape == (2, num_positions, config.cross_kv_dim)
    # data channels first, in row-major position order, then the position features
    torch.testing.assert_close(embeds[..., : data_shape[0]], inputs.flatten(2).transpose(1, 2), rtol=0, atol=0)
    reference = reference_position_features(spatial_shape, config.resolutions, 3, frequency_base)
    torch.testing.assert_close(embeds[0, :, data_shape[0] :], reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds[1, :, data_shape[0] :], reference, rtol=0, atol=1e-5)
    # and the model runs on exactly those embeddings
    reference_embeds = torch.cat([inputs.flatten(2).transpose(1, 2), reference.expand(2, -1, -1)], dim=-1)
    torch.testing.assert_close(
        model(inputs).last_hidden_state, model(inputs_embeds=reference_embeds).last_hidden_state, rtol=0, atol=1e-4
    )


def test_fourier_features_are_cached_per_shape(model_tester):
    model = make_model(model_tester.get_config())
    features = model.embeddings.position_features
    first = features([8, 8], device=torch.device("cpu"))
    assert features([8, 8], device=torch.device("cpu")) is first  # reused, not rebuilt
    other = features([4, 6], device=torch.device("cpu"))
    assert other.shape == (24, first.shape[1])
    again = features([8, 8], device=torch.device("cpu"))
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # rebuilt for the shape, identical
    assert features([8, 8], device=torch.device("cpu"), dtype=torch.float64).dtype == torch.float64
    assert not any("position" in key for key in model.state_dict())  # derived, never saved


def test_fourier_features_correct_after_from_pretrained(model_tester, tmp_path):
    config = model_tester.get_config()
    model = make_model(config)
    inputs = model_tester.prepare_inputs()
    expected = model(inputs).last_hidden_state
    model.save_pretrained(tmp_path)

    loaded = PerceiverLiteModel.from_pretrained(tmp_path).eval()  # built on the meta device, then loaded
    embeds = loaded.embeddings(inputs)
    reference = reference_position_features(config.data_shape[1:], config.resolutions, config.num_bands, None)
    torch.testing.assert_close(embeds[0, :, config.data_shape[0] :], reference, rtol=0, atol=1e-5)
    # the same weights; matmul kernels may round differently on the memory-mapped (differently aligned) tensors
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(loaded(inputs).last_hidden_state, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and outputs
# ---------------------------------------------------------------------------------------------------------------------


OTHER_SPATIAL_SHAPES = {1: [[12], [5], [31]], 2: [[8, 8], [5, 11], [16, 3]], 3: [[4, 6, 6], [2, 5, 3], [5, 3, 8]]}


def test_output_shapes(model_tester_nd):
    config = model_tester_nd.get_config()
    model = make_model(config)
    batch, num_latents, dim = model_tester_nd.batch_size, config.num_latent_tokens, config.dim
    for spatial_shape in OTHER_SPATIAL_SHAPES[config.num_axes]:
        outputs = model(model_tester_nd.prepare_inputs(spatial_shape))
        assert outputs.last_hidden_state.shape == (batch, num_latents, dim)
        assert outputs.pooler_output.shape == (batch, dim)
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))
        assert torch.isfinite(outputs.last_hidden_state).all()


def test_outputs_depend_on_every_sample_separately(model_tester):
    model = make_model(model_tester.get_config())
    inputs = model_tester.prepare_inputs()
    outputs = model(inputs).last_hidden_state
    changed = inputs.clone()
    changed[1] += torch.randn_like(changed[1])
    changed_outputs = model(changed).last_hidden_state
    torch.testing.assert_close(changed_outputs[[0, 2]], outputs[[0, 2]], rtol=0, atol=ATOL)
    assert not torch.allclose(changed_outputs[1], outputs[1], atol=1e-3)


def test_inputs_embeds_matches_inputs(model_tester):
    model = make_model(model_tester.get_config())
    inputs = model_tester.prepare_inputs()
    mask = torch.ones(3, 8, 8, dtype=torch.long)
    mask[0, 6:] = 0
    embeds, flat_mask = model.embeddings(inputs, mask.bool()), mask.flatten(1)  # (B, M, C + F), (B, M)
    assert embeds.shape == (3, 64, model.config.cross_kv_dim)
    torch.testing.assert_close(
        model(inputs_embeds=embeds, attention_mask=flat_mask).last_hidden_state,
        model(inputs, attention_mask=mask).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )  # the `inputs` path projects data and positions without concatenating them: equal up to rounding
    with pytest.raises(ValueError, match="exactly one of `inputs` and `inputs_embeds`"):
        model(inputs, inputs_embeds=embeds)


def test_hidden_states_and_attentions(model_tester):
    config = model_tester.get_config()
    model = make_model(config, "eager")
    batch, num_latents, num_positions = model_tester.batch_size, config.num_latent_tokens, 64
    outputs = model(model_tester.prepare_inputs(), output_hidden_states=True, output_attentions=True)

    # the latents before, then after every cross-attend and every self-attention layer
    num_steps = model_tester.num_cross_attentions + model_tester.num_self_attention_layers
    assert len(outputs.hidden_states) == 1 + num_steps == 9
    assert all(h.shape == (batch, num_latents, config.dim) for h in outputs.hidden_states)
    torch.testing.assert_close(outputs.hidden_states[0], model.latents.expand(batch, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(outputs.hidden_states[-1], outputs.last_hidden_state, rtol=0, atol=0)

    assert len(outputs.attentions) == model_tester.num_self_attention_layers == 5
    assert len(outputs.cross_attentions) == model_tester.num_cross_attentions == 3
    for attentions, heads, keys in (
        (outputs.attentions, config.heads, num_latents),
        (outputs.cross_attentions, config.cross_heads, num_positions),
    ):
        for weights in attentions:
            assert weights.shape == (batch, heads, num_latents, keys)
            torch.testing.assert_close(weights.sum(-1), torch.ones(batch, heads, num_latents))

    plain = model(model_tester.prepare_inputs())
    assert plain.hidden_states is None and plain.attentions is None and plain.cross_attentions is None


def test_output_flags_from_config(model_tester):
    config = model_tester.get_config(output_hidden_states=True, output_attentions=True)
    outputs = make_model(config, "eager")(model_tester.prepare_inputs())
    assert len(outputs.hidden_states) == 9 and len(outputs.attentions) == 5


def test_return_dict_false(model_tester):
    model = make_model(model_tester.get_config())
    inputs = model_tester.prepare_inputs()
    outputs = model(inputs)
    as_tuple = model(inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], outputs.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], outputs.pooler_output, rtol=0, atol=0)
    with_hidden = model(inputs, return_dict=False, output_hidden_states=True)
    assert len(with_hidden) == 3 and len(with_hidden[2]) == 9


def test_initialisation(model_tester):
    config = model_tester.get_config(num_latent_tokens=256, dim=64, initializer_range=0.05,
                                     latent_initializer_range=None)  # fmt: skip
    model = PerceiverLiteModel(config)
    assert abs(model.latents.std().item() - 0.05) < 0.01
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.05) < 0.015, name
            assert torch.all(module.bias == 0), name
        elif isinstance(module, torch.nn.LayerNorm) and not name.endswith("kv_norm"):  # kv_norm: its own test below
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    own_scale = PerceiverLiteModel(model_tester.get_config(num_latent_tokens=256, dim=64, initializer_range=0.05,
                                                            latent_initializer_range=0.25))  # fmt: skip
    assert abs(own_scale.latents.std().item() - 0.25) < 0.03
    assert abs(own_scale.blocks[0].cross_layer.cross_attention.q_proj.weight.std().item() - 0.05) < 0.015
    # the config defaults: weights at (3 x 64)^-0.5, latents at 0.25
    defaults = PerceiverLiteModel(model_tester.get_config(num_latent_tokens=256, dim=64, initializer_range=None,
                                                          latent_initializer_range=0.25))  # fmt: skip
    assert abs(defaults.latents.std().item() - 0.25) < 0.03
    assert abs(defaults.blocks[0].layers[0].mlp.fc1.weight.std().item() - 0.072) < 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inputs=torch.randn(3, 2, 8, 8)), r"`inputs` must have shape \[B, C=3"),
        (dict(inputs=torch.randn(3, 3, 8)), r"`inputs` must have shape .*got shape \[3, 3, 8\]"),
        (dict(inputs=torch.randn(3, 3, 8, 8), attention_mask=torch.ones(3, 8)), r"`attention_mask` must have shape"),
        (dict(inputs_embeds=torch.randn(3, 10, 5)), r"`inputs_embeds` must have shape \[B, M, cross_kv_dim=21\]"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(model_tester, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(model_tester.get_config())(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Weight sharing
# ---------------------------------------------------------------------------------------------------------------------


def test_shared_block_is_stored_once(model_tester, tmp_path):
    model = make_model(model_tester.get_config())
    keys = set(model.state_dict())
    assert {key.split(".")[1] for key in keys if key.startswith("blocks.")} == {"0", "1"}
    assert len(keys) == len({id(p) for p in model.parameters()})  # one entry per distinct parameter

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        saved = set(file.keys())
        assert saved == keys
        for key in saved:
            torch.testing.assert_close(file.get_tensor(key), model.state_dict()[key], rtol=0, atol=0)


def test_repeated_steps_run_the_same_block(model_tester):
    model = make_model(model_tester.get_config())
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append((index, id(module))))
    model(model_tester.prepare_inputs())
    assert [index for index, _ in calls] == model_tester.layers_indice == [0, 1, 1]
    assert calls[1][1] == calls[2][1] == id(model.blocks[1])


def test_shared_model_equals_unshared_copies(model_tester):
    """`[0, 1, 1]` over two blocks computes what `[0, 1, 2]` over three does when block 2 holds a copy of block 1."""
    config = model_tester.get_config()
    shared = make_model(config)
    unshared_config = model_tester.get_config(layers_indice=[0, 1, 2], num_latent_transformers_in_layers=[1, 2, 2])
    state_dict = shared.state_dict()
    copies = {k.replace("blocks.1.", "blocks.2."): v for k, v in state_dict.items() if k.startswith("blocks.1.")}
    unshared = make_model(unshared_config, state_dict={**state_dict, **copies})
    inputs = model_tester.prepare_inputs()
    expected = shared(inputs).last_hidden_state
    torch.testing.assert_close(unshared(inputs).last_hidden_state, expected, rtol=0, atol=ATOL)
    with torch.no_grad():
        unshared.blocks[2].layers[1].mlp.fc2.bias.add_(torch.randn(config.dim))  # the copies now differ
    assert not torch.allclose(unshared(inputs).last_hidden_state, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Padding invariance
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("data_shape", "sample_shapes", "padded_shape"),
    [
        ([2, 12], [[12], [9], [4]], [12]),
        ([3, 8, 8], [[8, 8], [6, 5], [3, 7]], [8, 8]),
        ([3, 8, 8], [[5, 5], [2, 8], [7, 1]], [9, 10]),  # every sample padded
        ([2, 4, 6, 6], [[4, 6, 6], [2, 5, 3], [3, 1, 6]], [4, 6, 6]),
    ],
    ids=["1d", "2d", "2d-all-padded", "3d"],
)
def test_padding_invariance(attn_implementation, data_shape, sample_shapes, padded_shape):
    config = PerceiverLiteModelTester(data_shape=data_shape).get_config()
    model = make_model(config, attn_implementation)
    samples = [torch.randn(data_shape[0], *shape) for shape in sample_shapes]
    expected = torch.cat([model(sample[None]).last_hidden_state for sample in samples])  # each alone, unpadded

    inputs, mask = pad_and_mask(samples, padded_shape)
    for attention_mask in (mask, mask.flatten(1), mask.bool()):  # (B, *axes), (B, M), boolean
        outputs = model(inputs, attention_mask=attention_mask).last_hidden_state
        torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-4)

    unmasked = model(inputs).last_hidden_state
    assert not torch.allclose(unmasked[1], expected[1], atol=1e-2)  # the mask is what makes them agree


def test_fully_masked_sample_stays_finite_and_alone(model_tester):
    """A sample with no valid element gets finite latents, equal under eager and sdpa, and leaves the others alone."""
    config = model_tester.get_config()
    sdpa = make_model(config, "sdpa")
    eager = make_model(config, "eager", state_dict=sdpa.state_dict())
    inputs = model_tester.prepare_inputs()
    mask = torch.ones(3, 8, 8)
    mask[1] = 0
    outputs = sdpa(inputs, attention_mask=mask).last_hidden_state
    assert torch.isfinite(outputs).all()
    torch.testing.assert_close(eager(inputs, attention_mask=mask).last_hidden_state, outputs, rtol=0, atol=ATOL)
    torch.testing.assert_close(outputs[[0, 2]], sdpa(inputs[[0, 2]]).last_hidden_state, rtol=0, atol=ATOL)


def test_full_mask_equals_no_mask(model_tester):
    model = make_model(model_tester.get_config())
    inputs = model_tester.prepare_inputs()
    torch.testing.assert_close(
        model(inputs, attention_mask=torch.ones(3, 8, 8)).last_hidden_state,
        model(inputs).last_hidden_state,
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Attention backends and gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------


def outputs_and_gradients(model, inputs, attention_mask=None):
    inputs = inputs.clone().requires_grad_()
    model.zero_grad()
    outputs = model(inputs, attention_mask=attention_mask).last_hidden_state
    (outputs * torch.linspace(-1, 1, outputs.shape[-1])).sum().backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    return outputs.detach(), inputs.grad, gradients


def assert_same_outputs_and_gradients(first, second, atol=ATOL):
    (out1, input_grad1, grads1), (out2, input_grad2, grads2) = first, second
    torch.testing.assert_close(out1, out2, rtol=0, atol=atol)
    torch.testing.assert_close(input_grad1, input_grad2, rtol=0, atol=atol)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        if not name.endswith("k_proj.bias"):  # shifts each row of scores by a constant: its true gradient is 0
            assert grads1[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("masked", [False, True])
def test_eager_and_sdpa_agree(model_tester, masked):
    config = model_tester.get_config()
    sdpa = make_model(config, "sdpa")
    eager = make_model(config, "eager", state_dict=sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    inputs = model_tester.prepare_inputs()
    mask = None
    if masked:
        mask = torch.ones(3, 8, 8)
        mask[0, 5:] = 0
        mask[2, :, 3:] = 0
    assert_same_outputs_and_gradients(
        outputs_and_gradients(sdpa, inputs, mask), outputs_and_gradients(eager, inputs, mask)
    )


def test_default_attention_is_sdpa(model_tester):
    assert PerceiverLiteModel(model_tester.get_config()).config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "enable, kwargs",
    [
        ("gradient_checkpointing_enable", {}),
        ("gradient_checkpointing_enable", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}),
        ("activation_checkpointing_enable", {}),
    ],
    ids=["gradient_checkpointing_enable", "reentrant", "activation_checkpointing_enable"],
)
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_checkpointing(model_tester, enable, kwargs, masked):
    config = model_tester.get_config()
    reference = make_model(config).train()  # dropout is 0: training mode is deterministic
    checkpointed = make_model(config, state_dict=reference.state_dict()).train()
    getattr(checkpointed, enable)(**kwargs)
    assert checkpointed.is_activation_checkpointing

    # with checkpointing, each layer's forward (here its feed-forward) runs again during the backward pass
    layer = checkpointed.blocks[0].layers[0]
    assert isinstance(layer, PerceiverLiteLayer) and layer.gradient_checkpointing
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append("mlp"))
    inputs = model_tester.prepare_inputs()
    mask = None
    if masked:
        mask = torch.ones(3, 8, 8)
        mask[1, 4:] = 0
    assert_same_outputs_and_gradients(
        outputs_and_gradients(reference, inputs, mask), outputs_and_gradients(checkpointed, inputs, mask)
    )
    assert calls == ["mlp", "mlp"]  # the forward, then its recomputation


@pytest.mark.parametrize("hidden_act, activation", [("gelu", F.gelu), ("silu", F.silu)])
def test_gated_feed_forward_multiplies_values_by_activated_gates(model_tester, hidden_act, activation):
    """`gated_feed_forward`: `fc1` gives `2 ff_dim` outputs, values then gates; the hidden units are
    `values * act(gates)` (GEGLU, SwiGLU), `fc2` reads `ff_dim` of them."""
    config = model_tester.get_config(gated_feed_forward=True, hidden_act=hidden_act, ff_dim=20)
    mlp = PerceiverLiteMLP(config)
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (40, 20)
    x = torch.randn(2, 3, config.dim)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    expected = (hidden[..., :20] * activation(hidden[..., 20:])) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    plain = PerceiverLiteMLP(model_tester.get_config(hidden_act=hidden_act, ff_dim=20))
    assert (plain.fc1.out_features, plain.fc2.in_features) == (20, 20)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_give_identical_outputs(model_tester, tmp_path):
    config = model_tester.get_config(pre_norm=False, head_dim=12, ff_dim=20)
    model = make_model(config)
    inputs = model_tester.prepare_inputs()
    mask = torch.ones(3, 64)
    mask[2, 40:] = 0
    expected = model(inputs, attention_mask=mask).last_hidden_state
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in saved and not {name for name in saved if name.endswith((".bin", ".pt", ".pth"))}

    loaded, info = PerceiverLiteModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    auto = AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(auto) is PerceiverLiteModel and auto.config._attn_implementation == "eager"
    for restored in (loaded.eval(), auto.eval()):
        assert restored.config.to_dict().keys() == model.config.to_dict().keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)
    # matmul kernels may round differently on the memory-mapped (differently aligned) tensors
    torch.testing.assert_close(loaded(inputs, attention_mask=mask).last_hidden_state, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto(inputs, attention_mask=mask).last_hidden_state, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# The seed's PerceiverLayer
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_perceiver_layer_example(capsys):
    q = torch.randn(1, 32, 512)
    k = torch.randn(1, 32, 512)
    v = torch.randn(1, 32, 512)
    layer = PerceiverLayer(512, 8, 6, 64)
    print(layer(q, k, v).shape)
    assert capsys.readouterr().out == "torch.Size([1, 32, 512])\n"
    assert len(layer.layers) == 6
    attention = layer.layers[0].self_attention
    assert (attention.num_heads, attention.head_dim, attention.q_proj.out_features) == (8, 64, 512)


def tiny_layer(depth=2, **kwargs):
    return PerceiverLayer(32, 4, depth, 8, **kwargs).eval()


def test_perceiver_layer_depth_is_honoured():
    deep, shallow = tiny_layer(depth=3), tiny_layer(depth=2)
    assert len(deep.layers) == 3 and len(shallow.layers) == 2
    shallow.load_state_dict(deep.state_dict(), strict=False)  # the first two layers are the same
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    expected = deep.layers[2](shallow(q, k, v), torch.cat([k, v], 1))
    torch.testing.assert_close(deep(q, k, v), expected, rtol=0, atol=ATOL)
    assert not torch.allclose(deep(q, k, v), shallow(q, k, v), atol=1e-3)


def test_perceiver_layer_ff_mult_dim_head_and_dropout():
    layer = PerceiverLayer(32, 4, 1, 8, ff_mult=3)
    assert layer.layers[0].mlp.fc1.out_features == 96
    assert layer.layers[0].self_attention.q_proj.out_features == 4 * 8
    assert layer.layers[0].cross_attention.k_proj.out_features == 4 * 8

    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    layer = PerceiverLayer(32, 4, 1, 8, dropout=0.5, ff_dropout=0.5).train()
    assert not torch.allclose(layer(q, k, v), layer(q, k, v))  # dropout active in training
    layer.eval()
    torch.testing.assert_close(layer(q, k, v), layer(q, k, v), rtol=0, atol=0)


def test_perceiver_layer_is_not_causal_and_follows_q():
    layer = tiny_layer()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    outputs = layer(q, k, v)
    assert outputs.shape == (2, 5, 32)  # the query's length, not the context's
    changed_q = q.clone()
    changed_q[:, -1] += torch.randn(2, 32)  # not a constant: LayerNorm would remove that
    assert not torch.allclose(layer(changed_q, k, v)[:, 0], outputs[:, 0], atol=1e-4)  # a later token moves the first
    changed_k = k.clone()
    changed_k[:, 3] += torch.randn(2, 32)
    assert not torch.allclose(layer(q, changed_k, v), outputs, atol=1e-4)  # the context is attended to
    assert layer(torch.randn(2, 3, 32), torch.randn(2, 7, 32), torch.randn(2, 4, 32)).shape == (2, 3, 32)


@pytest.mark.parametrize("mask_shape", ["B,Lk", "B,Lq,Lk", "B,Lk+Lv", "B,Lq,Lk+Lv"])
def test_perceiver_layer_mask_equals_removing_tokens(mask_shape):
    layer = tiny_layer()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    keep_k = [torch.tensor([0, 1, 2, 3, 5]), torch.tensor([1, 2, 4, 6])]  # per sample
    keep_v = keep_k if mask_shape in ("B,Lk", "B,Lq,Lk") else [torch.tensor([0, 6]), torch.tensor([0, 1, 2, 3, 4, 5])]
    k_mask, v_mask = torch.zeros(2, 7, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    for i in range(2):
        k_mask[i, keep_k[i]] = True
        v_mask[i, keep_v[i]] = True
    mask = k_mask if mask_shape in ("B,Lk", "B,Lq,Lk") else torch.cat([k_mask, v_mask], dim=1)
    if mask_shape.startswith("B,Lq"):
        mask = mask[:, None].expand(-1, 5, -1)

    outputs = layer(q, k, v, mask=mask)
    for i in range(2):
        removed = layer(q[i : i + 1], k[i : i + 1, keep_k[i]], v[i : i + 1, keep_v[i]])
        torch.testing.assert_close(outputs[i : i + 1], removed, rtol=0, atol=ATOL)
    assert not torch.allclose(outputs, layer(q, k, v), atol=1e-4)  # the mask changes the output


def test_perceiver_layer_per_query_mask():
    """A `[B, Lq, Lk]` mask applies per query token: query 0 sees only key/value 0, the others see everything."""
    layer = tiny_layer(depth=1)
    q, k, v = torch.randn(1, 3, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1:] = False
    outputs = layer(q, k, v, mask=mask)
    unmasked = layer(q, k, v)
    assert not torch.allclose(outputs[:, 0], unmasked[:, 0], atol=1e-4)
    torch.testing.assert_close(outputs[:, 1:], unmasked[:, 1:], rtol=0, atol=ATOL)


def test_perceiver_layer_bad_mask_raises():
    layer = tiny_layer()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 6, 32)
    with pytest.raises(ValueError, match=r"`mask` must have shape \[2, 13\] or \[2, 5, 13\], got \[2, 7\]"):
        layer(q, k, v, mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"`k` must have shape"):
        layer(q, torch.randn(2, 7, 16), v)


def test_perceiver_layer_runs_inputs_of_another_float_dtype_in_its_weights_dtype():
    """As the model: float64 inputs run in float32 weights, float32 inputs in a bfloat16 layer; values the weights'
    dtype cannot hold are an error naming the argument."""
    layer = tiny_layer().eval()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(q.double(), k.double(), v), layer(q, k, v))
        layer.to(torch.bfloat16)
        assert layer(q, k, v).dtype == torch.bfloat16
    layer.to(torch.float16)
    with pytest.raises(ValueError, match=r"`k` contains NaN or Inf values \(or values beyond the range of"):
        layer(q, k * 1e5, v)  # finite in float32, not in float16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(depth=0), r"`depth` must be a positive integer, got 0"),
        (dict(heads=0), r"`heads` must be a positive integer"),
        (dict(dim_head=2.5), r"`dim_head` must be a positive integer"),
        (dict(dropout=1.0), r"`dropout` must be in \[0, 1\)"),
        (dict(ff_dropout=-0.1), r"`ff_dropout` must be in \[0, 1\)"),
        (dict(ff_mult=0), r"`ff_mult` must be positive"),
    ],
)
def test_perceiver_layer_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerceiverLayer(**{"dim": 32, "heads": 4, "depth": 1, "dim_head": 8, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss(model_tester):
    config, inputs, labels = model_tester.prepare_config_and_inputs()
    model = PerceiverLiteForImageClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(16):
        loss = model(inputs, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # Adam on 3 samples may overshoot a step; the loss still falls, and keeps falling in the second half
    assert losses[-1] < 0.7 * losses[0], losses
    assert min(losses[8:]) < min(losses[:8]), losses


def test_data_channels_get_the_positions_share_of_the_input_norm(tmp_path):
    """A fresh model's cross-attention input norm weighs the `C` data channels by sqrt(F / C) against the `F` position
    channels (see `_init_data_channel_gain`); loading keeps the saved weights; added positions keep gain 1."""
    config = PerceiverLiteModelTester(data_shape=[2, 8, 8]).get_config()
    model = PerceiverLiteModel(config)
    channels, features = 2, config.num_position_features
    for block in model.blocks:
        weight = block.cross_layer.cross_attention.kv_norm.weight
        torch.testing.assert_close(weight[:channels], torch.full((channels,), (features / channels) ** 0.5))
        torch.testing.assert_close(weight[channels:], torch.ones(features))
    with torch.no_grad():
        model.blocks[0].cross_layer.cross_attention.kv_norm.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = PerceiverLiteModel.from_pretrained(tmp_path)
    assert (loaded.blocks[0].cross_layer.cross_attention.kv_norm.weight == 0.5).all()
    added = PerceiverLiteModel(
        PerceiverLiteModelTester(data_shape=[2, 8, 8]).get_config(position_encoding_type="learned", concat_positions=False)
    )
    assert (added.blocks[0].cross_layer.cross_attention.kv_norm.weight == 1).all()


# ---------------------------------------------------------------------------------------------------------------------
# Decoder (Perceiver IO)
# ---------------------------------------------------------------------------------------------------------------------


def test_learned_queries_are_the_top_left_rows_of_the_nominal_grid():
    """With learned queries an input smaller than nominal takes the queries of its own positions."""
    model = make_head("dense", decoder_query_type="learned")
    decoder = model.decoder
    assert decoder.queries.shape == (64, model.config.decoder_width) and decoder.query_proj is None
    queries = decoder.output_queries(2, (3, 5))
    expected = decoder.queries.view(8, 8, -1)[:3, :5].reshape(15, -1)
    assert queries.shape == (2, 15, model.config.decoder_width)
    torch.testing.assert_close(queries[1], expected, rtol=0, atol=0)


def test_decoder_width_and_channels_follow_the_config():
    config = tiny_config("token", decoder_dim=24, decoder_heads=2, decoder_qk_channels=8, decoder_v_channels=12,
                         decoder_ff_dim_scale=2)  # fmt: skip
    decoder = PerceiverLiteDecoder(config)
    attention = decoder.layer.cross_attention
    assert (attention.q_proj.in_features, attention.q_proj.out_features) == (24, 8)
    assert (attention.k_proj.in_features, attention.v_proj.out_features, attention.o_proj.out_features) == (32, 12, 24)
    assert attention.num_heads == 2 and decoder.layer.mlp.fc1.out_features == 48
    assert decoder.query_proj.in_features == config.num_position_features
    outputs, weights = decoder(torch.randn(2, 8, 32), torch.randn(2, config.data_shape[0], 7))
    assert outputs.shape == (2, 7, 24) and weights is None
    assert PerceiverLiteDecoder(tiny_config("token", decoder_ff_dim_scale=0)).layer.mlp is None


def reference_decoder(decoder, latents, queries, config):
    """Perceiver IO's decoder layer written out: queries attend to the latents (keys/values from the normalised
    latents where pre-norm), the optional query residual, then the optional feed-forward; pre- or post-norm."""
    layer, attention = decoder.layer, decoder.layer.cross_attention
    heads = config.decoder_heads

    def split(x):  # (B, L, H * d) -> (B, H, L, d)
        return x.view(*x.shape[:2], heads, -1).transpose(1, 2)

    def attend(x):
        kv = attention.kv_norm(latents) if config.pre_norm else latents
        q, k, v = split(attention.q_proj(x)), split(attention.k_proj(kv)), split(attention.v_proj(kv))
        probabilities = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return attention.o_proj((probabilities @ v).transpose(1, 2).flatten(2))

    def mlp(x):
        return layer.mlp.fc2(F.gelu(layer.mlp.fc1(x)))

    if config.pre_norm:
        x = attend(layer.cross_attention_norm(queries)) + (queries if config.decoder_query_residual else 0)
        return x if layer.mlp is None else x + mlp(layer.mlp_norm(x))
    x = layer.cross_attention_norm(attend(queries) + (queries if config.decoder_query_residual else 0))
    return x if layer.mlp is None else layer.mlp_norm(x + mlp(x))


@pytest.mark.parametrize(
    "fields",
    [{}, {"decoder_heads": 2, "decoder_dim": 24, "decoder_qk_channels": 8, "decoder_v_channels": 16},
     {"decoder_query_residual": False}, {"decoder_ff_dim_scale": 0}, {"pre_norm": False},
     {"pre_norm": False, "decoder_query_residual": False, "decoder_ff_dim_scale": 2}],
    ids=["default", "heads-widths", "no-residual", "no-ff", "post-norm", "post-norm-no-residual"],
)  # fmt: skip
@pytest.mark.parametrize("query_inputs", [False, True], ids=["positions", "with-inputs"])
@pytest.mark.parametrize("query_type", ["fourier", "learned"])
def test_decoder_matches_a_hand_computation(fields, query_type, query_inputs):
    config = tiny_config("token", decoder_query_type=query_type, decoder_query_inputs=query_inputs, **fields)
    model = make_head("token", config)
    decoder = model.decoder
    with torch.no_grad():  # biases and norms away from their initial zeros and ones
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    latents, inputs = torch.randn(2, 8, 32), torch.randn(2, config.data_shape[0], 7)
    if query_type == "learned":
        queries = decoder.queries[:7].expand(2, -1, -1)
    else:
        queries = decoder.query_proj(decoder.position_features((7,))).expand(2, -1, -1)
    if query_inputs:  # each query plus its own input element
        queries = queries + decoder.input_proj(inputs.transpose(1, 2))
    else:
        assert decoder.input_proj is None
    outputs, _ = decoder(latents, inputs)
    torch.testing.assert_close(outputs, reference_decoder(decoder, latents, queries, config), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Perceiver IO heads: attention backends, attention weights, gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PER_ELEMENT)
def test_heads_eager_and_sdpa_agree(kind):
    config = tiny_config(kind, decoder_heads=2)
    sdpa = make_head(kind, config)
    eager = make_head(kind, config, "eager", state_dict=sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    inputs = labelled_inputs(kind)
    assert_same_logits_loss_and_gradients(logits_loss_and_gradients(sdpa, inputs), logits_loss_and_gradients(eager, inputs))


@pytest.mark.parametrize("kind", PER_ELEMENT)
def test_output_attentions_returns_the_decoders_cross_attention_last(kind):
    model = make_head(kind, attn_implementation="eager", decoder_heads=2)
    inputs = labelled_inputs(kind)
    inputs.pop("labels")
    seen = []
    model.decoder.layer.cross_attention.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    outputs = model(**inputs, output_attentions=True)

    num_queries = outputs.logits.shape[1] if kind != "dense" else int(np.prod(outputs.logits.shape[2:]))
    encoder_steps = len(model.config.layers_indice)
    assert len(outputs.cross_attentions) == encoder_steps + 1
    weights = outputs.cross_attentions[-1]
    assert weights.shape == (3, 2, num_queries, model.config.num_latent_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, num_queries))
    torch.testing.assert_close(weights, seen[0], rtol=0, atol=0)
    for encoder_weights in outputs.cross_attentions[:-1]:  # the latents attend to the inputs, padding excluded
        assert encoder_weights.shape == (3, model.config.cross_heads, model.config.num_latent_tokens, num_queries)
        assert encoder_weights[1].reshape(2, 8, -1)[..., ~inputs["attention_mask"][1].flatten().bool()].abs().max() == 0
    assert len(outputs.attentions) == sum(model.config.num_latent_transformers_in_layers[i]
                                          for i in model.config.layers_indice)  # fmt: skip
    assert model(**inputs).cross_attentions is None  # not asked: nothing recorded
    sdpa = make_head(kind, model.config, "sdpa", state_dict=model.state_dict())
    assert not any(w is not None for w in sdpa(**inputs, output_attentions=True).cross_attentions or ())  # eager only


def test_head_output_flags_from_the_config_and_tuple_outputs():
    """`config.output_attentions` / `output_hidden_states` as defaults, and `return_dict=False` as in transformers."""
    config = tiny_config("mlm", output_attentions=True, output_hidden_states=True)
    model = make_head("mlm", config, "eager")
    input_ids = token_ids(2, 7)
    outputs = model(input_ids)
    steps = len(config.layers_indice)
    layers = sum(1 + config.num_latent_transformers_in_layers[i] for i in config.layers_indice)
    assert len(outputs.cross_attentions) == steps + 1 and outputs.cross_attentions[-1].shape == (2, 1, 7, 8)
    assert len(outputs.hidden_states) == layers + 1  # the latents before the first and after every encoder layer
    assert all(state.shape == (2, 8, 32) for state in outputs.hidden_states)
    loss, logits = model(input_ids, labels=input_ids, return_dict=False, output_attentions=False,
                         output_hidden_states=False)  # fmt: skip
    assert loss.dim() == 0 and logits.shape == (2, 7, VOCAB_SIZE)
    torch.testing.assert_close(logits, outputs.logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", PER_ELEMENT)
def test_heads_gradient_checkpointing_gives_the_same_gradients(kind, reentrant):
    reference = make_head(kind).train()  # no dropout: training mode is deterministic
    checkpointed = make_head(kind, state_dict=reference.state_dict()).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert checkpointed.is_activation_checkpointing
    layer = checkpointed.decoder.layer
    assert isinstance(layer, PerceiverLiteLayer) and layer.gradient_checkpointing
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append("decoder mlp"))
    inputs = labelled_inputs(kind)
    assert_same_logits_loss_and_gradients(
        logits_loss_and_gradients(reference, inputs), logits_loss_and_gradients(checkpointed, inputs), rtol=1e-4
    )
    assert calls == ["decoder mlp", "decoder mlp"]  # the forward, then its recomputation in backward
