"""A fine-tuned PerceiverLite, saved with a processor transformers already has, is served by transformers' pipelines.

Each classification task trains a tiny model under `Trainer` on trivially separable data, saves it with its processor
into one folder (`Trainer(processing_class=...)`), and loads that folder back by path only, offline. The Perceiver IO
heads serve fill-mask (trained from scratch), token classification and image segmentation.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import MODELS, PerceiverLiteModelTester, make_head, training_arguments
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PerceiverTokenizer,
    Trainer,
    ViTImageProcessorPil,
    Wav2Vec2FeatureExtractor,
    pipeline,
)

from perceiver_lite import (
    PerceiverLiteForDensePrediction,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForTokenClassification,
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


# task: the tester's kind of the head, Auto class, the loader of its processor, data_shape, processor, raw examples, label names
TASKS = {
    "image-classification": (
        "image",
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
        "text",
        AutoModelForSequenceClassification,
        AutoTokenizer,
        (16, MAX_LENGTH),
        PerceiverTokenizer,
        texts,
        ["lower", "upper"],
    ),
    "audio-classification": (
        "audio",
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
    kind, _, _, data_shape, make_processor, make_examples, label_names = TASKS[task]
    config = PerceiverLiteModelTester(kind, data_shape=data_shape, num_labels=len(label_names)).get_config(
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)}
    )
    processor = make_processor()
    labels = [i % 2 for i in range(48)]
    inputs = process(processor, make_examples(labels, np.random.default_rng(0)))
    dataset = Dataset.from_dict({**inputs, "label": labels}).with_format("torch")
    args = training_arguments(output_dir, max_steps=36, learning_rate=3e-3, per_device_train_batch_size=8)
    trainer = Trainer(model=MODELS[kind].model_class(config), args=args, train_dataset=dataset, processing_class=processor)
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
    kind, auto_model, auto_processor, _, make_processor, make_examples, _ = TASKS[task]
    head_class = MODELS[kind].model_class

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


# ---------------------------------------------------------------------------------------------------------------------
# The Perceiver IO heads
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

    config = PerceiverLiteModelTester("mlm", data_shape=(16, MLM_LENGTH)).get_config()
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
    model = make_head("token", id2label=labels, label2id={name: i for i, name in labels.items()})
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
    assert len(tokens) > model.config.data_shape[1]  # longer than the nominal length: Fourier queries and positions
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
    model = make_head("dense", id2label=labels, label2id={name: i for i, name in labels.items()})
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


@pytest.mark.parametrize("decoder_dim", [8, 24], ids=["narrower", "wider"])
def test_fill_mask_serves_a_masked_lm_of_another_width(decoder_dim, tmp_path):
    """A masked LM whose decoder is narrower or wider than its tied token embedding (16 channels) serves fill-mask: the
    scores are the model's probabilities at the masked position."""
    model = make_head("mlm", decoder_dim=decoder_dim)
    tokenizer = PerceiverTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill_mask = pipeline("fill-mask", model=str(tmp_path))
    assert type(fill_mask.model) is PerceiverLiteForMaskedLM and fill_mask.model.lm_transform is not None

    text = "a d[MASK]g ran"
    predictions = fill_mask(text, top_k=3)
    encoded = tokenizer(text, return_tensors="pt")
    position = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    with torch.no_grad():
        probabilities = model(**encoded).logits[0, position].softmax(-1)
    top = probabilities.topk(3)
    assert [prediction["token"] for prediction in predictions] == top.indices.tolist()
    assert [prediction["score"] for prediction in predictions] == pytest.approx(top.values.tolist(), abs=1e-5)
