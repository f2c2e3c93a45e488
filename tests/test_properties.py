"""Property-based tests (hypothesis) over random valid configs and inputs: output shapes, save / load, eager == sdpa,
padding invariance; and over random invalid configs and inputs: always a `ValueError` or `TypeError` whose message
names the culprit, never another exception.

The examples are derandomized: CI sees the same examples on every run."""

import copy
import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from perceiver_lite import (
    PerceiverLayer,
    PerceiverLiteConfig,
    PerceiverLiteForImageClassification,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteModel,
)


SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
INPUT_ERRORS = (ValueError, TypeError)


@st.composite
def config_kwargs(draw, num_axes=None):
    """Keyword arguments of a small valid `PerceiverLiteConfig`, any number of axes and blocks."""
    num_axes = num_axes or draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 2))
    resolution = draw(st.integers(2, 12))
    order = draw(st.permutations(range(num_blocks)))
    return dict(
        data_shape=[draw(st.integers(1, 4))] + draw(st.lists(st.integers(1, 6), min_size=num_axes, max_size=num_axes)),
        num_latent_tokens=draw(st.integers(1, 6)),
        dim=16 * draw(st.integers(1, 2)),
        heads=draw(st.sampled_from([1, 2, 4])),
        cross_heads=draw(st.sampled_from([1, 2, 4])),
        num_latent_transformers_in_layers=draw(st.lists(st.integers(0, 2), min_size=num_blocks, max_size=num_blocks)),
        layers_indice=list(order) + draw(st.lists(st.integers(0, num_blocks - 1), max_size=2)),
        num_bands=draw(st.integers(1, 3)),
        resolution=resolution,
        frequency_base=draw(st.none() | st.floats(0.5, resolution / 2)),
        pre_norm=draw(st.booleans()),
        num_labels=draw(st.integers(2, 4)),
    )


@st.composite
def model_and_inputs(draw, num_axes=None):
    """A model (eval mode, seeded weights) of a random valid config and inputs of any spatial size."""
    config = PerceiverLiteConfig(**draw(config_kwargs(num_axes)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = PerceiverLiteModel(config).eval()
    batch_size = draw(st.integers(1, 3))
    spatial_shape = draw(st.lists(st.integers(1, 5), min_size=config.num_axes, max_size=config.num_axes))
    return model, torch.randn(batch_size, config.data_shape[0], *spatial_shape)


def with_attention(model, attn_implementation):
    other = PerceiverLiteModel._from_config(copy.deepcopy(model.config), attn_implementation=attn_implementation)
    other.load_state_dict(model.state_dict())
    return other.eval()


@SETTINGS
@given(model_and_inputs())
def test_forward_shapes(model_inputs):
    model, inputs = model_inputs
    config, batch_size = model.config, inputs.shape[0]
    with torch.no_grad():
        outputs = model(inputs, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (batch_size, config.num_latent_tokens, config.dim)
    assert outputs.pooler_output.shape == (batch_size, config.dim)
    steps = len(config.layers_indice) + sum(config.num_latent_transformers_in_layers[i] for i in config.layers_indice)
    assert len(outputs.hidden_states) == steps + 1
    assert torch.isfinite(outputs.last_hidden_state).all()


@settings(SETTINGS, max_examples=8)  # disk round trips are the slow part
@given(model_and_inputs(), st.sampled_from([PerceiverLiteModel, PerceiverLiteForImageClassification]))
def test_save_load_round_trip(model_inputs, model_class):
    model, inputs = model_inputs
    model = model_class(model.config).eval()
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        loaded = model_class.from_pretrained(folder).eval()
        assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
        torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
        # bitwise equal weights; the outputs may differ in the last bit, as CPU kernels depend on memory alignment
        torch.testing.assert_close(loaded(inputs)[0], model(inputs)[0], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(model_and_inputs(), st.data())
def test_eager_equals_sdpa(model_inputs, data):
    model, inputs = model_inputs
    mask = data.draw(st.lists(st.booleans(), min_size=inputs[0, 0].numel(), max_size=inputs[0, 0].numel()))
    mask = torch.tensor(mask).expand(inputs.shape[0], -1)  # (B, M), all-masked samples included
    with torch.no_grad():
        eager = with_attention(model, "eager")(inputs, attention_mask=mask).last_hidden_state
        sdpa = with_attention(model, "sdpa")(inputs, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(model_and_inputs(), st.data())
def test_padding_invariance(model_inputs, data):
    """Each sample padded (with noise) to a larger shape and masked gives the output of the sample alone."""
    model, inputs = model_inputs
    padded_shape = [n + data.draw(st.integers(0, 3)) for n in inputs.shape[2:]]
    batch = torch.randn(inputs.shape[0], inputs.shape[1], *padded_shape) * 100  # (B, C, *padded)
    mask = torch.zeros(inputs.shape[0], *padded_shape, dtype=torch.bool)  # (B, *padded)
    samples = []
    for i in range(inputs.shape[0]):
        shape = [data.draw(st.integers(1, n)) for n in inputs.shape[2:]]
        region = tuple(slice(0, n) for n in shape)
        samples.append(inputs[(i, slice(None), *region)])
        batch[(i, slice(None), *region)] = samples[-1]
        mask[(i, *region)] = True
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).last_hidden_state
        for i, sample in enumerate(samples):
            alone = model(sample[None]).last_hidden_state[0]
            torch.testing.assert_close(padded[i], alone, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Invalid configs and inputs
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def invalid_config(draw):
    """Keyword arguments of a valid config with one defect, and the field the error must name."""
    kwargs = draw(config_kwargs())
    num_axes, num_blocks = len(kwargs["data_shape"]) - 1, len(kwargs["num_latent_transformers_in_layers"])
    defect = draw(
        st.sampled_from(
            ["non_positive", "indivisible", "unknown_block", "unused_block", "dropout", "cross_kv_dim", "resolution"]
            + ["frequency_base", "data_shape", "block_counts"]
        )
    )
    if defect == "non_positive":
        field = draw(st.sampled_from(["dim", "num_latent_tokens", "heads", "cross_heads", "num_bands"]))
        kwargs[field] = draw(st.integers(-3, 0))
    elif defect == "indivisible":  # dim not divisible by heads, with head_dim None
        field = "dim"
        kwargs.update(heads=4, dim=4 * draw(st.integers(1, 8)) + draw(st.integers(1, 3)))
    elif defect == "unknown_block":
        field = "layers_indice"
        kwargs["layers_indice"] = kwargs["layers_indice"] + [num_blocks + draw(st.integers(0, 3))]
    elif defect == "unused_block":
        field = "layers_indice"
        kwargs["num_latent_transformers_in_layers"] = kwargs["num_latent_transformers_in_layers"] + [1]
    elif defect == "dropout":
        field = draw(st.sampled_from(["ff_dropout", "attention_dropout"]))
        kwargs[field] = draw(st.floats(1, 5) | st.floats(-5, -1e-3))
    elif defect == "cross_kv_dim":
        field = "cross_kv_dim"
        kwargs[field] = kwargs["data_shape"][0] + num_axes * (2 * kwargs["num_bands"] + 1) + draw(st.integers(1, 5))
    elif defect == "resolution":  # one value per axis, but not as many as there are axes
        field = "resolution"
        kwargs[field] = draw(st.lists(st.integers(2, 8), min_size=1, max_size=5).filter(lambda r: len(r) != num_axes))
    elif defect == "frequency_base":  # above the highest band, resolution / 2
        field = "frequency_base"
        kwargs[field] = draw(st.floats(kwargs["resolution"] / 2 + 0.5, 100))
    elif defect == "data_shape":
        field = "data_shape"
        kwargs[field] = draw(st.sampled_from([[3], [3, 0], [0, 4], [2, 4, -1]]))
    else:
        field = "num_latent_transformers_in_layers"
        kwargs[field] = draw(st.sampled_from([[], [-1] * num_blocks]))
    return kwargs, field


@SETTINGS
@given(invalid_config())
def test_invalid_config_raises_value_error_naming_the_field(kwargs_field):
    kwargs, field = kwargs_field
    with pytest.raises(ValueError) as excinfo:
        PerceiverLiteConfig(**kwargs)
    assert f"`{field}`" in str(excinfo.value), str(excinfo.value)


def any_tensor(draw, valid_shape, max_rank=5):
    """Often a float tensor of `valid_shape`, otherwise of any rank (zero-length axes included) and dtype; sometimes
    with a NaN or Inf."""
    shape = draw(st.just(valid_shape) | st.lists(st.integers(0, 4), max_size=max_rank))
    dtypes = [torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]
    dtype = draw(st.just(torch.float32) | st.sampled_from(dtypes))
    tensor = (torch.randn(shape) * draw(st.sampled_from([1, 300]))).to(dtype)
    if tensor.is_floating_point() and tensor.numel() and draw(st.integers(0, 3)) == 0:
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf]))
    return tensor


def raises_input_error_or_runs(forward, **kwargs):
    """The forward either runs (the draw happened to be valid) or raises a documented error naming an argument."""
    try:
        output = forward(**kwargs)
    except INPUT_ERRORS as error:
        event(type(error).__name__)  # `pytest --hypothesis-show-statistics` shows how often each outcome came
        assert "`" in str(error), f"the message names no argument: {error}"
        return None
    event("valid")
    return output


IMAGE_CONFIG = PerceiverLiteConfig(
    data_shape=[3, 4, 4],
    num_latent_tokens=4,
    dim=16,
    heads=2,
    layers_indice=[0],
    num_latent_transformers_in_layers=[1],
    num_bands=2,
    resolution=4,
    num_labels=3,
)
TEXT_CONFIG = PerceiverLiteConfig(**{**IMAGE_CONFIG.to_dict(), "data_shape": [4, 8], "cross_kv_dim": None})


@SETTINGS
@given(st.data())
def test_random_image_inputs_raise_only_documented_errors(data):
    model = PerceiverLiteForImageClassification(IMAGE_CONFIG).eval()
    batch_size, height, width = (data.draw(st.integers(1, 3)) for _ in range(3))
    kwargs = {"pixel_values": any_tensor(data.draw, [batch_size, 3, height, width])}
    if data.draw(st.booleans()):
        mask = any_tensor(data.draw, [batch_size, height, width], max_rank=3)
        kwargs["attention_mask"] = mask > 0 if data.draw(st.booleans()) else mask
    if data.draw(st.booleans()):
        kwargs["labels"] = any_tensor(data.draw, [batch_size, 3], max_rank=2)
    with torch.no_grad():
        output = raises_input_error_or_runs(model, **kwargs)
    if output is not None:
        assert torch.isfinite(output.logits).all()


@SETTINGS
@given(st.data())
def test_random_token_inputs_raise_only_documented_errors(data):
    model = PerceiverLiteForSequenceClassification(TEXT_CONFIG).eval()
    valid_shape = [data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))]
    shape = data.draw(st.just(valid_shape) | st.lists(st.integers(0, 4), max_size=3))
    dtype = data.draw(st.just(torch.int64) | st.sampled_from([torch.int32, torch.float32, torch.bool]))
    low, high = data.draw(st.sampled_from([(0, 262), (0, 262), (-3, 262), (0, 270)]))  # vocabulary: [0, 262)
    kwargs = {"input_ids": torch.randint(low, high, shape).to(dtype)}
    if data.draw(st.booleans()):
        kwargs["attention_mask"] = any_tensor(data.draw, shape, max_rank=2) > 0
    with torch.no_grad():
        raises_input_error_or_runs(model, **kwargs)


@SETTINGS
@given(st.data())
def test_random_perceiver_layer_inputs_raise_only_documented_errors(data):
    layer = PerceiverLayer(dim=8, heads=2, depth=1, dim_head=4).eval()

    def maybe_wrong(*shape):
        return data.draw(st.sampled_from([list(shape), [n + data.draw(st.integers(-1, 1)) for n in shape], shape[1:]]))

    dtype = data.draw(st.sampled_from([torch.float32, torch.int64]))
    q, k, v = (torch.randn(maybe_wrong(2, length, 8)).to(dtype) for length in (3, 4, 4))
    kwargs = dict(q=q, k=k, v=v)
    if data.draw(st.booleans()):
        kwargs["mask"] = torch.randint(0, 2, maybe_wrong(2, 3, data.draw(st.sampled_from([4, 8, 5]))))
    with torch.no_grad():
        output = raises_input_error_or_runs(layer, **kwargs)
    if output is not None:
        assert output.shape == q.shape and torch.isfinite(output).all()
