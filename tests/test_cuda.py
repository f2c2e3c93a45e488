"""On a GPU (skipped without one): the model there computes what it computes on the CPU. On a GPU the plan serves the
fast paths only where the GPU benchmarks show them faster (`faster_on_cuda`; these tiny inputs run the reference), and
then every attention takes torch's fused kernels, the cross-attends to grid features included (head size `r`,
features expanded along the heads with stride 0); `test_fast_paths` checks that path's arithmetic on the CPU's fused
kernels."""

import copy

import pytest
import torch
from test_fast_paths import assert_close_gradients, forward_and_gradients, make_model, padding_mask

from perceiver_lite import PerceiverLiteForImageClassification


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICE = "cuda"


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "per-sample-positions"])
@pytest.mark.parametrize("cross_heads", [1, 2], ids=["grid-features", "materialized"])
def test_gpu_matches_cpu_in_float32(model_tester, cross_heads, masked):
    model = make_model(model_tester.get_config(cross_heads=cross_heads))
    inputs, mask = model_tester.prepare_inputs(), padding_mask() if masked else None
    expected, expected_grads = forward_and_gradients(model, inputs, mask)
    output, grads = forward_and_gradients(copy.deepcopy(model).to(DEVICE), inputs, mask)
    torch.testing.assert_close(output, expected, rtol=1e-3, atol=1e-4)
    assert_close_gradients(grads, expected_grads, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cross_heads", [1, 2], ids=["grid-features", "materialized"])
def test_gpu_bfloat16_autocast_is_close_to_float32(model_tester, cross_heads):
    model = make_model(model_tester.get_config(cross_heads=cross_heads)).to(DEVICE)
    inputs, mask = model_tester.prepare_inputs(), padding_mask()
    expected, expected_grads = forward_and_gradients(model, inputs, mask)
    output, grads = forward_and_gradients(model, inputs, mask, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(output, expected, rtol=0.05, atol=0.05)
    assert_close_gradients(grads, expected_grads, rtol=0.05, atol=0.05)


def test_gpu_training_step_lowers_the_loss(model_tester):
    """A classification head trains on the GPU: loss and gradients on the device, finite, and a few AdamW steps on one
    batch lower the loss."""
    config, inputs, labels = model_tester.prepare_config_and_inputs()
    model = PerceiverLiteForImageClassification(config).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = model(inputs.to(DEVICE), labels=labels.to(DEVICE)).loss
        loss.backward()
        assert all(p.grad.device.type == DEVICE and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
