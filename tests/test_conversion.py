"""`scripts/convert_transformers_perceiver.py`: transformers Perceivers into perceiver-lite, exactly.

Small randomly initialised transformers Perceivers of the four supported classes, in several shapes (several heads,
non-default query/key and value widths, `num_blocks > 1`, different widening factors, `use_query_residual` both ways)
are saved and converted from their folders. The converted models give transformers' logits within `ATOL` (eval mode,
float32), for text shorter than `max_position_embeddings` and with padding masks, also where loaded from the folder
without this package (`trust_remote_code=True`, through `remote_code_loader.py`). Bad sources raise clear errors.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import load_without_package
from safetensors import safe_open
from safetensors.torch import load_file, save_file


TESTS_DIR = Path(__file__).parent
SCRIPT = TESTS_DIR.parent / "scripts" / "convert_transformers_perceiver.py"
ATOL = 1e-5
BATCH_SIZE = 3


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_transformers_perceiver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


converter = load_converter()

TEXT = dict(d_model=24, vocab_size=30, max_position_embeddings=12)
WIDTHS = dict(qk_channels=16, v_channels=32)  # v_channels = d_latents: transformers' latent layers need it
# name -> (transformers class, PerceiverConfig fields beyond `small_config`'s)
SOURCES = {
    "mlm": ("PerceiverForMaskedLM", dict(
        TEXT, **WIDTHS, num_blocks=2, num_self_attention_heads=4, num_cross_attention_heads=2,
        cross_attention_widening_factor=2, self_attention_widening_factor=3,
    )),
    "mlm-no-query-residual": ("PerceiverForMaskedLM", dict(
        TEXT, d_model=16, num_blocks=3, num_self_attends_per_block=1, num_cross_attention_heads=4,
        use_query_residual=False,
    )),
    "text": ("PerceiverForSequenceClassification", dict(
        TEXT, **WIDTHS, num_blocks=2, num_self_attention_heads=4, num_cross_attention_heads=2, use_query_residual=False,
        cross_attention_widening_factor=3, self_attention_widening_factor=2,
    )),
    "text-q-shaped": ("PerceiverForSequenceClassification", dict(
        TEXT, cross_attention_shape_for_attention="q", num_cross_attention_heads=8,
    )),
    "fourier": ("PerceiverForImageClassificationFourier", dict(
        image_size=6, d_latents=36, num_blocks=2, num_self_attention_heads=2, num_cross_attention_heads=3,
        cross_attention_widening_factor=2,
    )),
    "fourier-narrow": ("PerceiverForImageClassificationFourier", dict(
        image_size=[5, 7], qk_channels=24, v_channels=32, num_cross_attention_heads=4, use_query_residual=False,
    )),
    "learned": ("PerceiverForImageClassificationLearned", dict(
        image_size=4, num_blocks=2, num_self_attention_heads=4, num_cross_attention_heads=4,
        self_attention_widening_factor=2,
    )),
    "learned-narrow": ("PerceiverForImageClassificationLearned", dict(
        image_size=3, qk_channels=8, v_channels=32, num_self_attention_heads=2, num_cross_attention_heads=2,
        use_query_residual=False,
    )),
}  # fmt: skip
AUTO_CLASSES = {
    "PerceiverForMaskedLM": "AutoModelForMaskedLM",
    "PerceiverForSequenceClassification": "AutoModelForSequenceClassification",
    "PerceiverForImageClassificationFourier": "AutoModelForImageClassification",
    "PerceiverForImageClassificationLearned": "AutoModelForImageClassification",
}
LITE_CLASSES = {
    "PerceiverForMaskedLM": "PerceiverLiteForMaskedLM",
    "PerceiverForSequenceClassification": "PerceiverLiteForSequenceClassification",
    "PerceiverForImageClassificationFourier": "PerceiverLiteForImageClassification",
    "PerceiverForImageClassificationLearned": "PerceiverLiteForImageClassification",
}


def small_config(**fields) -> transformers.PerceiverConfig:
    common = dict(num_latents=6, d_latents=32, num_self_attends_per_block=2, num_labels=3, hidden_act="gelu")
    return transformers.PerceiverConfig(**{**common, **fields})


@torch.no_grad()
def randomise(model, seed: int = 0):
    """Weights of unit-scale activations (transformers' init, std 0.02, would make every logit nearly 0): LayerNorm
    scales near 1, other vectors near 0, matrices and tables with std 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.dim() == 1:
            parameter.copy_(0.1 * noise + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
        else:
            parameter.copy_(noise * parameter[0].numel() ** -0.5)
    return model.eval()


def build_source(name: str):
    class_name, fields = SOURCES[name]
    return randomise(getattr(transformers, class_name)(small_config(**fields)))


def text_inputs(config, length: int, seed: int = 0) -> dict:
    """Token ids of `length` with padding masks: sample 1 ends with 3 padding tokens, sample 2 with 1."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (BATCH_SIZE, length), generator=generator)
    attention_mask = torch.ones(BATCH_SIZE, length, dtype=torch.long)
    attention_mask[1, length - 3 :] = 0
    attention_mask[2, length - 1 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def image_inputs(height: int, width: int, seed: int = 0) -> dict:
    """A batch of random RGB images of `height` x `width`."""
    return {"pixel_values": torch.randn(BATCH_SIZE, 3, height, width, generator=torch.Generator().manual_seed(seed))}


def example_inputs(source) -> list[dict]:
    """Inputs both models take: text of full and shorter length, images of the nominal size (and of another size
    where the positions are Fourier features, which fit any size)."""
    config = source.config
    if "Image" not in type(source).__name__:
        return [text_inputs(config, config.max_position_embeddings), text_inputs(config, 7, seed=1)]
    size = [config.image_size] * 2 if isinstance(config.image_size, int) else config.image_size
    inputs = [image_inputs(*size)]
    if "Fourier" in type(source).__name__:
        inputs.append(image_inputs(size[0] + 2, size[1] - 1, seed=1))
    return inputs


@torch.no_grad()
def transformers_logits(source, inputs: dict) -> torch.Tensor:
    """transformers' logits, for masked LM the first T of its `max_position_embeddings` outputs."""
    main_input = "input_ids" if "input_ids" in inputs else "pixel_values"
    source_inputs = {("inputs" if key == main_input else key): value for key, value in inputs.items()}
    logits = source(**source_inputs).logits
    return logits[:, : inputs[main_input].shape[1]].contiguous() if logits.dim() == 3 else logits


@torch.no_grad()
def max_difference(source, lite_model, inputs: dict) -> float:
    return (lite_model(**inputs).logits - transformers_logits(source, inputs)).abs().max().item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each source saved by transformers and converted from its folder: name -> (source, folder, converted model)."""
    root = tmp_path_factory.mktemp("conversion")
    result = {}
    for name in SOURCES:
        source = build_source(name)
        source.save_pretrained(root / "sources" / name)
        lite_model = converter.convert(root / "sources" / name, root / "converted" / name)
        result[name] = (source, root / "converted" / name, lite_model)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOURCES))
def test_converted_model_gives_transformers_logits(converted, name):
    source, _, lite_model = converted[name]
    assert type(lite_model).__name__ == LITE_CLASSES[type(source).__name__]
    for inputs in example_inputs(source):
        expected = transformers_logits(source, inputs)
        assert expected.abs().max() > 0.5  # logits of unit scale: the tolerance means something
        with torch.no_grad():
            torch.testing.assert_close(lite_model(**inputs).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [(6, 6), (5, 7), (56, 56)])
def test_fourier_features_are_transformers_values(converted, size):
    source, _, lite_model = converted["fourier"]
    [pixel_values] = image_inputs(*size).values()
    with torch.no_grad():
        expected, _, _ = source.perceiver.input_preprocessor(pixel_values)
        features = lite_model.perceiver.embeddings(pixel_values)
    order = converter.fourier_column_order(3, 2, lite_model.config.num_bands)
    torch.testing.assert_close(features, expected[..., order], atol=0, rtol=0)


def test_fourier_column_order_is_a_permutation():
    order = converter.fourier_column_order(3, 2, 4)
    assert sorted(order) == list(range(3 + 2 * 9))
    # data, then axis 0: x0 (transformers' column 3), its sines (5..8), its cosines (13..16); then axis 1
    assert order[:12] == [0, 1, 2, 3, 5, 6, 7, 8, 13, 14, 15, 16]
    assert order[12:] == [4, 9, 10, 11, 12, 17, 18, 19, 20]


def test_converted_config_mirrors_the_source(converted):
    source, _, lite_model = converted["text"]
    config = lite_model.config
    assert config.layers_indice == [0, 1, 1] and config.num_latent_transformers_in_layers == [0, 2]
    assert config.cross_attend_blocks == [0]
    assert (config.cross_heads, config.cross_qk_channels, config.cross_v_channels) == (2, 16, 32)
    assert (config.heads, config.qk_channels, config.v_channels) == (4, 16, 32)
    assert (config.cross_ff_dim, config.ff_dim) == (96, 64)
    assert config.cross_attention_query_residual is False
    assert config.id2label == source.config.id2label and config.num_labels == 3
    # transformers' cross-attention defaults its query/key width to the inputs' (d_model), or with "q" to d_latents
    assert converted["mlm-no-query-residual"][2].config.cross_qk_channels == 16
    assert converted["text-q-shaped"][2].config.cross_qk_channels == 32
    assert converted["fourier"][2].config.cross_qk_channels == 3 + 2 * (2 * 64 + 1)


def test_masked_lm_output_projection_is_tied_to_the_token_embedding(converted):
    _, folder, lite_model = converted["mlm"]
    assert lite_model.lm_head.weight is lite_model.embeddings.weight
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(folder)
    assert reloaded.lm_head.weight is reloaded.embeddings.weight


# ---------------------------------------------------------------------------------------------------------------------
# The converted folder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlm", "text", "fourier", "learned"])
def test_converted_folder_loads_with_its_auto_class(converted, name):
    source, folder, lite_model = converted[name]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "perceiver_lite"
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    auto_class = getattr(transformers, AUTO_CLASSES[type(source).__name__])
    reloaded = auto_class.from_pretrained(folder).eval()
    assert type(reloaded) is type(lite_model)
    for inputs in example_inputs(source):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, lite_model(**inputs).logits, atol=ATOL, rtol=0)


def test_converted_folders_load_without_the_package(converted, tmp_path):
    """Each converted folder loads with `trust_remote_code=True` in a Python that cannot import perceiver_lite and
    gives transformers' logits (text shorter than max_position_embeddings, no mask: the loader passes one input)."""
    names = ["mlm", "text", "fourier", "learned"]
    cases = []
    for name in names:
        source, folder, lite_model = converted[name]
        main_input = example_inputs(source)[-1][lite_model.main_input_name]
        expected = transformers_logits(source, {lite_model.main_input_name: main_input})
        reference = tmp_path / f"{name}.safetensors"
        save_file({"inputs": main_input, "expected": expected}, reference, metadata={"output": "logits"})
        auto_class = AUTO_CLASSES[type(source).__name__]
        cases.append({"folder": str(folder), "auto_class": auto_class, "reference": str(reference)})
    report = load_without_package(cases, tmp_path / "run")
    assert report["package_importable_before"] is False and report["package_modules"] == []
    for name, case in zip(names, report["cases"]):
        assert case["model_class"] == LITE_CLASSES[SOURCES[name][0]], case
        assert case["module"].startswith("transformers_modules."), case
        assert case["max_abs_diff"] <= ATOL and case["resaved_max_abs_diff"] <= ATOL, case


def test_convert_a_model_object_without_saving():
    source = build_source("learned-narrow")
    lite_model = converter.convert(source)
    assert not lite_model.training
    [inputs] = example_inputs(source)
    assert max_difference(source, lite_model, inputs) <= ATOL


def test_command_line_converts_verifies_and_casts(converted, tmp_path, capsys):
    source_folder = converted["text"][1].parent.parent / "sources" / "text"
    assert converter.main([str(source_folder), str(tmp_path / "out"), "--dtype", "bfloat16", "--verify"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["max_abs_diff_logits"] <= ATOL  # compared in float32, before the cast
    assert "PerceiverForSequenceClassification -> PerceiverLiteForSequenceClassification" in lines[-1]
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as weights:
        assert weights.get_tensor("perceiver.latents").dtype == torch.bfloat16


def test_command_line_reports_errors(tmp_path, capsys):
    assert converter.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert f"`{tmp_path / 'missing'}`: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", ["PerceiverModel", "PerceiverForOpticalFlow"])
def test_unsupported_classes_are_refused(model_class, tmp_path):
    config = small_config(num_cross_attention_heads=1, num_self_attention_heads=1, train_size=[4, 4], d_model=32)
    model = getattr(transformers, model_class)(config)
    message = f"is a {model_class}; only PerceiverForMaskedLM, PerceiverForSequenceClassification"
    with pytest.raises(converter.ConversionError, match=f"`model_or_path` {message}"):
        converter.convert(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(converter.ConversionError, match=f"`{tmp_path}` {message}"):
        converter.convert(tmp_path)


def test_other_objects_are_refused():
    with pytest.raises(converter.ConversionError, match="`model_or_path` is a Linear"):
        converter.convert(torch.nn.Linear(2, 2))


def test_a_folder_of_another_model_is_refused(tmp_path):
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(converter.ConversionError, match="holds a `bert` model, not a transformers Perceiver"):
        converter.convert(tmp_path)


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"`{tmp_path / 'missing'}`: no such folder"):
        converter.convert(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"`{tmp_path}` has no config.json"):
        converter.convert(tmp_path)


@pytest.fixture
def saved_copy(converted, tmp_path):
    """A fresh copy of the saved `text` source, to break."""
    source, _, _ = converted["text"]
    source.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_weights_file_lacking_a_tensor_is_named(saved_copy):
    weights = load_file(saved_copy / "model.safetensors")
    del weights["perceiver.encoder.self_attends.1.mlp.dense1.weight"]
    save_file(weights, saved_copy / "model.safetensors", metadata={"format": "pt"})
    message = r"\(model.safetensors\) lack `perceiver.encoder.self_attends.1.mlp.dense1.weight`, which config.json"
    with pytest.raises(converter.ConversionError, match=f"`{saved_copy}`: the weights {message} describes"):
        converter.convert(saved_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_latents": 48}, r"other shapes than config.json describes: `perceiver.*` is \[32\] where config.json "
                            r"implies \[48\]"),
        ({"self_attention_widening_factor": 4}, r"`perceiver.encoder.self_attends.0.mlp.dense1.bias` is \[64\] where "
                                                r"config.json implies \[128\]"),
        ({"num_self_attends_per_block": 1}, r"have `perceiver.encoder.self_attends.1.attention.output.dense.bias`.* "
                                            r"which config.json does not describe"),
    ],
)  # fmt: skip
def test_config_disagreeing_with_the_weights_is_refused(saved_copy, changes, message):
    config = json.loads((saved_copy / "config.json").read_text())
    (saved_copy / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(converter.ConversionError, match=message):
        converter.convert(saved_copy)


def test_state_dict_lacking_a_key_is_named(monkeypatch):
    source = build_source("learned-narrow")
    state = source.state_dict()
    del state["perceiver.input_preprocessor.convnet_1x1.bias"]
    monkeypatch.setattr(source, "state_dict", lambda: state)
    message = "the transformers state dict lacks `perceiver.input_preprocessor.convnet_1x1.bias`"
    with pytest.raises(converter.ConversionError, match=message):
        converter.convert(source)


@pytest.mark.parametrize(
    "name, module, option, value",
    [
        ("fourier-narrow", "input_preprocessor.position_embeddings", "sine_only", True),
        ("fourier-narrow", "input_preprocessor", "spatial_downsample", 2),
        ("fourier-narrow", "input_preprocessor", "project_pos_dim", 16),
        ("learned-narrow", "input_preprocessor", "concat_or_add_pos", "add"),
        ("text", "decoder.decoder", "concat_preprocessed_input", True),
    ],
)
def test_options_without_an_equivalent_are_named(name, module, option, value):
    source = build_source(name)
    setattr(source.perceiver.get_submodule(module), option, value)
    with pytest.raises(converter.ConversionError, match=f"`{option}={value!r}` has no perceiver-lite equivalent"):
        converter.convert(source)

