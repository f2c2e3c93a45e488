"""The task heads: the classifiers under transformers' `Trainer`, unchanged, and their losses by
`config.problem_type`; the Perceiver IO heads (`PerceiverLiteForMaskedLM`, `PerceiverLiteForTokenClassification`,
`PerceiverLiteForDensePrediction`): shapes, losses against hand computations, padding invariance, `inputs_embeds`,
`sparse_prediction`; `classifier_pooling="decoder"`; the package's heads and Auto classes. Every model is the tiny one
of `conftest.PerceiverLiteModelTester`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ATOL,
    MODELS,
    NUM_LABELS,
    VOCAB_SIZE,
    PerceiverLiteModelTester,
    assert_same_logits_loss_and_gradients,
    labelled_inputs,
    length_mask,
    make_head,
    tiny_config,
    logits_loss_and_gradients,
    token_ids,
    training_arguments,
)
from datasets import Dataset
import transformers
from transformers import AutoModelForMaskedLM, EvalPrediction, Trainer
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

import perceiver_lite
from perceiver_lite import PerceiverLiteDecoderOutput, PerceiverLiteForMaskedLM, PerceiverLiteForSequenceClassification



def image_inputs(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images `(B, 3, 8, 8)` whose brightness gives the class."""
    pixel_values = torch.randn(len(labels), 3, 8, 8) * 0.2 + (labels[:, None, None, None] - 1)
    return {"pixel_values": pixel_values}


def padding_mask(batch_size: int, max_length: int) -> torch.Tensor:
    """`(B, T)`, 1 for the first `length` elements of each sample, lengths from `max_length // 2` to `max_length`."""
    lengths = torch.randint(max_length // 2, max_length + 1, (batch_size,))
    return (torch.arange(max_length) < lengths[:, None]).long()


def text_inputs(labels: torch.Tensor, max_length: int = 12) -> dict[str, torch.Tensor]:
    """Byte ids `(B, T)` drawn from four ids that give the class; padding (id 0) masked out."""
    attention_mask = padding_mask(len(labels), max_length)
    input_ids = torch.randint(0, 4, (len(labels), max_length)) + 70 + 4 * labels[:, None]
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def audio_inputs(labels: torch.Tensor, max_length: int = 16) -> dict[str, torch.Tensor]:
    """Signals `(B, T)` whose level gives the class; padding (zeros) masked out."""
    attention_mask = padding_mask(len(labels), max_length)
    input_values = torch.randn(len(labels), max_length) * 0.2 + (labels[:, None] - 1)
    return {"input_values": input_values * attention_mask, "attention_mask": attention_mask}


# modality (the tester's kind of the head): (separable inputs for given labels, output class)
HEADS = {
    "image": (image_inputs, ImageClassifierOutput),
    "text": (text_inputs, SequenceClassifierOutput),
    "audio": (audio_inputs, SequenceClassifierOutput),
}


def tiny_head(modality: str, **config_overrides):
    tester = PerceiverLiteModelTester(modality)
    return tester.model_class(tester.get_config(**config_overrides))


def separable_dataset(modality: str, num_samples: int) -> Dataset:
    """Inputs of the modality's head and a `label` column, as Trainer gets them from `datasets`."""
    labels = torch.arange(num_samples) % NUM_LABELS
    columns = {name: tensor.tolist() for name, tensor in HEADS[modality][0](labels).items()}
    return Dataset.from_dict({**columns, "label": labels.tolist()}).with_format("torch")


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.mark.parametrize("modality", HEADS)
def test_head_fine_tunes_under_trainer(modality, tmp_path):
    """Labels found by name, evaluation loss and metrics, gradient accumulation, bf16 autocast on CPU and gradient
    checkpointing, all through Trainer's own flags: the evaluation loss falls and the classes are learnt."""
    model = tiny_head(modality)
    args = training_arguments(
        tmp_path,
        max_steps=48,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        bf16=True,
        activation_checkpointing=True,  # `gradient_checkpointing` in transformers < 5
        eval_strategy="steps",
        eval_steps=24,
        logging_steps=5,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=separable_dataset(modality, 48),
        eval_dataset=separable_dataset(modality, 24),
        compute_metrics=accuracy,
    )
    assert trainer.label_names == ["labels"]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert model.is_activation_checkpointing
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [24, 48, 48]
    assert after["eval_loss"] < 0.5 * before["eval_loss"], (before, after)
    assert after["eval_accuracy"] >= 0.9, after


def weights_after_one_step(model, dataset, output_dir, batch_size: int, accumulation: int) -> dict:
    """The weights of a copy of `model` after one SGD step through Trainer over `accumulation` batches of
    `batch_size`."""
    trained = copy.deepcopy(model)
    args = training_arguments(
        output_dir / f"{batch_size}x{accumulation}",
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    Trainer(model=trained, args=args, train_dataset=dataset).train()
    return trained.state_dict()


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Two accumulated batches of 4 make the same optimizer step as one batch of 8: Trainer scales the loss."""
    model = tiny_head("image")
    dataset = separable_dataset("image", 8)
    accumulated = weights_after_one_step(model, dataset, tmp_path, 4, 2)
    full = weights_after_one_step(model, dataset, tmp_path, 8, 1)
    assert not torch.equal(full["classifier.dense.weight"], model.state_dict()["classifier.dense.weight"])
    for name, weight in full.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def unevenly_labelled(num_classes: int) -> Dataset:
    """8 sequences of 12 tokens, one with every token labelled (class ids below `num_classes`), seven with one each:
    however Trainer draws batches of 4, their counts of labelled tokens differ (15 and 4). The same in every process."""
    input_ids = torch.randint(0, VOCAB_SIZE, (8, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(input_ids, -100)
    labels[0] = input_ids[0] % num_classes
    labels[1:, 3] = 1
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()}).with_format("torch")


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_heads_accumulate_as_one_large_batch_of_tokens(kind, tmp_path):
    """Accumulated batches with different counts of labelled tokens make the optimizer step of one large batch: Trainer
    passes the token heads its count of labels over the accumulated batches (`num_items_in_batch`), and each labelled
    token weighs alike. (The mean of the batches' means would weigh a token of the sparsely labelled batch more.)"""
    model = tiny_head(kind)
    dataset = unevenly_labelled(model.config.num_labels if kind == "token" else VOCAB_SIZE)
    accumulated = weights_after_one_step(model, dataset, tmp_path, 4, 2)
    full = weights_after_one_step(model, dataset, tmp_path, 8, 1)
    changed = [name for name, weight in full.items() if not torch.equal(weight, model.state_dict()[name])]
    assert changed
    for name in changed:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


BATCH_SIZE = 4

# case: (problem_type, num_labels, labels, torch's loss on (logits, labels))
PROBLEMS = {
    "single-label": (
        "single_label_classification",
        NUM_LABELS,
        lambda: torch.tensor([0, 2, -100, 1]),  # -100 is ignored, as in transformers
        F.cross_entropy,
    ),
    "multi-label": (
        "multi_label_classification",
        NUM_LABELS,
        lambda: torch.randint(0, 2, (BATCH_SIZE, NUM_LABELS)).float(),
        F.binary_cross_entropy_with_logits,
    ),
    "regression": (
        "regression",
        1,
        lambda: torch.randn(BATCH_SIZE),
        lambda logits, labels: F.mse_loss(logits[:, 0], labels),
    ),
    "multi-target regression": ("regression", NUM_LABELS, lambda: torch.randn(BATCH_SIZE, NUM_LABELS), F.mse_loss),
}


# Without `config.problem_type` transformers infers it from num_labels and the labels' dtype; float labels for several
# outputs are then multi-label, so multi-target regression must be configured.
LOSS_CASES = [(case, True) for case in PROBLEMS]
LOSS_CASES += [(case, False) for case in PROBLEMS if case != "multi-target regression"]
LOSS_CASE_IDS = [f"{case}-{'configured' if configured else 'inferred'}" for case, configured in LOSS_CASES]


@pytest.mark.parametrize("modality", HEADS)
@pytest.mark.parametrize("case, configured", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_loss_by_problem_type(modality, case, configured):
    """The loss is torch's loss for the problem type, configured or inferred (and then recorded in the config)."""
    problem_type, num_labels, make_labels, expected_loss = PROBLEMS[case]
    model = tiny_head(modality, num_labels=num_labels, problem_type=problem_type if configured else None).eval()
    labels = make_labels()

    outputs = model(**HEADS[modality][0](torch.arange(BATCH_SIZE) % NUM_LABELS), labels=labels)

    assert isinstance(outputs, HEADS[modality][1])
    assert outputs.logits.shape == (BATCH_SIZE, num_labels)
    torch.testing.assert_close(outputs.loss, expected_loss(outputs.logits, labels))
    assert model.config.problem_type == problem_type


# ---------------------------------------------------------------------------------------------------------------------
# Perceiver IO heads: output shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_type, lengths", [("fourier", [1, 5, 12, 20]), ("learned", [1, 5, 12])])
def test_masked_lm_logits_one_per_token_for_any_length(query_type, lengths):
    """One prediction per input token, for inputs shorter than the nominal length (and longer, with Fourier queries)."""
    model = make_head("mlm", decoder_query_type=query_type)
    for length in lengths:
        outputs = model(token_ids(2, length))
        assert isinstance(outputs, PerceiverLiteDecoderOutput)
        assert outputs.logits.shape == (2, length, VOCAB_SIZE)
        assert outputs.loss is None
        assert torch.isfinite(outputs.logits).all()


@pytest.mark.parametrize("length", [3, 12, 17])
def test_token_classification_logits_shape(length):
    model = make_head("token")
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
    model = make_head("dense", data_shape=data_shape)
    for spatial_shape in spatial_shapes:
        pixel_values = torch.randn(2, data_shape[0], *spatial_shape)
        assert model(pixel_values).logits.shape == (2, NUM_LABELS, *spatial_shape)


def test_dense_logits_follow_their_element():
    """The channel-first reshape keeps each element's logits at its own place: permuting the queries' positions is
    not what happens (the logits of element (i, j) come from its own decoder output)."""
    model = make_head("dense")
    pixel_values = torch.randn(1, 3, 5, 7)
    decoded = []
    model.decoder.register_forward_hook(lambda module, args, output: decoded.append(output[0]))
    logits = model(pixel_values).logits  # (1, L, 5, 7)
    per_element = model.classifier(decoded[0])  # (1, 35, L), row-major positions
    torch.testing.assert_close(logits[0, :, 2, 3], per_element[0, 2 * 7 + 3], rtol=0, atol=0)
    torch.testing.assert_close(logits[0, :, 4, 6], per_element[0, 34], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Perceiver IO heads: losses
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_losses_are_cross_entropy_over_labelled_tokens(kind):
    model = make_head(kind)
    inputs = labelled_inputs(kind)
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
    model = make_head("token")
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
    model = make_head("dense", **overrides)
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
    model = make_head("dense")
    pixel_values = torch.randn(2, 3, 4, 4)
    outputs = model(pixel_values, labels=torch.randint(0, 2, (2, NUM_LABELS, 4, 4)).float())
    assert model.config.problem_type == "multi_label_classification"
    assert torch.isfinite(outputs.loss)
    model = make_head("dense")
    model(pixel_values, labels=torch.randint(0, NUM_LABELS, (2, 4, 4)))
    assert model.config.problem_type == "single_label_classification"


def test_dense_one_dimensional_loss_with_flat_mask():
    """A 1-D dense head (per-time-step classes) with a flattened `(B, M)` mask."""
    model = make_head("dense", data_shape=(2, 12))
    signals, labels = torch.randn(2, 2, 9), torch.randint(0, NUM_LABELS, (2, 9))
    mask = length_mask([9, 5], 9)
    outputs = model(signals, labels=labels, attention_mask=mask)
    assert outputs.logits.shape == (2, NUM_LABELS, 9)
    valid = mask.bool()
    expected = F.cross_entropy(outputs.logits.transpose(1, 2)[valid], labels[valid])
    torch.testing.assert_close(outputs.loss, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Perceiver IO heads: padding invariance
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
    model = make_head(kind, **POSITION_VARIANTS[variant])
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
    model = make_head("dense", **POSITION_VARIANTS[variant])
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
    model = make_head("mlm")
    input_ids = token_ids(3, 9)
    batch = model(input_ids).logits
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], model(input_ids[i : i + 1]).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_token_heads_take_inputs_embeds(kind):
    model = make_head(kind)
    input_ids = token_ids(2, 7)
    mask = length_mask([7, 5], 7)
    expected = model(input_ids, attention_mask=mask).logits
    outputs = model(inputs_embeds=model.get_input_embeddings()(input_ids), attention_mask=mask)
    torch.testing.assert_close(outputs.logits, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# classifier_pooling="decoder"
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", HEADS)
def test_classifier_pooling_decoder(modality, tmp_path):
    """One learned query cross-attends to the latents; a linear layer reads its output; save/load keeps it."""
    tester = PerceiverLiteModelTester(modality)
    head_class = tester.model_class
    config = tester.get_config(classifier_pooling="decoder", decoder_dim=24, decoder_heads=2)
    model = head_class(config).eval()
    classifier = model.classifier
    assert classifier.norm is None and classifier.decoder.queries.shape == (1, 24)
    assert classifier.dense.in_features == 24
    assert head_class(tester.get_config()).classifier.decoder is None  # "mean", the default, builds none
    labels = torch.tensor([0, 2])
    inputs = HEADS[modality][0](labels)
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
    model = PerceiverLiteForSequenceClassification(tiny_config("text", classifier_pooling="decoder")).eval()
    with torch.no_grad():
        model.classifier.dense.weight.normal_(0.0, 1.0)
    sample = token_ids(1, 7)
    padded = torch.cat([sample, token_ids(1, 5)], dim=1)
    alone = model(sample).logits
    torch.testing.assert_close(model(padded, attention_mask=length_mask([7], 12)).logits, alone, rtol=0, atol=ATOL)
    assert (model(padded).logits - alone).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# sparse_prediction: only the labelled positions decoded
# ---------------------------------------------------------------------------------------------------------------------

SPARSE_CASES = {
    "fourier": {},
    "learned": {"decoder_query_type": "learned"},
    "query-inputs": {"decoder_query_inputs": True},
    "reference": {"use_fast_paths": False},
    "decoder-wider": {"decoder_dim": 24},  # the masked LM projects to the tied embedding's width
}


@pytest.mark.parametrize("case", SPARSE_CASES)
@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_sparse_prediction_gives_the_labelled_rows_loss_and_gradients_of_the_dense_model(kind, case):
    """Decoding only the labelled positions: the logits are the dense model's rows at `labels != -100`, in that order,
    the loss and every parameter's gradient are the dense model's. Sample 2 has no label at all, the others different
    counts."""
    dense = make_head(kind, **SPARSE_CASES[case])
    sparse = make_head(kind, config=dense.config, state_dict=dense.state_dict())
    sparse.config.sparse_prediction = True
    inputs = labelled_inputs(kind, batch_size=4)
    inputs["labels"][2] = -100
    labelled = inputs["labels"] != -100
    assert len(set(labelled.sum(1).tolist())) > 2  # the padded columns of the gathered queries are exercised
    dense_logits, dense_loss, dense_grads = logits_loss_and_gradients(dense, inputs)
    sparse_logits, sparse_loss, sparse_grads = logits_loss_and_gradients(sparse, inputs)
    assert sparse_logits.shape == (int(labelled.sum()), dense_logits.shape[-1])
    torch.testing.assert_close(sparse_logits, dense_logits[labelled], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, gradient in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["mlm", "token"])
def test_sparse_prediction_decodes_every_position_without_labels(kind):
    dense = make_head(kind)
    sparse = make_head(kind, config=dense.config, state_dict=dense.state_dict())
    sparse.config.sparse_prediction = True
    inputs = labelled_inputs(kind)
    labels = inputs.pop("labels")
    logits = sparse(**inputs).logits
    assert logits.shape[:2] == labels.shape
    torch.testing.assert_close(logits, dense(**inputs).logits, rtol=0, atol=0)


def test_sparse_prediction_with_output_attentions_is_an_error():
    model = make_head("mlm", attn_implementation="eager", sparse_prediction=True)
    with pytest.raises(ValueError, match="output_attentions=True needs every position decoded"):
        model(**labelled_inputs("mlm"), output_attentions=True)


# ---------------------------------------------------------------------------------------------------------------------
# The package's heads and their Auto classes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_auto_classes_and_pipeline_tags_know_every_model(kind):
    model_class, auto_class, *_, pipeline_tag = MODELS[kind]
    assert type(getattr(transformers, auto_class).from_config(tiny_config(kind))) is model_class
    assert model_class.pipeline_tag == pipeline_tag


def test_package_exports_every_model_and_the_decoder():
    """`from perceiver_lite import PerceiverLiteForMaskedLM`, and so on for every model class."""
    names = [kind.model_class.__name__ for kind in MODELS.values()]
    names += ["PerceiverLiteDecoder", "PerceiverLiteDecoderOutput"]
    missing = [name for name in names if name not in perceiver_lite.__all__ or not hasattr(perceiver_lite, name)]
    assert missing == []


# ---------------------------------------------------------------------------------------------------------------------
# The masked LM at any decoder width: a tied lm_head of the embedding's width
# ---------------------------------------------------------------------------------------------------------------------

WIDTHS = {"narrower": 8, "wider": 24}  # decoder_dim beside the token embedding's 16 channels


@pytest.mark.parametrize("width", WIDTHS)
def test_masked_lm_projects_to_the_tied_embedding_width(width):
    """Where `decoder_dim` is not `data_shape[0]` the decoder's outputs are projected to the embedding's width (linear,
    activation, LayerNorm, as ALBERT's masked-LM head), then go through the tied `lm_head`."""
    model = make_head("mlm", decoder_dim=WIDTHS[width])
    transform = model.lm_transform
    assert (transform.dense.in_features, transform.dense.out_features) == (WIDTHS[width], 16)
    assert transform.norm.normalized_shape == (16,)
    assert model.lm_head.weight is model.embeddings.weight and model.lm_head.weight.shape == (VOCAB_SIZE, 16)
    decoded = []
    model.decoder.register_forward_hook(lambda module, args, output: decoded.append(output[0]))
    input_ids = token_ids(2, 7)
    logits = model(input_ids).logits
    assert decoded[0].shape == (2, 7, WIDTHS[width])
    hidden = F.layer_norm(
        F.gelu(transform.dense(decoded[0])), (16,), transform.norm.weight, transform.norm.bias, transform.norm.eps
    )
    torch.testing.assert_close(logits, hidden @ model.embeddings.weight.T + model.lm_head.bias, rtol=1e-5, atol=1e-5)


def test_masked_lm_of_the_embedding_width_has_no_projection():
    """`decoder_dim == data_shape[0]` (transformers' checkpoints): the decoder's outputs go straight to the tied
    `lm_head`, no parameter is added."""
    model = make_head("mlm")
    assert model.config.decoder_width == model.config.data_shape[0] and model.lm_transform is None
    assert not any(name.startswith("lm_transform") for name in model.state_dict())
    untied = make_head("mlm", decoder_dim=24, tie_word_embeddings=False)  # its own lm_head, of the decoder's width
    assert untied.lm_transform is None and untied.lm_head.weight.shape == (VOCAB_SIZE, 24)


@pytest.mark.parametrize("width", WIDTHS)
def test_masked_lm_at_another_width_trains(width):
    """A few optimizer steps on one batch lower the loss; the tied embedding learns through both of its uses."""
    model = make_head("mlm", decoder_dim=WIDTHS[width]).train()
    inputs = labelled_inputs("mlm")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        assert model.lm_transform.dense.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses
    assert model.lm_head.weight is model.embeddings.weight


@pytest.mark.parametrize("width", WIDTHS)
def test_masked_lm_at_another_width_round_trips_tied(width, tmp_path):
    model = make_head("mlm", decoder_dim=WIDTHS[width])
    inputs = labelled_inputs("mlm")
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is PerceiverLiteForMaskedLM and not any(info.values()), info
    assert loaded.lm_head.weight is loaded.embeddings.weight
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    outputs = loaded.eval()(**inputs)
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize("width", WIDTHS)
def test_masked_lm_at_another_width_fast_paths_match_the_reference(width):
    fast = make_head("mlm", decoder_dim=WIDTHS[width]).train()
    reference = make_head("mlm", tiny_config("mlm", decoder_dim=WIDTHS[width], use_fast_paths=False),
                          state_dict=fast.state_dict()).train()  # fmt: skip
    inputs = labelled_inputs("mlm")
    assert_same_logits_loss_and_gradients(logits_loss_and_gradients(fast, inputs), logits_loss_and_gradients(reference, inputs))
