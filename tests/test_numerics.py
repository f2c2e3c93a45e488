"""Numerical safety: fully padded samples, large inputs in half precision, NaN and Inf in the inputs.

Documented behaviour:
- A sample whose attention mask is all zeros attends to every input element instead (an all-masked softmax would
  give NaN). Its outputs are finite but carry no information; the other samples of the batch are unaffected, and
  with label -100 it changes neither the loss nor the gradients.
- NaN or Inf anywhere in a floating input (padding included) raises a `ValueError` naming the argument.
"""

import copy

import pytest
import torch
from conftest import PerceiverLiteModelTester

from perceiver_lite import PerceiverLayer, PerceiverLiteForImageClassification, PerceiverLiteModel


ATTENTION = ["eager", "sdpa"]


def build(model_class, attn_implementation, **overrides):
    config = PerceiverLiteModelTester(**overrides).get_config()
    model = model_class(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def padding_mask(batch_size=3, spatial_shape=(8, 8), empty=1):
    """Sample 0 full, sample `empty` fully masked, the others with their lower half masked."""
    mask = torch.ones(batch_size, *spatial_shape)
    mask[2:, spatial_shape[0] // 2 :] = 0
    mask[empty] = 0
    return mask


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_fully_masked_sample_is_finite_and_leaves_the_others_unchanged(attn_implementation):
    model = build(PerceiverLiteModel, attn_implementation)
    inputs, mask = torch.randn(3, 3, 8, 8), padding_mask()
    with torch.no_grad():
        batch = model(inputs, attention_mask=mask).last_hidden_state
        others = model(inputs[[0, 2]], attention_mask=mask[[0, 2]]).last_hidden_state
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[[0, 2]], others, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_fully_masked_sample_attends_to_every_element(attn_implementation):
    """The documented fallback: with no valid element, a sample is treated as unmasked (not as NaN or zeros)."""
    model = build(PerceiverLiteModel, attn_implementation)
    inputs_embeds, mask = torch.randn(2, 10, model.config.cross_kv_dim), torch.ones(2, 10)
    mask[1] = 0
    with torch.no_grad():
        masked = model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        unmasked = model(inputs_embeds=inputs_embeds[1:]).last_hidden_state
    torch.testing.assert_close(masked[1:], unmasked)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_fully_masked_sample_does_not_poison_loss_or_gradients(attn_implementation):
    model = build(PerceiverLiteForImageClassification, attn_implementation).train()
    inputs, mask = torch.randn(3, 3, 8, 8), padding_mask()

    def loss_and_gradients(inputs, mask, labels):
        model.zero_grad()
        loss = model(inputs, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, gradients = loss_and_gradients(inputs, mask, torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gradients.values())

    # Labelled -100 (ignored), the padded sample contributes nothing: the batch without it gives the same loss and grads.
    loss, gradients = loss_and_gradients(inputs, mask, torch.tensor([0, -100, 2]))
    expected_loss, expected_gradients = loss_and_gradients(inputs[[0, 2]], mask[[0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradients, expected_gradients, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_perceiver_layer_fully_masked_row_is_finite(attn_implementation):
    layer = PerceiverLayer(dim=32, heads=2, depth=2, dim_head=16).eval()
    layer.config._attn_implementation = attn_implementation
    q, k, v = torch.randn(2, 4, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0] = False  # every query of sample 0
    mask[1, 2] = False  # one query of sample 1
    with torch.no_grad():
        output = layer(q, k, v, mask=mask)
        alone = layer(q[1:], k[1:], v[1:], mask=mask[1:])
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output[1:], alone)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize(
    "dtype, scale", [(torch.float16, 6e4), (torch.float16, 1e3), (torch.bfloat16, 1e20)], ids=lambda v: str(v)
)
def test_large_inputs_in_half_precision(attn_implementation, pre_norm, dtype, scale):
    """Inputs near float16's largest value (65504), and far beyond it in bfloat16, with and without padding, give
    finite outputs. With `pre_norm` (the default) the inputs' LayerNorm comes before anything else, so half precision
    also keeps float32's accuracy at any input magnitude."""
    model = build(PerceiverLiteModel, attn_implementation, pre_norm=pre_norm)
    half_model = copy.deepcopy(model).to(dtype)
    inputs = ((torch.rand(3, 3, 8, 8) * 2 - 1) * scale).to(dtype)
    with torch.no_grad():
        for mask in (None, padding_mask()):
            output = half_model(inputs, attention_mask=mask).pooler_output
            assert output.dtype == dtype
            assert torch.isfinite(output).all(), f"non-finite outputs with mask={mask is not None}"
            if pre_norm:
                expected = model(inputs.float(), attention_mask=mask).pooler_output
                error = (output.float() - expected).abs().max() / expected.abs().max()
                assert error < 0.05, f"{dtype} is {error:.0%} off float32 with mask={mask is not None}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_raise_even_in_padding(value):
    """A NaN in a masked-out position would still reach the keys; padding must be finite (pad with zeros)."""
    model = build(PerceiverLiteForImageClassification, "sdpa")
    inputs, mask = torch.randn(3, 3, 8, 8), padding_mask()
    inputs[2, :, -1, -1] = value  # a padded position of sample 2
    with pytest.raises(ValueError, match=r"`pixel_values` contains NaN or Inf"):
        model(inputs, attention_mask=mask)
    inputs[2, :, -1, -1] = 0.0
    assert torch.isfinite(model(inputs, attention_mask=mask).logits).all()


def test_inputs_of_another_float_dtype_are_cast_to_the_model_dtype():
    """float64 inputs (from numpy, say) run in float32 weights; values a float16 model cannot hold are an error."""
    model = build(PerceiverLiteForImageClassification, "sdpa")
    inputs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs.double()).logits, model(inputs).logits)
        model.half()
        assert model(inputs).logits.dtype == torch.float16
    with pytest.raises(ValueError, match=r"`pixel_values` contains NaN or Inf values \(or values beyond the range of"):
        model(inputs * 1e5)
