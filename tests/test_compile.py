"""`torch.compile(model, fullgraph=True, dynamic=True)` of every head, with labels and masks: one graph without breaks
(the input checks build their messages only when a check fails), the outputs and gradients of eager mode, and no
recompilation when the batch size changes.

The graph breaks and guards are dynamo's, whatever the backend, so the heads compile with `aot_eager` (dynamo and
AOTAutograd's forward and backward graphs, without inductor's code generation, the slow part on a CPU); one test
compiles the base model with the default backend, inductor, where a C++ compiler is present.
"""

import shutil

import pytest
import torch

from conftest import PerceiverLiteModelTester
from perceiver_lite import (
    PerceiverLiteForAudioClassification,
    PerceiverLiteForCausalLM,
    PerceiverLiteForDensePrediction,
    PerceiverLiteForImageClassification,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteForTokenClassification,
    PerceiverLiteModel,
)


BATCH_SIZES = (2, 3)
TINY = dict(num_latent_tokens=4, dim=16, heads=2, cross_heads=2, layers_indice=(0, 0),
            num_latent_transformers_in_layers=(1,), num_bands=2, decoder_heads=2)  # fmt: skip
GRID, LENGTH, VOCAB_SIZE = (4, 4), 6, 20


def image_config(**overrides):
    return PerceiverLiteModelTester(data_shape=(3, *GRID), resolution=GRID[0], **TINY).get_config(**overrides)


def token_config(channels=16, **overrides):
    tester = PerceiverLiteModelTester(data_shape=(channels, LENGTH), resolution=LENGTH, vocab_size=VOCAB_SIZE, **TINY)
    return tester.get_config(**overrides)


def padding_mask(batch_size, *axes):
    """1 for valid elements; the first sample's last row (or last two tokens) is padding."""
    mask = torch.ones(batch_size, *axes, dtype=torch.long)
    mask[0, -(2 if len(axes) == 1 else 1):] = 0
    return mask


def image_inputs(batch_size):
    return dict(pixel_values=torch.randn(batch_size, 3, *GRID), attention_mask=padding_mask(batch_size, *GRID))


def token_inputs(batch_size):
    return dict(input_ids=torch.randint(0, VOCAB_SIZE, (batch_size, LENGTH)), attention_mask=padding_mask(batch_size, LENGTH))


def class_ids(batch_size, *axes):
    labels = torch.randint(0, 3, (batch_size, *axes))
    if axes:
        labels[0, 0] = -100  # not scored
    return labels


def causal_lm_inputs(batch_size):
    """Token ids, their own labels, and left padding: the first sample's first two tokens."""
    input_ids = torch.randint(0, VOCAB_SIZE, (batch_size, LENGTH))
    return dict(input_ids=input_ids, attention_mask=padding_mask(batch_size, LENGTH).flip(-1), labels=input_ids)


# name: (model class, config, inputs of a batch size); one head each, the label readings spread over them
HEADS = {
    "base": (PerceiverLiteModel, image_config, lambda b: dict(inputs=torch.randn(b, 3, *GRID),
                                                              attention_mask=padding_mask(b, *GRID))),
    "image": (  # multi-hot floats, the problem type inferred from their dtype
        PerceiverLiteForImageClassification,
        image_config,
        lambda b: {**image_inputs(b), "labels": torch.randint(0, 2, (b, 3)).float()},
    ),
    "sequence": (PerceiverLiteForSequenceClassification, token_config, lambda b: {**token_inputs(b), "labels": class_ids(b)}),
    "audio": (  # regression, one label
        PerceiverLiteForAudioClassification,
        lambda: token_config(channels=1, num_labels=1),
        lambda b: dict(input_values=torch.randn(b, LENGTH), attention_mask=padding_mask(b, LENGTH), labels=torch.randn(b)),
    ),
    "masked-lm": (
        PerceiverLiteForMaskedLM,
        token_config,
        lambda b: {**token_inputs(b), "labels": torch.randint(0, VOCAB_SIZE, (b, LENGTH)).masked_fill(torch.rand(b, LENGTH) < 0.5, -100)},
    ),
    "token": (PerceiverLiteForTokenClassification, token_config, lambda b: {**token_inputs(b), "labels": class_ids(b, LENGTH)}),
    "dense": (PerceiverLiteForDensePrediction, image_config, lambda b: {**image_inputs(b), "labels": class_ids(b, *GRID)}),
    "causal-lm": (PerceiverLiteForCausalLM, lambda: token_config(position_encoding_type="rotary"), causal_lm_inputs),
}


def run(model, forward, inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The outputs of `forward` (the model or its compiled form), and the gradients of the loss (of the latents' sum
    for the base model), by parameter name."""
    model.zero_grad(set_to_none=True)
    outputs = forward(**inputs)
    loss = outputs.loss if "loss" in outputs else outputs.last_hidden_state.sum()
    loss.backward()
    tensors = {name: value.detach() for name, value in outputs.items() if isinstance(value, torch.Tensor)}
    return tensors, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(model_class, config, make_inputs, backend):
    model = model_class(config).train()  # dropout is 0: training mode is deterministic, and what Trainer compiles
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every batch size
        for batch_size in BATCH_SIZES:
            inputs = make_inputs(batch_size)
            eager_outputs, eager_gradients = run(model, model, inputs)
            compiled_outputs, compiled_gradients = run(model, compiled, inputs)
            assert compiled_outputs.keys() == eager_outputs.keys()
            for name, value in eager_outputs.items():
                torch.testing.assert_close(compiled_outputs[name], value, rtol=1e-4, atol=1e-5, msg=name)
            assert compiled_gradients.keys() == eager_gradients.keys() and eager_gradients
            for name, value in eager_gradients.items():
                torch.testing.assert_close(compiled_gradients[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("head", HEADS)
def test_fullgraph_dynamic_compile_equals_eager(head):
    model_class, make_config, make_inputs = HEADS[head]
    assert_compiled_equals_eager(model_class, make_config(), make_inputs, backend="aot_eager")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_inductor_compile_equals_eager():
    model_class, make_config, make_inputs = HEADS["base"]
    assert_compiled_equals_eager(model_class, make_config(), make_inputs, backend="inductor")

