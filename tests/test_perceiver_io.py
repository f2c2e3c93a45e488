"""Perceiver IO: the decoder (learned or Fourier output queries cross-attending to the latents), the per-element heads
(`PerceiverLiteForMaskedLM`, `PerceiverLiteForTokenClassification`, `PerceiverLiteForDensePrediction`),
`classifier_pooling="decoder"` and the encoder options beyond the paper's model.

Shapes, losses against hand computations, padding invariance, save / load (Auto classes, tied lm_head, remote code),
attention backends and weights, gradient checkpointing, fast paths against the reference, Trainer and pipelines, and
the errors that bad inputs and configs raise. Every model is tiny (width 32, 8 latents).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import PerceiverLiteModelTester, count_reference_attention, training_arguments
from datasets import Dataset
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSemanticSegmentation,
    AutoModelForTokenClassification,
    DataCollatorForLanguageModeling,
    PerceiverTokenizer,
    Trainer,
    pipeline,
)

import perceiver_lite
from perceiver_lite import PerceiverLiteConfig, PerceiverLiteModel
from perceiver_lite.fast_perceiver_lite import fast_plan
from perceiver_lite.modeling_perceiver_lite import (
    PerceiverLiteDecoder,
    PerceiverLiteDecoderOutput,
    PerceiverLiteForAudioClassification,
    PerceiverLiteForDensePrediction,
    PerceiverLiteForImageClassification,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteForTokenClassification,
    PerceiverLiteLayer,
)


TESTS_DIR = Path(__file__).parent
ATOL = 1e-5
VOCAB_SIZE = 262  # transformers' byte-level PerceiverTokenizer
TEXT_SHAPE = (16, 12)  # token embedding width 16, nominal length 12
NUM_LABELS = 3


# ---------------------------------------------------------------------------------------------------------------------
# Tiny heads and their inputs
# ---------------------------------------------------------------------------------------------------------------------

# kind: (head, Auto class, data_shape of the tiny config, name of the main input, config fields the head needs)
KINDS = {
    "mlm": (PerceiverLiteForMaskedLM, "AutoModelForMaskedLM", TEXT_SHAPE, "input_ids", {"decoder_dim": 16}),
    "token": (PerceiverLiteForTokenClassification, "AutoModelForTokenClassification", TEXT_SHAPE, "input_ids", {}),
    "dense": (PerceiverLiteForDensePrediction, "AutoModelForSemanticSegmentation", (3, 8, 8), "pixel_values", {}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny models: more gain nothing, and on a shared CPU they wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(kind: str, data_shape=None, **overrides) -> PerceiverLiteConfig:
    _, _, default_shape, _, needed = KINDS[kind]
    tester = PerceiverLiteModelTester(data_shape=data_shape or default_shape, num_labels=NUM_LABELS)
    return tester.get_config(**{**needed, **overrides})


def make(kind: str, config=None, attn_implementation="sdpa", state_dict=None, **overrides):
    """The head of `kind` in eval mode. Its output layer gets weights of unit scale (at `initializer_range` the logits
    are ~0.01 and every absolute tolerance would pass); `state_dict` replaces all weights."""
    config = copy.deepcopy(config if config is not None else tiny_config(kind, **overrides))
    model = KINDS[kind][0]._from_config(config, attn_implementation=attn_implementation)
    if kind != "mlm":
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 1.0)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def token_ids(batch_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch_size, length))


def length_mask(lengths, max_length: int) -> torch.Tensor:
    return (torch.arange(max_length) < torch.as_tensor(lengths)[:, None]).long()


def masked_inputs(kind: str, batch_size: int = 3) -> dict:
    """Inputs with a padding mask (sample 1 padded), and per-element labels for the head."""
    if kind == "dense":
        pixel_values = torch.randn(batch_size, 3, 6, 7)
        mask = torch.ones(batch_size, 6, 7, dtype=torch.long)
        mask[1, 4:] = 0
        mask[1, :, 5:] = 0
        labels = torch.randint(0, NUM_LABELS, (batch_size, 6, 7))
        return {"pixel_values": pixel_values, "attention_mask": mask, "labels": labels}
    input_ids = token_ids(batch_size, 10)
    mask = length_mask([10, 6, 9][:batch_size] + [10] * max(0, batch_size - 3), 10)
    labels = torch.randint(0, VOCAB_SIZE if kind == "mlm" else NUM_LABELS, (batch_size, 10))
    labels[torch.rand(batch_size, 10) < 0.5] = -100
    labels[mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def outputs_and_gradients(model, inputs: dict):
    """`(logits, loss, {name: gradient})` of one forward and backward of the loss."""
    model.zero_grad()
    outputs = model(**inputs)
    outputs.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.logits.detach(), outputs.loss.detach(), gradients


def assert_same_outputs_and_gradients(first, second, atol=ATOL, rtol=1e-4):
    (logits1, loss1, grads1), (logits2, loss2, grads2) = first, second
    torch.testing.assert_close(logits1, logits2, rtol=0, atol=atol)
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=atol)
    assert grads1.keys() == grads2.keys() and len(grads1) > 0
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Output shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_type, lengths", [("fourier", [1, 5, 12, 20]), ("learned", [1, 5, 12])])
def test_masked_lm_logits_one_per_token_for_any_length(query_type, lengths):
    """One prediction per input token, for inputs shorter than the nominal length (and longer, with Fourier queries)."""
    model = make("mlm", decoder_query_type=query_type)
    for length in lengths:
        outputs = model(token_ids(2, length))
        assert isinstance(outputs, PerceiverLiteDecoderOutput)
        assert outputs.logits.shape == (2, length, VOCAB_SIZE)
        assert outputs.loss is None
        assert torch.isfinite(outputs.logits).all()


@pytest.mark.parametrize("length", [3, 12, 17])
def test_token_classification_logits_shape(length):
    model = make("token")
    assert model(token_ids(2, length)).logits.shape == (2, length, NUM_LABELS)


@pytest.mark.parametrize(
    "data_shape, spatial_shapes",
    [
        ((2, 12), [(12,), (5,), (19,)]),
        ((3, 8, 8), [(8, 8), (5, 7), (11, 9)]),
        ((2, 4, 6, 6), [(4, 6, 6), (3, 5, 7)]),
    ],
    ids=["1d", "2d", "3d"],
)
def test_dense_logits_are_channel_first_on_the_input_grid(data_shape, spatial_shapes):
    """Logits `(B, num_labels, *axes)` on the input's own grid, nominal or not (Fourier queries)."""
    model = make("dense", data_shape=data_shape)
    for spatial_shape in spatial_shapes:
        pixel_values = torch.randn(2, data_shape[0], *spatial_shape)
        assert model(pixel_values).logits.shape == (2, NUM_LABELS, *spatial_shape)


def test_dense_logits_follow_their_element():
    """The channel-first reshape keeps each element's logits at its own place: permuting the queries' positions is
    not what happens (the logits of element (i, j) come from its own decoder output)."""
    model = make("dense")
    pixel_values = torch.randn(1, 3, 5, 7)
    decoded = []
    model.decoder.register_forward_hook(lambda module, args, output: decoded.append(output[0]))
    logits = model(pixel_values).logits  # (1, L, 5, 7)
    per_element = model.classifier(decoded[0])  # (1, 35, L), row-major positions
    torch.testing.assert_close(logits[0, :, 2, 3], per_element[0, 2 * 7 + 3], rtol=0, atol=0)
    torch.testing.assert_close(logits[0, :, 4, 6], per_element[0, 34], rtol=0, atol=0)


def test_learned_queries_are_the_top_left_rows_of_the_nominal_grid():
    """With learned queries an input smaller than nominal takes the queries of its own positions."""
    model = make("dense", decoder_query_type="learned")
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
    model = make("token", config)
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
# 2. Losses
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_losses_are_cross_entropy_over_labelled_tokens(kind):
    model = make(kind)
    inputs = masked_inputs(kind)
    outputs = model(**inputs)
    labels = inputs["labels"]
    scored = labels != -100
    logits = outputs.logits
    expected = -logits.log_softmax(-1)[scored].gather(-1, labels[scored][:, None]).mean()
    torch.testing.assert_close(outputs.loss, expected)
    assert scored.any() and not scored.all()
    changed = labels.clone()  # a scored label counts
    first = scored.nonzero()[0]
    changed[tuple(first)] = (labels[tuple(first)] + 1) % logits.shape[-1]
    assert not torch.allclose(model(**{**inputs, "labels": changed}).loss, outputs.loss)


def test_token_classification_loss_with_labels_on_every_token():
    model = make("token")
    input_ids, labels = token_ids(2, 7), torch.randint(0, NUM_LABELS, (2, 7))
    outputs = model(input_ids, labels=labels)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten()))


def dense_case(problem: str):
    """`(config overrides, labels (2, ...) on a 5 x 6 grid, mask (2, 5, 6), loss of (per-element logits (V, L),
    per-element labels) of the valid elements V)`."""
    mask = torch.ones(2, 5, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, :, 4:] = 0
    if problem == "single-label":
        labels = torch.randint(0, NUM_LABELS, (2, 5, 6))
        labels[1, 0, :2] = -100
        return {}, labels, mask, lambda logits, targets: F.cross_entropy(logits, targets, ignore_index=-100)
    if problem == "regression":
        return {"num_labels": 1}, torch.randn(2, 5, 6), mask, lambda logits, targets: F.mse_loss(logits[:, 0], targets)
    if problem == "multi-target regression":
        return ({"num_labels": 2, "problem_type": "regression"}, torch.randn(2, 2, 5, 6), mask,
                F.mse_loss)  # fmt: skip
    labels = torch.randint(0, 2, (2, NUM_LABELS, 5, 6)).float()
    return {}, labels, mask, F.binary_cross_entropy_with_logits


@pytest.mark.parametrize("problem", ["single-label", "regression", "multi-target regression", "multi-label"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_dense_loss_by_problem_type_over_valid_elements(problem, masked):
    """transformers' loss for the problem type over the valid elements only: not the masked padding, nor -100."""
    overrides, labels, mask, loss_function = dense_case(problem)
    model = make("dense", **overrides)
    pixel_values = torch.randn(2, 3, 5, 6)
    mask = mask if masked else None
    outputs = model(pixel_values, labels=labels, attention_mask=mask)
    per_element = outputs.logits.flatten(2).transpose(1, 2)  # (2, 30, L)
    targets = labels.flatten(2).transpose(1, 2) if labels.dim() == 4 else labels.flatten(1)
    valid = torch.ones(2, 30, dtype=torch.bool) if mask is None else mask.flatten(1).bool()
    torch.testing.assert_close(outputs.loss, loss_function(per_element[valid], targets[valid]))
    if masked:  # the padding's labels do not count
        garbage = labels.clone()
        padding = ~mask.bool()
        if garbage.dim() == 4:
            garbage.transpose(0, 1)[:, padding] = 1.0 if problem == "multi-label" else 1e3
        else:
            garbage[padding] = (garbage[padding] + 1) % NUM_LABELS if problem == "single-label" else 1e3
        assert not torch.equal(garbage, labels)
        torch.testing.assert_close(model(pixel_values, labels=garbage, attention_mask=mask).loss, outputs.loss)


def test_dense_problem_type_inferred_from_labels_as_in_transformers():
    model = make("dense")
    pixel_values = torch.randn(2, 3, 4, 4)
    outputs = model(pixel_values, labels=torch.randint(0, 2, (2, NUM_LABELS, 4, 4)).float())
    assert model.config.problem_type == "multi_label_classification"
    assert torch.isfinite(outputs.loss)
    model = make("dense")
    model(pixel_values, labels=torch.randint(0, NUM_LABELS, (2, 4, 4)))
    assert model.config.problem_type == "single_label_classification"


def test_dense_one_dimensional_loss_with_flat_mask():
    """A 1-D dense head (per-time-step classes) with a flattened `(B, M)` mask."""
    model = make("dense", data_shape=(2, 12))
    signals, labels = torch.randn(2, 2, 9), torch.randint(0, NUM_LABELS, (2, 9))
    mask = length_mask([9, 5], 9)
    outputs = model(signals, labels=labels, attention_mask=mask)
    assert outputs.logits.shape == (2, NUM_LABELS, 9)
    valid = mask.bool()
    expected = F.cross_entropy(outputs.logits.transpose(1, 2)[valid], labels[valid])
    torch.testing.assert_close(outputs.loss, expected)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Padding invariance
# ---------------------------------------------------------------------------------------------------------------------

POSITION_VARIANTS = {
    "fourier-fourier": {},
    "learned-positions": {"position_encoding_type": "learned"},
    "learned-queries": {"decoder_query_type": "learned"},
    "learned-learned": {"position_encoding_type": "learned", "decoder_query_type": "learned"},
    "query-inputs": {"decoder_query_inputs": True},
}


@pytest.mark.parametrize("variant", POSITION_VARIANTS)
@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_outputs_and_loss_do_not_depend_on_padding(kind, variant):
    model = make(kind, **POSITION_VARIANTS[variant])
    num_classes = VOCAB_SIZE if kind == "mlm" else NUM_LABELS
    sample = token_ids(1, 7)
    labels = torch.randint(0, num_classes, (1, 7))
    labels[0, ::3] = -100
    padded = torch.cat([sample, token_ids(1, 5)], dim=1)
    padded_labels = torch.cat([labels, torch.full((1, 5), -100)], dim=1)
    alone = model(sample, labels=labels)
    batch = model(
        torch.cat([padded, token_ids(1, 12)]),
        attention_mask=torch.cat([length_mask([7], 12), torch.ones(1, 12, dtype=torch.long)]),
        labels=torch.cat([padded_labels, torch.full((1, 12), -100)]),
    )
    torch.testing.assert_close(batch.logits[:1, :7], alone.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(batch.loss, alone.loss, rtol=0, atol=ATOL)
    unmasked = model(padded).logits[:, :7]  # the check can fail: the padding changes the outputs when not masked
    assert (unmasked - alone.logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", POSITION_VARIANTS)
def test_dense_outputs_and_loss_do_not_depend_on_padding(variant):
    model = make("dense", **POSITION_VARIANTS[variant])
    sample, labels = torch.randn(1, 3, 5, 6), torch.randint(0, NUM_LABELS, (1, 5, 6))
    padded = torch.randn(1, 3, 8, 8) * 100
    padded[:, :, :5, :6] = sample
    padded_labels = torch.randint(0, NUM_LABELS, (1, 8, 8))  # scored were the padding not masked
    padded_labels[:, :5, :6] = labels
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :5, :6] = 1
    alone = model(sample, labels=labels)
    batch = model(padded, attention_mask=mask, labels=padded_labels)
    torch.testing.assert_close(batch.logits[:, :, :5, :6], alone.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(batch.loss, alone.loss, rtol=0, atol=ATOL)
    assert (model(padded).logits[:, :, :5, :6] - alone.logits).abs().max() > 1e-3


def test_every_sample_is_decoded_separately():
    model = make("mlm")
    input_ids = token_ids(3, 9)
    batch = model(input_ids).logits
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], model(input_ids[i : i + 1]).logits, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Save and load
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fourier-fourier", "learned-learned"])
@pytest.mark.parametrize("kind", KINDS)
def test_auto_class_round_trip_gives_identical_outputs(kind, variant, tmp_path):
    head_class, auto_class, *_ = KINDS[kind]
    model = make(kind, **POSITION_VARIANTS[variant])
    inputs = masked_inputs(kind)
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [head_class.__name__]
    assert saved["auto_map"][auto_class] == f"modeling_perceiver_lite.{head_class.__name__}"

    loaded, info = head_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    auto = getattr(transformers, auto_class).from_pretrained(tmp_path).eval()
    assert type(auto) is head_class
    assert auto.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(auto.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for restored in (loaded.eval(), auto):
        outputs = restored(**inputs)
        torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(outputs.loss, expected.loss, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is PerceiverLiteModel  # the head's encoder alone


def test_tied_lm_head_stays_tied_after_loading(tmp_path):
    model = make("mlm")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embeddings.weight
    assert loaded.get_output_embeddings() is loaded.lm_head and loaded.get_input_embeddings() is loaded.embeddings
    # still tied in training: one step moves both
    with torch.no_grad():
        loaded.embeddings.weight[5] += 1.0
    assert torch.equal(loaded.lm_head.weight[5], loaded.embeddings.weight[5])


def test_untied_lm_head_is_its_own_and_survives_loading(tmp_path):
    model = make("mlm", tie_word_embeddings=False, decoder_dim=24)
    assert model.lm_head.weight is not model.embeddings.weight
    assert model.lm_head.weight.shape == (VOCAB_SIZE, 24) and model.embeddings.weight.shape == (VOCAB_SIZE, 16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.embeddings.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_a_masked_lm_checkpoint_starts_a_token_classifier(tmp_path):
    """Pre-train with masked LM, fine-tune per token: every weight but the classifier carries over (lm_head is left)."""
    model = make("mlm")
    model.save_pretrained(tmp_path)
    tagger, info = AutoModelForTokenClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(tagger) is PerceiverLiteForTokenClassification
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert info["unexpected_keys"] == {"lm_head.bias"} and not info["mismatched_keys"]
    for name, value in tagger.state_dict().items():
        if not name.startswith("classifier."):
            torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_remote_code_loads_the_new_heads_without_the_package(tmp_path):
    """Each new head, saved, loads by its Auto class through the saved code alone (`trust_remote_code=True`, the
    package blocked, in a subprocess as in test_hub.py), gives the original outputs and saves again."""
    cases = []
    for kind, (head_class, auto_class, *_rest) in KINDS.items():
        model = make(kind)
        folder = tmp_path / kind
        model.save_pretrained(folder)
        inputs = masked_inputs(kind)[KINDS[kind][3]]
        with torch.no_grad():
            expected = model(inputs).logits.contiguous()
        reference = tmp_path / f"{kind}-reference.safetensors"
        save_file({"inputs": inputs, "expected": expected}, reference, metadata={"output": "logits"})
        cases.append({"folder": str(folder), "auto_class": auto_class, "reference": str(reference)})

    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-I", str(TESTS_DIR / "remote_code_loader.py"), json.dumps(cases), str(workdir / "r.json")]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((workdir / "r.json").read_text())

    assert report["package_importable_before"] is False and report["package_modules"] == []
    assert [case["model_class"] for case in report["cases"]] == [KINDS[kind][0].__name__ for kind in KINDS]
    for case in report["cases"]:
        assert case["module"].startswith("transformers_modules.") and case["module"].endswith(".modeling_perceiver_lite")
        assert case["max_abs_diff"] <= ATOL, case
        assert case["resaved_max_abs_diff"] <= ATOL, case
        for _, auto_class, *_rest in KINDS.values():
            assert auto_class in case["resaved_auto_map"], case


# ---------------------------------------------------------------------------------------------------------------------
# 5. Attention backends, attention weights, gradient checkpointing, fast paths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_agree(kind):
    config = tiny_config(kind, decoder_heads=2)
    sdpa = make(kind, config)
    eager = make(kind, config, "eager", state_dict=sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    inputs = masked_inputs(kind)
    assert_same_outputs_and_gradients(outputs_and_gradients(sdpa, inputs), outputs_and_gradients(eager, inputs))


@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_returns_the_decoders_cross_attention_last(kind):
    model = make(kind, attn_implementation="eager", decoder_heads=2)
    inputs = masked_inputs(kind)
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
    sdpa = make(kind, model.config, "sdpa", state_dict=model.state_dict())
    assert not any(w is not None for w in sdpa(**inputs, output_attentions=True).cross_attentions or ())  # eager only


def test_output_flags_from_the_config_and_tuple_outputs():
    """`config.output_attentions` / `output_hidden_states` as defaults, and `return_dict=False` as in transformers."""
    config = tiny_config("mlm", output_attentions=True, output_hidden_states=True)
    model = make("mlm", config, "eager")
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
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, reentrant):
    reference = make(kind).train()  # no dropout: training mode is deterministic
    checkpointed = make(kind, state_dict=reference.state_dict()).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert checkpointed.is_activation_checkpointing
    layer = checkpointed.decoder.layer
    assert isinstance(layer, PerceiverLiteLayer) and layer.gradient_checkpointing
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append("decoder mlp"))
    inputs = masked_inputs(kind)
    assert_same_outputs_and_gradients(
        outputs_and_gradients(reference, inputs), outputs_and_gradients(checkpointed, inputs), rtol=1e-4
    )
    assert calls == ["decoder mlp", "decoder mlp"]  # the forward, then its recomputation in backward


def encoder_plan(model):
    """`fast_plan` of `model`'s encoder for CPU inputs of its nominal shape."""
    return fast_plan(model.perceiver, torch.zeros(2, *model.config.data_shape))


@pytest.mark.parametrize("kind", KINDS)
def test_fast_paths_match_the_reference(kind):
    fast = make(kind)
    assert encoder_plan(fast) is not None  # the fast encoder really runs
    reference = make(kind, tiny_config(kind, use_fast_paths=False), state_dict=fast.state_dict())
    assert encoder_plan(reference) is None
    inputs = masked_inputs(kind)
    assert_same_outputs_and_gradients(outputs_and_gradients(fast, inputs), outputs_and_gradients(reference, inputs))


DECODER_QUERIES = {
    "fourier": {},
    "learned": {"decoder_query_type": "learned"},
    "query-inputs": {"decoder_query_inputs": True},
    "post-norm-no-ff": {"pre_norm": False, "decoder_ff_dim_scale": 0, "decoder_query_residual": False},
}


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("queries", DECODER_QUERIES)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_decoder_matches_the_reference(kind, queries, masked, autocast_dtype, monkeypatch):
    """The decoder runs the fast paths too (no reference attention is called), with the reference's outputs and
    gradients: queries shared by the batch (learned, or the Fourier positions of an unpadded input; normalised and
    projected once), per-sample ones (padded Fourier positions, query inputs), post-norm, without a feed-forward."""
    fields = DECODER_QUERIES[queries]
    fast = make(kind, **fields).train()
    reference = make(kind, tiny_config(kind, use_fast_paths=False, **fields), state_dict=fast.state_dict()).train()
    inputs = masked_inputs(kind)
    if not masked:
        inputs.pop("attention_mask")
    calls = count_reference_attention(monkeypatch)

    def run(model):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return outputs_and_gradients(model, inputs)

    fast_run = run(fast)
    assert calls == []
    reference_run = run(reference)
    assert len(calls) == num_attention_calls(reference.config) + 1  # the encoder's, then the decoder's
    if autocast_dtype is None:
        assert_same_outputs_and_gradients(fast_run, reference_run)
        return
    # bfloat16: both runs round differently; each gradient within 5 % of its largest entry (post-norm gives some ~100)
    torch.testing.assert_close(fast_run[0], reference_run[0], rtol=0.05, atol=0.1)
    for name, expected in reference_run[2].items():
        error = (fast_run[2][name] - expected).abs().max()
        assert error <= 0.05 * expected.abs().max() + 1e-3, (name, error, expected.abs().max())


def num_attention_calls(config) -> int:
    """The encoder's attention calls in one forward: a cross-attention per cross-attending step, and its block's
    self-attentions."""
    return sum(config.cross_attends(i) + config.num_latent_transformers_in_layers[i] for i in config.layers_indice)


@pytest.mark.parametrize("head", [PerceiverLiteForSequenceClassification, PerceiverLiteForImageClassification])
def test_fast_decoder_pooling_matches_the_reference(head, monkeypatch):
    """`classifier_pooling="decoder"`: the one learned query is shared by the batch; fast and reference agree."""
    data_shape = TEXT_SHAPE if head is PerceiverLiteForSequenceClassification else (3, 8, 8)
    config = tiny_config("dense", data_shape=data_shape, classifier_pooling="decoder")
    fast = head(config).train()
    reference = head(copy.deepcopy(config)).train()
    reference.config.use_fast_paths = False
    reference.load_state_dict(fast.state_dict())
    inputs = {"input_ids": token_ids(3, 10)} if head is PerceiverLiteForSequenceClassification else {
        "pixel_values": torch.randn(3, 3, 8, 8)}
    inputs["labels"] = torch.randint(0, NUM_LABELS, (3,))
    calls = count_reference_attention(monkeypatch)
    fast_run = outputs_and_gradients(fast, inputs)
    assert calls == []
    assert_same_outputs_and_gradients(fast_run, outputs_and_gradients(reference, inputs))


def _layer(model, block, index=None):
    blocks = model.perceiver.blocks
    return blocks[block].cross_layer if index is None else blocks[block].layers[index]


# option: (config fields, a check that the model is built as the option says)
ENCODER_OPTIONS = {
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


# Options the fast paths cannot run (they split keys and values with one head size): the reference must run
UNEQUAL_HEAD_WIDTHS = {"qk-v-widths"}


@pytest.mark.parametrize("option", ENCODER_OPTIONS)
@pytest.mark.parametrize("kind", ["mlm", "dense"])
def test_encoder_options_run_and_agree_with_the_reference(kind, option):
    """Each encoder option is built as configured and runs. Where the fast paths do not apply the model runs the
    reference itself (exactly `use_fast_paths=False`); where they do, they agree with it, outputs and gradients. Either
    way eager attention agrees and a padded sample gives its unpadded outputs."""
    fields, built_as_configured = ENCODER_OPTIONS[option]
    fields = fields(kind) if callable(fields) else fields
    model = make(kind, **fields)
    assert built_as_configured(model)
    plan = encoder_plan(model)
    if option in UNEQUAL_HEAD_WIDTHS:
        assert plan is None
    reference = make(kind, tiny_config(kind, use_fast_paths=False, **fields), state_dict=model.state_dict())
    eager = make(kind, tiny_config(kind, **fields), "eager", state_dict=model.state_dict())
    inputs = masked_inputs(kind)
    fast_run, reference_run = outputs_and_gradients(model, inputs), outputs_and_gradients(reference, inputs)
    if plan is None:
        assert torch.equal(fast_run[0], reference_run[0]) and torch.equal(fast_run[1], reference_run[1])
    assert_same_outputs_and_gradients(fast_run, reference_run)
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
# 6. classifier_pooling="decoder"
# ---------------------------------------------------------------------------------------------------------------------

CLASSIFIERS = {
    "image": (PerceiverLiteForImageClassification, (3, 8, 8), lambda: {"pixel_values": torch.randn(2, 3, 8, 8)}),
    "text": (PerceiverLiteForSequenceClassification, TEXT_SHAPE, lambda: {"input_ids": token_ids(2, 12)}),
    "audio": (PerceiverLiteForAudioClassification, (1, 16), lambda: {"input_values": torch.randn(2, 16)}),
}


@pytest.mark.parametrize("modality", CLASSIFIERS)
def test_classifier_pooling_decoder(modality, tmp_path):
    """One learned query cross-attends to the latents; a linear layer reads its output; save/load keeps it."""
    head_class, data_shape, make_inputs = CLASSIFIERS[modality]
    tester = PerceiverLiteModelTester(data_shape=data_shape, num_labels=NUM_LABELS)
    config = tester.get_config(classifier_pooling="decoder", decoder_dim=24, decoder_heads=2)
    model = head_class(config).eval()
    classifier = model.classifier
    assert classifier.norm is None and classifier.decoder.queries.shape == (1, 24)
    assert classifier.dense.in_features == 24
    assert head_class(tester.get_config()).classifier.decoder is None  # "mean", the default, builds none
    inputs = make_inputs()
    labels = torch.tensor([0, 2])
    outputs = model(**inputs, labels=labels)
    assert outputs.logits.shape == (2, NUM_LABELS)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))
    # the logits are the dense layer on the decoder's output for the latents
    decoded = []
    hook = classifier.decoder.register_forward_hook(lambda module, args, output: decoded.append(output[0]))
    logits = model(**inputs).logits
    torch.testing.assert_close(logits, classifier.dense(decoded[0][:, 0]), rtol=0, atol=0)
    hook.remove()  # a hook sends the model down the reference path; the loaded copy has none
    model.save_pretrained(tmp_path)
    loaded = head_class.from_pretrained(tmp_path).eval()
    # the same weights; matmul kernels may round differently on the memory-mapped (differently aligned) tensors
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-6, atol=1e-6)


def test_classifier_pooling_decoder_is_padding_invariant():
    config = PerceiverLiteModelTester(data_shape=TEXT_SHAPE, num_labels=NUM_LABELS).get_config(classifier_pooling="decoder")
    model = PerceiverLiteForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.dense.weight.normal_(0.0, 1.0)
    sample = token_ids(1, 7)
    padded = torch.cat([sample, token_ids(1, 5)], dim=1)
    alone = model(sample).logits
    torch.testing.assert_close(model(padded, attention_mask=length_mask([7], 12)).logits, alone, rtol=0, atol=ATOL)
    assert (model(padded).logits - alone).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# 7. Trainer and pipelines
# ---------------------------------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "red", "ball", "and"]
MLM_LENGTH = 24


def sentences(count: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(3, 8)))[: MLM_LENGTH - 2] for _ in range(count)]


def test_masked_lm_trains_from_scratch_and_serves_fill_mask(tmp_path):
    """From scratch, under Trainer with transformers' masking collator on PerceiverTokenizer ids: the evaluation loss
    falls well below its initial value (~ln 262), and the saved folder serves the fill-mask pipeline."""
    tokenizer = PerceiverTokenizer()
    rng = np.random.default_rng(0)

    def dataset(count):
        encoded = tokenizer(sentences(count, rng), padding="max_length", max_length=MLM_LENGTH, truncation=True)
        return Dataset.from_dict(dict(encoded))

    config = PerceiverLiteModelTester(data_shape=(16, MLM_LENGTH)).get_config(decoder_dim=16)
    model = PerceiverLiteForMaskedLM(config)
    args = training_arguments(
        tmp_path / "run", max_steps=40, learning_rate=1e-2, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        warmup_steps=5, remove_unused_columns=False,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(320), eval_dataset=dataset(64),
                      data_collator=collator, processing_class=tokenizer)  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before > 4.5, before  # untrained: about ln(262) = 5.6
    assert after < 0.7 * before, (before, after)

    folder = tmp_path / "saved"
    trainer.save_model(folder)
    loaded = AutoModelForMaskedLM.from_pretrained(folder)
    assert type(loaded) is PerceiverLiteForMaskedLM and loaded.lm_head.weight is loaded.embeddings.weight

    fill_mask = pipeline("fill-mask", model=str(folder), tokenizer=str(folder))
    assert type(fill_mask.model) is PerceiverLiteForMaskedLM
    predictions = fill_mask("the cat s[MASK]t on a mat", top_k=5)
    assert len(predictions) == 5
    scores = [prediction["score"] for prediction in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    for prediction in predictions:
        assert prediction["sequence"] == "the cat s" + prediction["token_str"] + "t on a mat"
    # learnt from the text: the best guess is one of its characters, not a special token or unseen byte
    assert predictions[0]["token_str"] in set("".join(WORDS) + " "), predictions
    # a batch of texts of different lengths (padded, masked) gives each text's own predictions
    texts = ["a d[MASK]g ran", "the cat s[MASK]t on a mat"]
    batched = fill_mask(texts, top_k=3, batch_size=2)
    for text, predictions in zip(texts, batched):
        alone = fill_mask(text, top_k=3)
        assert [p["token"] for p in predictions] == [p["token"] for p in alone]
        assert [p["score"] for p in predictions] == pytest.approx([p["score"] for p in alone], abs=1e-5)


def test_token_classification_pipeline_serves_a_saved_model(tmp_path):
    """The token-classification pipeline on a saved folder gives, per token, the model's own class and probability."""
    labels = {0: "O", 1: "A", 2: "B"}
    model = make("token", id2label=labels, label2id={name: i for i, name in labels.items()})
    tokenizer = PerceiverTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    text = "Hi there, Perceiver"
    tagger = pipeline("token-classification", model=str(tmp_path))
    assert type(tagger.model) is PerceiverLiteForTokenClassification
    entities = tagger(text, ignore_labels=[])

    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**encoded).logits.softmax(-1)[0]
    tokens = encoded["input_ids"][0]
    assert len(tokens) > TEXT_SHAPE[1]  # longer than the nominal length: Fourier queries and positions
    assert [entity["index"] for entity in entities] == list(range(1, len(tokens) - 1))  # [CLS], [SEP] dropped
    for entity in entities:
        expected = probabilities[entity["index"]]
        assert entity["entity"] == labels[expected.argmax().item()]
        assert entity["score"] == pytest.approx(expected.max().item(), abs=1e-5)
    assert "".join(entity["word"] for entity in entities) == text
    # the default ignores "O": only the other tokens
    assert [e["index"] for e in tagger(text)] == [e["index"] for e in entities if e["entity"] != "O"]


def test_image_segmentation_pipeline_serves_the_dense_head(tmp_path):
    """The image-segmentation pipeline works with the dense head and an image processor that post-processes semantic
    segmentation: the masks are the model's per-pixel argmax, upsampled to the image's size."""
    labels = {0: "sky", 1: "tree", 2: "road"}
    model = make("dense", id2label=labels, label2id={name: i for i, name in labels.items()})
    processor = transformers.SegformerImageProcessorPil(size={"height": 8, "width": 8}, do_reduce_labels=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert type(segmenter.model) is PerceiverLiteForDensePrediction
    segments = segmenter(image, subtask="semantic")

    pixel_values = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"])
    assert pixel_values.shape == (1, 3, 8, 8)
    with torch.no_grad():
        logits = model(pixel_values).logits
    expected = F.interpolate(logits, size=(12, 10), mode="bilinear", align_corners=False).argmax(1)[0]
    assert {segment["label"] for segment in segments} == {labels[i] for i in expected.unique().tolist()}
    for segment in segments:
        mask = np.array(segment["mask"])
        assert mask.shape == (12, 10)
        label_id = {name: i for i, name in labels.items()}[segment["label"]]
        np.testing.assert_array_equal(mask > 0, (expected == label_id).numpy())


# ---------------------------------------------------------------------------------------------------------------------
# 8. Bad inputs and configs
# ---------------------------------------------------------------------------------------------------------------------

IDS = token_ids(2, 10)
PIXELS = torch.randn(2, 3, 8, 8)

# (kind, config fields, inputs, error, message)
BAD_INPUTS = {
    # token heads
    "ids-float": ("mlm", {}, {"input_ids": IDS.float()}, TypeError, "`input_ids` must be an integer tensor"),
    "ids-rank": ("mlm", {}, {"input_ids": IDS[0]}, ValueError, r"`input_ids` must have shape \[B, T\]"),
    "ids-range": ("mlm", {}, {"input_ids": IDS + VOCAB_SIZE}, ValueError, "`input_ids` must be in"),
    "ids-none": ("token", {}, {}, ValueError, "Pass exactly one of `input_ids` and `inputs_embeds`"),
    "ids-and-embeds": ("mlm", {}, {"input_ids": IDS, "inputs_embeds": torch.randn(2, 10, 16)}, ValueError,
                       "Pass exactly one of `input_ids` and `inputs_embeds`"),
    "embeds-width": ("token", {}, {"inputs_embeds": torch.randn(2, 10, 15)}, ValueError,
                     r"`inputs_embeds` must have shape \[B, T, data_shape\[0\]=16\], got \[2, 10, 15\]"),
    "embeds-int": ("mlm", {}, {"inputs_embeds": torch.zeros(2, 10, 16, dtype=torch.long)}, TypeError,
                   "`inputs_embeds` must be a floating point tensor"),
    "token-ids-rank": ("token", {}, {"input_ids": IDS[:, :, None]}, ValueError, "`input_ids` must have shape"),
    "token-ids-float": ("token", {}, {"input_ids": IDS.float()}, TypeError, "`input_ids` must be an integer"),
    "mlm-mask-shape": ("mlm", {}, {"input_ids": IDS, "attention_mask": torch.ones(2, 9)}, ValueError,
                       r"`attention_mask` must have shape \[2, 10\]"),
    "mlm-mask-values": ("mlm", {}, {"input_ids": IDS, "attention_mask": torch.full((2, 10), 2)}, ValueError,
                        "`attention_mask` must hold 1"),
    "token-mask-shape": ("token", {}, {"input_ids": IDS, "attention_mask": torch.ones(2, 10, 1)}, ValueError,
                         "`attention_mask` must have shape"),
    "mlm-labels-shape": ("mlm", {}, {"input_ids": IDS, "labels": torch.zeros(2, 9, dtype=torch.long)}, ValueError,
                         r"`labels` must have shape \[2, 10\]"),
    "mlm-labels-per-sample": ("mlm", {}, {"input_ids": IDS, "labels": torch.zeros(2, dtype=torch.long)}, ValueError,
                              "`labels` must have shape"),
    "mlm-labels-dtype": ("mlm", {}, {"input_ids": IDS, "labels": torch.zeros(2, 10)}, TypeError,
                         "`labels` must be .* got dtype torch.float32"),
    "mlm-labels-range": ("mlm", {}, {"input_ids": IDS, "labels": torch.full((2, 10), VOCAB_SIZE)}, ValueError,
                         r"`labels` must be class ids in \[0, 261\]"),
    "token-labels-range": ("token", {}, {"input_ids": IDS, "labels": torch.full((2, 10), NUM_LABELS)}, ValueError,
                           r"`labels` must be class ids in \[0, 2\]"),
    "token-labels-negative": ("token", {}, {"input_ids": IDS, "labels": torch.full((2, 10), -1)}, ValueError,
                              "`labels` must be class ids"),
    "token-labels-shape": ("token", {}, {"input_ids": IDS, "labels": torch.zeros(3, 10, dtype=torch.long)},
                           ValueError, "`labels` must have shape"),
    "token-labels-dtype": ("token", {}, {"input_ids": IDS, "labels": torch.zeros(2, 10, dtype=torch.int32)},
                           TypeError, "`labels` must be"),
    "mlm-too-long-learned-queries": ("mlm", {"decoder_query_type": "learned"}, {"input_ids": token_ids(2, 13)},
                                     ValueError, "`input_ids` .* exceed the nominal grid .*`decoder_query_type`"),
    "mlm-too-long-learned-positions": ("mlm", {"position_encoding_type": "learned"}, {"input_ids": token_ids(2, 13)},
                                       ValueError, "`input_ids` .* exceed the nominal grid .*`position_encoding_type`"),
    "token-too-long-learned-queries": ("token", {"decoder_query_type": "learned"}, {"input_ids": token_ids(2, 13)},
                                       ValueError, "`input_ids` .* exceed .*`decoder_query_type`"),
    "token-too-long-learned-positions": ("token", {"position_encoding_type": "learned"},
                                         {"input_ids": token_ids(2, 13)}, ValueError,
                                         "`input_ids` .* exceed .*`position_encoding_type`"),
    # dense head
    "pixels-rank": ("dense", {}, {"pixel_values": PIXELS[0]}, ValueError, "`pixel_values` must have shape"),
    "pixels-dtype": ("dense", {}, {"pixel_values": PIXELS.long()}, TypeError,
                     "`pixel_values` must be a floating point tensor"),
    "pixels-channels": ("dense", {}, {"pixel_values": torch.randn(2, 4, 8, 8)}, ValueError, "wrong channel count"),
    "pixels-nan": ("dense", {}, {"pixel_values": PIXELS.clone().fill_(float("nan"))}, ValueError,
                   "`pixel_values` contains NaN"),
    "dense-mask-shape": ("dense", {}, {"pixel_values": PIXELS, "attention_mask": torch.ones(2, 8, 7)}, ValueError,
                         r"`attention_mask` must have shape \[2, 8, 8\] or \[2, 64\]"),
    "dense-labels-shape": ("dense", {}, {"pixel_values": PIXELS, "labels": torch.zeros(2, 8, 7, dtype=torch.long)},
                           ValueError, r"`labels` must have shape \[2, 8, 8\]"),
    "dense-labels-dtype": ("dense", {}, {"pixel_values": PIXELS, "labels": torch.zeros(2, 8, 8, dtype=torch.int32)},
                           TypeError, "`labels` must be"),
    "dense-labels-range": ("dense", {}, {"pixel_values": PIXELS, "labels": torch.full((2, 8, 8), NUM_LABELS)},
                           ValueError, "`labels` must be class ids"),
    "dense-regression-labels-shape": ("dense", {"problem_type": "regression"},
                                      {"pixel_values": PIXELS, "labels": torch.zeros(2, 8, 8)}, ValueError,
                                      r"`labels` must have shape \[2, 3, 8, 8\] \(regression targets\)"),
    "dense-multi-label-dtype": ("dense", {"problem_type": "multi_label_classification"},
                                {"pixel_values": PIXELS, "labels": torch.zeros(2, 3, 8, 8, dtype=torch.long)},
                                TypeError, "`labels` must be a floating point tensor"),
    "dense-multi-label-shape": ("dense", {"problem_type": "multi_label_classification"},
                                {"pixel_values": PIXELS, "labels": torch.zeros(2, 8, 8)}, ValueError,
                                r"`labels` must have shape \[2, 3, 8, 8\] \(multi-hot floats\)"),
    "dense-too-large-learned-queries": ("dense", {"decoder_query_type": "learned"},
                                        {"pixel_values": torch.randn(2, 3, 9, 8)}, ValueError,
                                        "`pixel_values` .* exceed the nominal grid .*`decoder_query_type`"),
    "dense-too-large-learned-positions": ("dense", {"position_encoding_type": "learned"},
                                          {"pixel_values": torch.randn(2, 3, 8, 9)}, ValueError,
                                          "`pixel_values` .* exceed the nominal grid .*`position_encoding_type`"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument_before_any_compute(case):
    kind, fields, inputs, error, match = BAD_INPUTS[case]
    model = make(kind, **fields)
    ran = []
    for module in (model.perceiver, model.decoder, *([model.embeddings] if kind != "dense" else [])):
        module.register_forward_pre_hook(lambda *args: ran.append(type(args[0]).__name__))
    with pytest.raises(error, match=match):
        model(**inputs)
    assert ran == []  # nothing was computed


def test_valid_inputs_run_the_modules_that_the_bad_input_checks_watch():
    """The companion of the test above: its hooks do see a forward that gets past the checks."""
    model = make("mlm")
    ran = []
    for module in (model.perceiver, model.decoder, model.embeddings):
        module.register_forward_pre_hook(lambda *args: ran.append(type(args[0]).__name__))
    model(IDS)
    assert ran == ["Embedding", "PerceiverLiteModel", "PerceiverLiteDecoder"]


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PerceiverLiteForMaskedLM(tiny_config("mlm", decoder_dim=24)),
         r"tie_word_embeddings.*`decoder_dim` \(24\) == `data_shape\[0\]` \(16\)"),
        (lambda: AutoModelForMaskedLM.from_config(tiny_config("mlm", decoder_dim=None)),
         r"`decoder_dim` \(32\) == `data_shape\[0\]` \(16\)"),
        (lambda: tiny_config("token", decoder_heads=3), r"`decoder_dim` \(32\) must be divisible by `decoder_heads` \(3\)"),
        (lambda: tiny_config("token", decoder_heads=2, decoder_qk_channels=9),
         r"`decoder_qk_channels` \(9\) must be divisible by `decoder_heads` \(2\)"),
        (lambda: tiny_config("token", decoder_heads=2, decoder_v_channels=15),
         r"`decoder_v_channels` \(15\) must be divisible by `decoder_heads` \(2\)"),
        (lambda: tiny_config("token", decoder_query_type="random"), r"`decoder_query_type` must be one of"),
        (lambda: tiny_config("token", classifier_pooling="cls"), r"`classifier_pooling` must be one of"),
        (lambda: tiny_config("token", decoder_ff_dim_scale=-1), r"`decoder_ff_dim_scale` must be a number >= 0"),
        (lambda: tiny_config("token", decoder_dim=0), r"`decoder_dim` must be a positive integer"),
        (lambda: tiny_config("token", decoder_heads=0), r"`decoder_heads` must be a positive integer"),
        (lambda: PerceiverLiteForTokenClassification(tiny_config("dense")),
         r"PerceiverLiteForTokenClassification needs a 1-D data_shape"),
        (lambda: PerceiverLiteForMaskedLM(tiny_config("dense", tie_word_embeddings=False)),
         r"PerceiverLiteForMaskedLM needs a 1-D data_shape"),
        # the encoder options
        (lambda: tiny_config("token", cross_attend_blocks=[2]), r"`cross_attend_blocks` must list distinct blocks"),
        (lambda: tiny_config("token", cross_attend_blocks=[0, 0]), r"`cross_attend_blocks` must list distinct"),
        (lambda: tiny_config("token", cross_attend_blocks=[]), r"`cross_attend_blocks` must list distinct"),
        (lambda: tiny_config("token", position_dim=8), r"`position_dim` is the width of learned positions"),
        (lambda: tiny_config("token", concat_positions=False), r"`concat_positions` False adds the positions"),
        (lambda: tiny_config("token", position_encoding_type="sinusoidal"), r"`position_encoding_type` must be one of"),
        (lambda: tiny_config("token", qk_channels=30), r"`qk_channels` \(30\) must be divisible by `heads` \(4\)"),
        (lambda: tiny_config("token", cross_v_channels=15), r"`cross_v_channels` \(15\) must be divisible"),
        (lambda: tiny_config("token", input_projection_dim=0), r"`input_projection_dim` must be a positive integer"),
    ],
    ids=["mlm-tied-width", "mlm-tied-width-auto", "decoder-heads", "decoder-qk", "decoder-v", "query-type",
         "classifier-pooling", "decoder-ff-scale", "decoder-dim", "decoder-heads-zero", "token-2d", "mlm-2d",
         "cross-attend-unknown-block", "cross-attend-repeated", "cross-attend-none", "position-dim-fourier",
         "added-width-mismatch", "position-type", "qk-heads", "cross-v-heads", "input-projection-zero"],
)  # fmt: skip
def test_bad_decoder_and_encoder_configs_raise_naming_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_decoder_config_in_a_saved_file_names_the_file(tmp_path):
    make("token").save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "decoder_query_type": "random"}))
    with pytest.raises(ValueError, match=r"config\.json.*`decoder_query_type` must be one of"):
        AutoModelForTokenClassification.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# 9. The package's public names
# ---------------------------------------------------------------------------------------------------------------------

NEW_PUBLIC_NAMES = [
    "PerceiverLiteDecoder",
    "PerceiverLiteDecoderOutput",
    "PerceiverLiteForMaskedLM",
    "PerceiverLiteForTokenClassification",
    "PerceiverLiteForDensePrediction",
]


def test_auto_classes_know_the_new_heads():
    assert type(AutoModelForMaskedLM.from_config(tiny_config("mlm"))) is PerceiverLiteForMaskedLM
    assert type(AutoModelForTokenClassification.from_config(tiny_config("token"))) is PerceiverLiteForTokenClassification
    assert type(AutoModelForSemanticSegmentation.from_config(tiny_config("dense"))) is PerceiverLiteForDensePrediction
    assert {PerceiverLiteForMaskedLM.pipeline_tag, PerceiverLiteForTokenClassification.pipeline_tag,
            PerceiverLiteForDensePrediction.pipeline_tag} == {"fill-mask", "token-classification", "image-segmentation"}


def test_package_exports_the_new_heads():
    """`from perceiver_lite import PerceiverLiteForMaskedLM` and the other new names, as for the earlier heads."""
    missing = [name for name in NEW_PUBLIC_NAMES if name not in perceiver_lite.__all__ or not hasattr(perceiver_lite, name)]
    assert missing == []


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_heads_take_inputs_embeds(kind):
    model = make(kind)
    input_ids = token_ids(2, 7)
    mask = length_mask([7, 5], 7)
    expected = model(input_ids, attention_mask=mask).logits
    outputs = model(inputs_embeds=model.get_input_embeddings()(input_ids), attention_mask=mask)
    torch.testing.assert_close(outputs.logits, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# sparse_prediction: only the labelled positions decoded
# ---------------------------------------------------------------------------------------------------------------------

SPARSE_CASES = {
    "fourier": {},
    "learned": {"decoder_query_type": "learned"},
    "query-inputs": {"decoder_query_inputs": True},
    "reference": {"use_fast_paths": False},
}


@pytest.mark.parametrize("case", SPARSE_CASES)
@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_sparse_prediction_gives_the_labelled_rows_loss_and_gradients_of_the_dense_model(kind, case):
    """Decoding only the labelled positions: the logits are the dense model's rows at `labels != -100`, in that order,
    the loss and every parameter's gradient are the dense model's. Sample 2 has no label at all, the others different
    counts."""
    dense = make(kind, **SPARSE_CASES[case])
    sparse = make(kind, config=dense.config, state_dict=dense.state_dict())
    sparse.config.sparse_prediction = True
    inputs = masked_inputs(kind, batch_size=4)
    inputs["labels"][2] = -100
    labelled = inputs["labels"] != -100
    assert len(set(labelled.sum(1).tolist())) > 2  # the padded columns of the gathered queries are exercised
    dense_logits, dense_loss, dense_grads = outputs_and_gradients(dense, inputs)
    sparse_logits, sparse_loss, sparse_grads = outputs_and_gradients(sparse, inputs)
    assert sparse_logits.shape == (int(labelled.sum()), dense_logits.shape[-1])
    torch.testing.assert_close(sparse_logits, dense_logits[labelled], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, gradient in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_sparse_prediction_decodes_every_position_without_labels(kind):
    dense = make(kind)
    sparse = make(kind, config=dense.config, state_dict=dense.state_dict())
    sparse.config.sparse_prediction = True
    inputs = masked_inputs(kind)
    labels = inputs.pop("labels")
    logits = sparse(**inputs).logits
    assert logits.shape[:2] == labels.shape
    torch.testing.assert_close(logits, dense(**inputs).logits, rtol=0, atol=0)


def test_sparse_prediction_with_output_attentions_is_an_error():
    model = make("mlm", attn_implementation="eager", sparse_prediction=True)
    with pytest.raises(ValueError, match="output_attentions=True needs every position decoded"):
        model(**masked_inputs("mlm"), output_attentions=True)
