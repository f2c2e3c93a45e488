"""The three task heads under transformers' `Trainer`, unchanged, and their losses by `config.problem_type`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import PerceiverLiteModelTester, training_arguments
from datasets import Dataset
from transformers import EvalPrediction, Trainer
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

from perceiver_lite import (
    PerceiverLiteForAudioClassification,
    PerceiverLiteForImageClassification,
    PerceiverLiteForSequenceClassification,
)


NUM_LABELS = 3


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


# modality: (head, data_shape of its tiny config, separable inputs for given labels, output class)
HEADS = {
    "image": (PerceiverLiteForImageClassification, (3, 8, 8), image_inputs, ImageClassifierOutput),
    "text": (PerceiverLiteForSequenceClassification, (16, 12), text_inputs, SequenceClassifierOutput),
    "audio": (PerceiverLiteForAudioClassification, (1, 16), audio_inputs, SequenceClassifierOutput),
}


def tiny_head(modality: str, **config_overrides):
    head_class, data_shape, _, _ = HEADS[modality]
    config = PerceiverLiteModelTester(data_shape=data_shape, num_labels=NUM_LABELS).get_config(**config_overrides)
    return head_class(config)


def separable_dataset(modality: str, num_samples: int) -> Dataset:
    """Inputs of the modality's head and a `label` column, as Trainer gets them from `datasets`."""
    labels = torch.arange(num_samples) % NUM_LABELS
    columns = {name: tensor.tolist() for name, tensor in HEADS[modality][2](labels).items()}
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


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Two accumulated batches of 4 make the same optimizer step as one batch of 8: Trainer scales the loss."""
    model = tiny_head("image")
    dataset = separable_dataset("image", 8)

    def weights_after_one_step(batch_size, accumulation):
        trained = copy.deepcopy(model)
        args = training_arguments(
            tmp_path / f"{batch_size}x{accumulation}",
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

    accumulated, full = weights_after_one_step(4, 2), weights_after_one_step(8, 1)
    assert not torch.equal(full["classifier.dense.weight"], model.state_dict()["classifier.dense.weight"])
    for name, weight in full.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6, msg=name)


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

    outputs = model(**HEADS[modality][2](torch.arange(BATCH_SIZE) % NUM_LABELS), labels=labels)

    assert isinstance(outputs, HEADS[modality][3])
    assert outputs.logits.shape == (BATCH_SIZE, num_labels)
    torch.testing.assert_close(outputs.loss, expected_loss(outputs.logits, labels))
    assert model.config.problem_type == problem_type
