"""A fine-tuned PerceiverLite, saved with a processor transformers already has, is served by transformers' pipelines.

Each task trains a tiny model under `Trainer` on trivially separable data, saves it with its processor into one folder
(`Trainer(processing_class=...)`), and loads that folder back by path only, offline.
"""

import numpy as np
import pytest
import torch
from conftest import PerceiverLiteModelTester, training_arguments
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PerceiverTokenizer,
    Trainer,
    ViTImageProcessorPil,
    Wav2Vec2FeatureExtractor,
    pipeline,
)

from perceiver_lite import (
    PerceiverLiteForAudioClassification,
    PerceiverLiteForImageClassification,
    PerceiverLiteForSequenceClassification,
)


SAMPLING_RATE = 1000
MAX_LENGTH = 16


def grayscale_images(labels: list[int], rng: np.random.Generator) -> list[Image.Image]:
    """8 x 8 grayscale images: dark for class 0, bright for class 1 (the pipeline converts them to RGB)."""
    levels = np.array([40, 215])[labels][:, None, None] + rng.normal(0, 15, (len(labels), 8, 8))
    return [Image.fromarray(level.clip(0, 255).astype(np.uint8), mode="L") for level in levels]


def texts(labels: list[int], rng: np.random.Generator) -> list[str]:
    """Lower-case letters for class 0, upper-case for class 1, of varying length."""
    alphabets = ["abcdefgh", "ABCDEFGH"]
    return ["".join(rng.choice(list(alphabets[label]), rng.integers(4, MAX_LENGTH))) for label in labels]


def signals(labels: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Noisy signals around -1 for class 0 and +1 for class 1, of varying length."""
    return [(2.0 * label - 1 + rng.normal(0, 0.3, rng.integers(8, MAX_LENGTH))).astype(np.float32) for label in labels]


# task: head, Auto class, the loader of its processor, data_shape, processor, raw examples, label names
TASKS = {
    "image-classification": (
        PerceiverLiteForImageClassification,
        AutoModelForImageClassification,
        AutoImageProcessor,
        (3, 8, 8),
        lambda: ViTImageProcessorPil(
            size={"height": 8, "width": 8}, do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        grayscale_images,
        ["dark", "bright"],
    ),
    "text-classification": (
        PerceiverLiteForSequenceClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        (16, MAX_LENGTH),
        PerceiverTokenizer,
        texts,
        ["lower", "upper"],
    ),
    "audio-classification": (
        PerceiverLiteForAudioClassification,
        AutoModelForAudioClassification,
        AutoFeatureExtractor,
        (1, MAX_LENGTH),
        lambda: Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=False, return_attention_mask=True),
        signals,
        ["low", "high"],
    ),
}


def process(processor, examples) -> dict:
    """Model inputs for a batch of raw examples, padded to `MAX_LENGTH` where the modality pads."""
    if isinstance(processor, ViTImageProcessorPil):
        return processor(examples, return_tensors="np")
    if isinstance(processor, PerceiverTokenizer):
        return processor(examples, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return processor(examples, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=MAX_LENGTH)


def fine_tune_and_save(task: str, output_dir) -> list[str]:
    """Train the task's tiny head on 48 separable examples and save it with its processor; returns the label names."""
    head_class, _, _, data_shape, make_processor, make_examples, label_names = TASKS[task]
    config = PerceiverLiteModelTester(data_shape=data_shape, num_labels=len(label_names)).get_config(
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)}
    )
    processor = make_processor()
    labels = [i % 2 for i in range(48)]
    inputs = process(processor, make_examples(labels, np.random.default_rng(0)))
    dataset = Dataset.from_dict({**inputs, "label": labels}).with_format("torch")
    args = training_arguments(output_dir, max_steps=36, learning_rate=3e-3, per_device_train_batch_size=8)
    trainer = Trainer(model=head_class(config), args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    trainer.save_model()
    return label_names


@pytest.fixture(scope="module", params=TASKS)
def saved_model(request, tmp_path_factory) -> tuple[str, str, list[str]]:
    """`(task, folder, label names)` of a fine-tuned model saved with its processor, once per task."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, str(folder), fine_tune_and_save(request.param, folder)


def test_pipeline_serves_a_saved_fine_tuned_model(saved_model):
    task, folder, label_names = saved_model
    head_class, auto_model, auto_processor, _, make_processor, make_examples, _ = TASKS[task]

    classifier = pipeline(task, model=folder)

    assert type(classifier.model) is head_class
    assert type(auto_model.from_pretrained(folder)) is head_class
    assert type(auto_processor.from_pretrained(folder)) is type(make_processor())
    labels = [0, 1, 1, 0, 1, 0]
    predictions = classifier(make_examples(labels, np.random.default_rng(1)), top_k=2)
    assert [prediction[0]["label"] for prediction in predictions] == [label_names[label] for label in labels]
    for prediction in predictions:
        assert {entry["label"] for entry in prediction} == set(label_names)
        assert sum(entry["score"] for entry in prediction) == pytest.approx(1.0)


def test_pipeline_scores_are_the_model_probabilities(saved_model):
    """The pipeline's scores are the softmax of the model's logits on the saved processor's inputs."""
    task, folder, label_names = saved_model
    _, auto_model, auto_processor, _, _, make_examples, _ = TASKS[task]
    example = make_examples([1], np.random.default_rng(2))[0]
    model, processor = auto_model.from_pretrained(folder).eval(), auto_processor.from_pretrained(folder)

    inputs = {name: torch.as_tensor(np.asarray(value)) for name, value in process(processor, [example]).items()}
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    prediction = pipeline(task, model=folder)(example, top_k=2)

    scores = {entry["label"]: entry["score"] for entry in prediction}
    assert scores == pytest.approx({name: probabilities[i].item() for i, name in enumerate(label_names)}, abs=1e-5)
