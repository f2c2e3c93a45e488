"""Export of PerceiverLite: every class goes through `torch.export.export` with a dynamic batch (traced at batch 3) and
the exported program gives the eager outputs at batches 2 and 5, padded samples included; the image head (with a
padding mask) and the sequence head go through `torch.onnx.export(dynamo=True)` and run in onnxruntime at another batch
size with the eager logits; the input checks on shapes still raise while exporting, naming the wrong argument."""

import onnxruntime
import pytest
import torch
from conftest import PerceiverLiteModelTester
from torch.export import Dim

from perceiver_lite import (
    PerceiverLiteForAudioClassification,
    PerceiverLiteForImageClassification,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteModel,
)


VOCAB_SIZE = 262
TRACED_BATCH = 3  # not 1 nor 2: export specialises a batch of 1, and the runs use 2 and 5
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def prefix_mask(batch_size: int, length: int) -> torch.Tensor:
    """`(B, length)`: 1 for the first valid elements of each sample, 0 for the padding after them. The first sample is
    unpadded, every other one padded (from `length // 2` to `length - 1` valid elements)."""
    valid = torch.randint(length // 2, length, (batch_size,))
    valid[0] = length
    return (torch.arange(length) < valid[:, None]).long()


def base_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"inputs": torch.randn(batch_size, 3, 8, 8)}


def image_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """Images `(B, 3, 8, 8)` padded at the bottom and right, with their mask `(B, 8, 8)`."""
    attention_mask = prefix_mask(batch_size, 8)[:, :, None] * prefix_mask(batch_size, 8)[:, None, :]
    pixel_values = torch.randn(batch_size, 3, 8, 8) * attention_mask[:, None]
    return {"pixel_values": pixel_values, "attention_mask": attention_mask}


def text_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """Byte ids `(B, 12)`, padding (id 0) masked out."""
    attention_mask = prefix_mask(batch_size, 12)
    input_ids = torch.randint(1, VOCAB_SIZE, (batch_size, 12)) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def audio_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """One-channel signals `(B, 16)`, padding (zeros) masked out."""
    attention_mask = prefix_mask(batch_size, 16)
    return {"input_values": torch.randn(batch_size, 16) * attention_mask, "attention_mask": attention_mask}


# case: (model class, data_shape, extra config fields, inputs for a batch size)
CASES = {
    "base": (PerceiverLiteModel, (3, 8, 8), {}, base_inputs),
    "image": (PerceiverLiteForImageClassification, (3, 8, 8), {}, image_inputs),
    "text": (PerceiverLiteForSequenceClassification, (8, 12), {"vocab_size": VOCAB_SIZE}, text_inputs),
    "audio": (PerceiverLiteForAudioClassification, (1, 16), {}, audio_inputs),
}


def tiny_model(case: str):
    model_class, data_shape, config_kwargs, _ = CASES[case]
    tester = PerceiverLiteModelTester(data_shape=data_shape, num_labels=3, **config_kwargs)
    return model_class(tester.get_config()).eval()


def make_inputs(case: str, batch_size: int) -> dict[str, torch.Tensor]:
    return CASES[case][3](batch_size)


def output_tensors(case: str, outputs) -> dict[str, torch.Tensor]:
    names = ["last_hidden_state", "pooler_output"] if case == "base" else ["logits"]
    return {name: outputs[name] for name in names}


def dynamic_batch(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Dim]]:
    """One dynamic batch dimension, shared by every input."""
    batch = Dim("batch", min=2, max=64)
    return {name: {0: batch} for name in inputs}


def assert_outputs_close(actual: dict, expected: dict):
    for name, tensor in expected.items():
        assert tuple(actual[name].shape) == tuple(tensor.shape), name
        torch.testing.assert_close(torch.as_tensor(actual[name]), tensor, **TOLERANCE, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_torch_export_with_dynamic_batch(case):
    """Exported at batch 3 with a dynamic batch, the program runs at batches 2 and 5 and equals the eager model."""
    model = tiny_model(case)
    inputs = make_inputs(case, TRACED_BATCH)
    exported = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_batch(inputs))
    exported_model = exported.module()
    for batch_size in (2, 5):
        inputs = make_inputs(case, batch_size)
        with torch.no_grad():
            expected = output_tensors(case, model(**inputs))
            actual = output_tensors(case, exported_model(**inputs))
        assert_outputs_close(actual, expected)


@pytest.mark.parametrize("case", ["image", "text"])
def test_onnx_export_runs_in_onnxruntime(case, tmp_path):
    """`torch.onnx.export(dynamo=True)` at batch 3: onnxruntime takes the forward's inputs by name, in int64 (ids and
    masks) and float32 (pixels), and at batch 5 gives the eager logits, the only output of the flattened ModelOutput
    (`loss` and the optional outputs are None); the exporter names outputs after graph nodes, so it is named here."""
    model = tiny_model(case)
    inputs = make_inputs(case, TRACED_BATCH)
    path = tmp_path / f"{case}.onnx"
    dynamic_shapes = dynamic_batch(inputs)
    torch.onnx.export(
        model, (), str(path), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic_shapes, output_names=["logits"]
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    onnx_types = {torch.float32: "tensor(float)", torch.int64: "tensor(int64)"}
    assert {i.name: i.type for i in session.get_inputs()} == {n: onnx_types[t.dtype] for n, t in inputs.items()}
    assert [o.name for o in session.get_outputs()] == ["logits"]

    inputs = make_inputs(case, 5)
    logits = session.run(["logits"], {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    with torch.no_grad():
        expected = output_tensors(case, model(**inputs))
    assert_outputs_close({"logits": logits}, expected)


WRONG_INPUTS = {
    "channels": ("pixel_values", lambda inputs: {**inputs, "pixel_values": torch.randn(TRACED_BATCH, 4, 8, 8)}),
    "mask": ("attention_mask", lambda inputs: {**inputs, "attention_mask": inputs["attention_mask"][:, :7]}),
}


@pytest.mark.parametrize("wrong", WRONG_INPUTS)
def test_export_keeps_shape_checks(wrong):
    """A shape check runs while exporting: 4 channels where data_shape has 3, or a mask `(B, 7, 8)` for `(B, 8, 8)`
    images, raise a ValueError naming the argument, not a tracer error."""
    name, corrupt = WRONG_INPUTS[wrong]
    inputs = corrupt(make_inputs("image", TRACED_BATCH))
    with pytest.raises(ValueError, match=name):
        torch.export.export(tiny_model("image"), (), inputs, dynamic_shapes=dynamic_batch(inputs))
