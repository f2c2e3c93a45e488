"""Bad input never reaches the model: every public forward raises a `ValueError` (a `TypeError` for a wrong type or
dtype) that names the argument, what was expected and what came, before any submodule runs. Bad decoder and encoder
configs, and heads on sequences given grids, raise naming the field."""

import re

import numpy as np
import pytest
import torch
from conftest import PerceiverLiteModelTester, labelled_inputs, tiny_config

from perceiver_lite import PerceiverLayer, PerceiverLiteForMaskedLM, PerceiverLiteForTokenClassification


TESTERS = {
    "base": PerceiverLiteModelTester("base"),  # 2-D: inputs (3, 3, 8, 8)
    "image": PerceiverLiteModelTester("image"),
    "text": PerceiverLiteModelTester("text", data_shape=(4, 12)),  # 1-D token embedding of 4 channels
    "audio": PerceiverLiteModelTester("audio", data_shape=(1, 12)),  # 1-D mono signal
    "mlm": PerceiverLiteModelTester("mlm"),  # token embedding of 16 channels, nominal length 12
    "token": PerceiverLiteModelTester("token"),
    "dense": PerceiverLiteModelTester("dense"),  # inputs (3, 3, 8, 8)
}
BATCH = 3
LAYER_DIM = 32


def build(kind: str, **config_overrides):
    """A tiny model of `kind` in eval mode."""
    if kind == "layer":
        return PerceiverLayer(dim=LAYER_DIM, heads=2, depth=2, dim_head=16).eval()
    tester = TESTERS[kind]
    return tester.model_class(tester.get_config(**config_overrides)).eval()


def pixels(*shape):
    return torch.randn(*shape) if shape else torch.randn(BATCH, 3, 8, 8)


def token_ids(*shape):
    return torch.randint(0, 262, shape or (BATCH, 10))


def signal(*shape):
    return torch.randn(*shape) if shape else torch.randn(BATCH, 20)


def qkv(q=(2, 4, LAYER_DIM), k=(2, 5, LAYER_DIM), v=(2, 5, LAYER_DIM)):
    return torch.randn(*q), torch.randn(*k), torch.randn(*v)


def embeds(*shape):
    return torch.randn(*shape) if shape else torch.randn(BATCH, 5, 21)  # cross_kv_dim 21 = 3 + 2 x (2 x 4 + 1)


def with_value(tensor, value):
    tensor = tensor.clone()
    tensor.view(-1)[1] = value
    return tensor


def additive_mask():
    """A float mask in the additive convention (0 = attend, -inf = padding): the opposite of ours, so rejected."""
    return torch.zeros(BATCH, 64).masked_fill(torch.rand(BATCH, 64) > 0.5, float("-inf"))


def valid(id, kind, make_kwargs, **config_overrides):
    """A model kind, its config overrides and a function returning the forward's keyword arguments."""
    return pytest.param(kind, config_overrides, make_kwargs, id=id)


def case(id, kind, make_kwargs, error, *fragments, **config_overrides):
    """As `valid`, plus the error type and the fragments its message must contain (argument name, shapes)."""
    return pytest.param(kind, config_overrides, make_kwargs, error, fragments, id=id)


VALID = [
    valid("base", "base", lambda: dict(inputs=pixels(), attention_mask=torch.ones(BATCH, 64))),
    valid("image", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0, 1, 2]))),
    valid(
        "text",
        "text",
        lambda: dict(input_ids=token_ids(), attention_mask=torch.ones(BATCH, 10), labels=torch.tensor([2, 0, -100])),
    ),
    valid("audio", "audio", lambda: dict(input_values=signal(), attention_mask=torch.ones(BATCH, 20).bool())),
    valid("audio_channels", "audio", lambda: dict(input_values=signal(BATCH, 1, 20))),
    valid("layer", "layer", lambda: dict(zip("qkv", qkv()), mask=torch.ones(2, 5))),
    valid(
        "multi_label",
        "image",
        lambda: dict(pixel_values=pixels(), labels=torch.ones(BATCH, 3)),
        problem_type="multi_label_classification",
    ),
    valid("regression", "image", lambda: dict(pixel_values=pixels(), labels=torch.randn(BATCH)), num_labels=1),
    valid("mlm", "mlm", lambda: labelled_inputs("mlm")),
    valid("token", "token", lambda: labelled_inputs("token")),
    valid("token_embeds", "token", lambda: dict(inputs_embeds=torch.randn(BATCH, 10, 16))),
    valid("dense", "dense", lambda: dict(pixel_values=pixels(), labels=torch.randint(0, 3, (BATCH, 8, 8)))),
    # (no labels: the loss over the valid elements of a mask has a data-dependent size, not computable on meta)
    valid("dense_masked", "dense", lambda: dict(pixel_values=pixels(), attention_mask=torch.ones(BATCH, 8, 8))),
]

INVALID = [
    # wrong rank / number of spatial axes
    case(
        "base_rank", "base", lambda: dict(inputs=pixels(BATCH, 3, 8)),
        ValueError, "`inputs`", "[3, 3, 8]", "[B, C=3, axis0, axis1] (data_shape [3, 8, 8])",
    ),
    case(
        "image_extra_axis", "image", lambda: dict(pixel_values=pixels(BATCH, 3, 2, 8, 8)),
        ValueError, "`pixel_values`", "[3, 3, 2, 8, 8]", "data_shape [3, 8, 8]",
    ),
    case(
        "audio_rank1", "audio", lambda: dict(input_values=signal(20)),
        ValueError, "`input_values`", "[20]", "[B, C=1, axis0] or [B, T] (data_shape [1, 12])",
    ),
    case(
        "audio_stereo_without_channels", "audio", lambda: dict(input_values=signal()),
        ValueError, "`input_values`", "must have shape [B, C=2, axis0] (data_shape [2, 12]), got shape [3, 20]",
        data_shape=[2, 12],
    ),
    case(
        "audio_2d_signal", "audio", lambda: dict(input_values=signal(BATCH, 1, 4, 5)),
        ValueError, "`input_values`", "[3, 1, 4, 5]",
    ),
    case("text_rank", "text", lambda: dict(input_ids=token_ids(10)), ValueError, "`input_ids`", "[B, T]", "[10]"),
    case(
        "layer_q_rank", "layer", lambda: dict(zip("qkv", qkv(q=(4, LAYER_DIM)))),
        ValueError, "`q`", "[B, Lq, 32]", "[4, 32]",
    ),
    # wrong channel count / width / batch
    case(
        "base_channels", "base", lambda: dict(inputs=pixels(BATCH, 2, 8, 8)),
        ValueError, "`inputs`", "C=3", "[3, 2, 8, 8]", "channel",
    ),
    case(
        "image_channels", "image", lambda: dict(pixel_values=pixels(BATCH, 1, 8, 8)),
        ValueError, "`pixel_values`", "C=3", "[3, 1, 8, 8]",
    ),
    case(
        "audio_channels", "audio", lambda: dict(input_values=signal(BATCH, 2, 20)),
        ValueError, "`input_values`", "C=1", "[3, 2, 20]",
    ),
    case(
        "embeds_width", "base", lambda: dict(inputs_embeds=embeds(BATCH, 5, 22)),
        ValueError, "`inputs_embeds`", "cross_kv_dim=21", "[3, 5, 22]",
    ),
    case(
        "layer_k_width", "layer", lambda: dict(zip("qkv", qkv(k=(2, 5, 16)))),
        ValueError, "`k`", "[2, Lk, 32]", "[2, 5, 16]",
    ),
    case(
        "layer_v_batch", "layer", lambda: dict(zip("qkv", qkv(v=(1, 5, LAYER_DIM)))),
        ValueError, "`v`", "[2, Lv, 32]", "[1, 5, 32]",
    ),
    # exactly one input
    case("base_no_input", "base", lambda: dict(), ValueError, "`inputs`", "`inputs_embeds`"),
    case(
        "base_two_inputs", "base", lambda: dict(inputs=pixels(), inputs_embeds=embeds(BATCH, 64, 21)),
        ValueError, "exactly one", "`inputs_embeds`",
    ),
    case("image_none", "image", lambda: dict(pixel_values=None), ValueError, "`pixel_values`"),
    # attention masks
    case(
        "base_mask_shape", "base", lambda: dict(inputs=pixels(), attention_mask=torch.ones(BATCH, 7, 8)),
        ValueError, "`attention_mask`", "[3, 8, 8] or [3, 64]", "[3, 7, 8]",
    ),
    case(
        "image_mask_batch", "image", lambda: dict(pixel_values=pixels(), attention_mask=torch.ones(2, 64)),
        ValueError, "`attention_mask`", "[3, 64]", "[2, 64]",
    ),
    case(
        "text_mask_length", "text", lambda: dict(input_ids=token_ids(), attention_mask=torch.ones(BATCH, 9)),
        ValueError, "`attention_mask`", "[3, 10]", "[3, 9]",
    ),
    case(
        "audio_mask_length", "audio", lambda: dict(input_values=signal(), attention_mask=torch.ones(BATCH, 19)),
        ValueError, "`attention_mask`", "[3, 20]", "[3, 19]",
    ),
    case(
        "embeds_mask", "base", lambda: dict(inputs_embeds=embeds(), attention_mask=torch.ones(BATCH, 4)),
        ValueError, "`attention_mask`", "[3, 5]", "[3, 4]",
    ),
    case(
        "layer_mask", "layer", lambda: dict(zip("qkv", qkv()), mask=torch.ones(2, 3)),
        ValueError, "`mask`", "[2, 10]", "[2, 4, 5]", "[2, 3]",
    ),
    case(
        "layer_mask_unequal_kv", "layer", lambda: dict(zip("qkv", qkv(v=(2, 6, LAYER_DIM))), mask=torch.ones(2, 5)),
        ValueError, "`mask`", "[2, 11]", "[2, 5]",
    ),
    case(
        "additive_mask", "base", lambda: dict(inputs=pixels(), attention_mask=additive_mask()),
        ValueError, "`attention_mask`", "1 (attend) or 0",
    ),
    case(
        "mask_not_tensor", "image", lambda: dict(pixel_values=pixels(), attention_mask=[[1] * 64] * BATCH),
        TypeError, "`attention_mask`", "torch.Tensor", "list",
    ),
    # empty batch or zero-length axis
    case(
        "base_empty_batch", "base", lambda: dict(inputs=pixels(0, 3, 8, 8)),
        ValueError, "`inputs`", "empty", "[0, 3, 8, 8]",
    ),
    case(
        "image_empty_axis", "image", lambda: dict(pixel_values=pixels(BATCH, 3, 8, 0)),
        ValueError, "`pixel_values`", "empty", "[3, 3, 8, 0]",
    ),
    case(
        "text_empty", "text", lambda: dict(input_ids=token_ids(BATCH, 0)),
        ValueError, "`input_ids`", "empty", "[3, 0]",
    ),
    case(
        "audio_empty", "audio", lambda: dict(input_values=signal(0, 20)),
        ValueError, "`input_values`", "empty", "[0, 1, 20]",
    ),
    case(
        "layer_empty", "layer", lambda: dict(zip("qkv", qkv(k=(2, 0, LAYER_DIM)))),
        ValueError, "`k`", "empty", "[2, 0, 32]",
    ),
    # wrong dtypes and types
    case(
        "image_uint8", "image", lambda: dict(pixel_values=torch.randint(0, 256, (BATCH, 3, 8, 8), dtype=torch.uint8)),
        TypeError, "`pixel_values`", "floating", "torch.uint8",
    ),
    case(
        "base_int", "base", lambda: dict(inputs=torch.randint(0, 9, (BATCH, 3, 8, 8))),
        TypeError, "`inputs`", "floating", "torch.int64",
    ),
    case(
        "audio_int16", "audio", lambda: dict(input_values=torch.randint(-99, 99, (BATCH, 20), dtype=torch.int16)),
        TypeError, "`input_values`", "floating", "torch.int16",
    ),
    case(
        "text_float_ids", "text", lambda: dict(input_ids=token_ids().float()),
        TypeError, "`input_ids`", "integer", "torch.float32",
    ),
    case(
        "layer_int", "layer", lambda: dict(q=torch.ones(2, 4, LAYER_DIM, dtype=torch.long), k=qkv()[1], v=qkv()[2]),
        TypeError, "`q`", "floating", "torch.int64",
    ),
    case(
        "image_numpy", "image", lambda: dict(pixel_values=pixels().numpy()),
        TypeError, "`pixel_values`", "torch.Tensor", "ndarray",
    ),
    # vocabulary
    case(
        "ids_above_vocab", "text", lambda: dict(input_ids=with_value(token_ids(), 262)),
        ValueError, "`input_ids`", "vocab_size=262", "262]",
    ),
    case(
        "ids_negative", "text", lambda: dict(input_ids=with_value(token_ids(), -1)),
        ValueError, "`input_ids`", "vocab_size=262", "[-1,",
    ),
    # NaN and Inf
    case(
        "image_nan", "image", lambda: dict(pixel_values=with_value(pixels(), float("nan"))),
        ValueError, "`pixel_values`", "NaN or Inf",
    ),
    case(
        "base_inf", "base", lambda: dict(inputs=with_value(pixels(), float("inf"))),
        ValueError, "`inputs`", "NaN or Inf",
    ),
    case(
        "audio_neg_inf", "audio", lambda: dict(input_values=with_value(signal(), float("-inf"))),
        ValueError, "`input_values`", "NaN or Inf",
    ),
    case(
        "embeds_nan", "base", lambda: dict(inputs_embeds=with_value(embeds(), float("nan"))),
        ValueError, "`inputs_embeds`", "NaN or Inf",
    ),
    case(
        "layer_v_nan", "layer", lambda: dict(q=qkv()[0], k=qkv()[1], v=with_value(qkv()[2], float("nan"))),
        ValueError, "`v`", "NaN or Inf",
    ),
    # labels
    case(
        "label_out_of_range", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0, 1, 5])),
        ValueError, "`labels`", "[0, 2]", "[5]",
    ),
    case(
        "label_negative", "text", lambda: dict(input_ids=token_ids(), labels=torch.tensor([0, -3, 1])),
        ValueError, "`labels`", "[0, 2]", "[-3]",
    ),
    case(
        "label_batch", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0, 1])),
        ValueError, "`labels`", "[3]", "[2]",
    ),
    case(
        "label_rank", "audio", lambda: dict(input_values=signal(), labels=torch.zeros(BATCH, 2, dtype=torch.long)),
        ValueError, "`labels`", "[3]", "[3, 2]",
    ),
    case(
        "label_int32", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0, 1, 2], dtype=torch.int32)),
        TypeError, "`labels`", "torch.long", "torch.int32",
    ),
    case(
        "label_float_single", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0.0, 1.0, 2.0])),
        TypeError, "`labels`", "torch.long", "torch.float32", problem_type='single_label_classification',
    ),
    case(  # without problem_type both readings are named, and how to make a tensor
        "label_list", "image", lambda: dict(pixel_values=pixels(), labels=[0, 1, 2]),
        TypeError, "`labels` must be a torch.Tensor", "class ids of shape [3] or [3, 1] (torch.long)",
        "multi-hot targets of shape [3, 3] (floats)", "got list", "torch.tensor(labels)",
    ),
    case(
        "label_list_single", "text", lambda: dict(input_ids=token_ids(), labels=[0, 1, 2]),
        TypeError, "class ids of shape [3] or [3, 1] (torch.long), got list", "torch.tensor(labels)",
        problem_type="single_label_classification",
    ),
    case(
        "label_numpy", "image", lambda: dict(pixel_values=pixels(), labels=np.array([0, 1, 2])),
        TypeError, "got ndarray", "torch.from_numpy(labels)",
    ),
    case(  # float class ids: the dtype says multi-hot, the shape says class ids
        "inferred_float_class_ids", "image", lambda: dict(pixel_values=pixels(), labels=torch.tensor([0.0, 1.0, 2.0])),
        ValueError, "class ids of shape [3] or [3, 1] (torch.long) or multi-hot targets of shape [3, 3] (floats)",
        "problem_type is unset", "got shape [3] of dtype torch.float32", "the shape of class ids", "`.long()`",
    ),
    case(  # integer multi-hot targets: the dtype says class ids, the shape says multi-hot
        "inferred_int_multi_hot", "audio", lambda: dict(input_values=signal(), labels=torch.ones(BATCH, 3, dtype=torch.long)),
        ValueError, "class ids of shape [3] or [3, 1]", "multi-hot targets of shape [3, 3]",
        "got shape [3, 3] of dtype torch.int64", "the shape of multi-hot targets", "`.float()`",
    ),
    case(
        "multi_label_shape", "image", lambda: dict(pixel_values=pixels(), labels=torch.ones(BATCH, 2)),
        ValueError, "`labels`", "[3, 3]", "[3, 2]", problem_type="multi_label_classification",
    ),
    case(
        "multi_label_int", "image", lambda: dict(pixel_values=pixels(), labels=torch.ones(BATCH, 3, dtype=torch.long)),
        TypeError, "`labels`", "floating", "torch.int64", problem_type="multi_label_classification",
    ),
    case(
        "inferred_multi_label", "image", lambda: dict(pixel_values=pixels(), labels=torch.ones(BATCH)),
        ValueError, "`labels`", "[3, 3]", "[3]",
    ),
    case(
        "regression_shape", "image", lambda: dict(pixel_values=pixels(), labels=torch.randn(BATCH, 2)),
        ValueError, "`labels`", "[3, 1] or [3]", "[3, 2]", num_labels=1,
    ),
    case(
        "regression_nan", "audio", lambda: dict(input_values=signal(), labels=with_value(signal(BATCH), float("nan"))),
        ValueError, "`labels`", "NaN or Inf", num_labels=1,
    ),
    # Perceiver IO heads on token ids
    case("mlm_ids_float", "mlm", lambda: dict(input_ids=token_ids().float()), TypeError, "`input_ids`", "integer"),
    case("mlm_ids_rank", "mlm", lambda: dict(input_ids=token_ids(10)), ValueError, "`input_ids`", "[B, T]", "[10]"),
    case(
        "mlm_ids_range", "mlm", lambda: dict(input_ids=token_ids() + 262), ValueError, "`input_ids`", "vocab_size=262"
    ),
    case("token_no_input", "token", lambda: dict(), ValueError, "exactly one", "`input_ids`", "`inputs_embeds`"),
    case(
        "mlm_ids_and_embeds", "mlm", lambda: dict(input_ids=token_ids(), inputs_embeds=torch.randn(BATCH, 10, 16)),
        ValueError, "exactly one", "`input_ids`", "`inputs_embeds`",
    ),
    case(
        "token_embeds_width", "token", lambda: dict(inputs_embeds=torch.randn(BATCH, 10, 15)),
        ValueError, "`inputs_embeds`", "[B, T, data_shape[0]=16]", "[3, 10, 15]",
    ),
    case(
        "mlm_embeds_int", "mlm", lambda: dict(inputs_embeds=torch.zeros(BATCH, 10, 16, dtype=torch.long)),
        TypeError, "`inputs_embeds`", "floating", "torch.int64",
    ),
    case(
        "token_ids_rank", "token", lambda: dict(input_ids=token_ids(BATCH, 10, 1)), ValueError, "`input_ids`", "[B, T]"
    ),
    case(
        "mlm_mask_length", "mlm", lambda: dict(input_ids=token_ids(), attention_mask=torch.ones(BATCH, 9)),
        ValueError, "`attention_mask`", "[3, 10]", "[3, 9]",
    ),
    case(
        "mlm_mask_values", "mlm", lambda: dict(input_ids=token_ids(), attention_mask=torch.full((BATCH, 10), 2)),
        ValueError, "`attention_mask`", "1 (attend) or 0",
    ),
    case(
        "token_mask_rank", "token", lambda: dict(input_ids=token_ids(), attention_mask=torch.ones(BATCH, 10, 1)),
        ValueError, "`attention_mask`", "[3, 10]", "[3, 10, 1]",
    ),
    case(
        "mlm_labels_length", "mlm", lambda: dict(input_ids=token_ids(), labels=torch.zeros(BATCH, 9, dtype=torch.long)),
        ValueError, "`labels`", "[3, 10]", "[3, 9]",
    ),
    case(
        "mlm_labels_per_sample", "mlm", lambda: dict(input_ids=token_ids(), labels=torch.zeros(BATCH, dtype=torch.long)),
        ValueError, "`labels`", "[3, 10]", "[3]",
    ),
    case(
        "mlm_labels_float", "mlm", lambda: dict(input_ids=token_ids(), labels=torch.zeros(BATCH, 10)),
        TypeError, "`labels`", "torch.long", "torch.float32",
    ),
    case(
        "mlm_labels_range", "mlm", lambda: dict(input_ids=token_ids(), labels=torch.full((BATCH, 10), 262)),
        ValueError, "`labels`", "[0, 261]", "[262]",
    ),
    case(
        "token_labels_range", "token", lambda: dict(input_ids=token_ids(), labels=torch.full((BATCH, 10), 3)),
        ValueError, "`labels`", "[0, 2]", "[3]",
    ),
    case(
        "token_labels_negative", "token", lambda: dict(input_ids=token_ids(), labels=torch.full((BATCH, 10), -1)),
        ValueError, "`labels`", "[0, 2]", "[-1]",
    ),
    case(
        "token_labels_batch", "token", lambda: dict(input_ids=token_ids(), labels=torch.zeros(2, 10, dtype=torch.long)),
        ValueError, "`labels`", "[3, 10]", "[2, 10]",
    ),
    case(
        "token_labels_int32", "token",
        lambda: dict(input_ids=token_ids(), labels=torch.zeros(BATCH, 10, dtype=torch.int32)),
        TypeError, "`labels`", "torch.long", "torch.int32",
    ),
    case(
        "mlm_too_long_learned_queries", "mlm", lambda: dict(input_ids=token_ids(BATCH, 13)),
        ValueError, "`input_ids`", "exceed the nominal grid", "`decoder_query_type`", decoder_query_type="learned",
    ),
    case(
        "mlm_too_long_learned_positions", "mlm", lambda: dict(input_ids=token_ids(BATCH, 13)),
        ValueError, "`input_ids`", "exceed the nominal grid", "`position_encoding_type`",
        position_encoding_type="learned",
    ),
    case(
        "token_too_long_learned_queries", "token", lambda: dict(input_ids=token_ids(BATCH, 13)),
        ValueError, "`input_ids`", "exceed", "`decoder_query_type`", decoder_query_type="learned",
    ),
    case(
        "token_too_long_learned_positions", "token", lambda: dict(input_ids=token_ids(BATCH, 13)),
        ValueError, "`input_ids`", "exceed", "`position_encoding_type`", position_encoding_type="learned",
    ),
    # the dense head
    case("dense_rank", "dense", lambda: dict(pixel_values=pixels(3, 8, 8)), ValueError, "`pixel_values`", "[3, 8, 8]"),
    case(
        "dense_int", "dense", lambda: dict(pixel_values=pixels().long()), TypeError, "`pixel_values`", "floating",
    ),
    case(
        "dense_channels", "dense", lambda: dict(pixel_values=pixels(BATCH, 4, 8, 8)),
        ValueError, "`pixel_values`", "C=3", "[3, 4, 8, 8]", "channel",
    ),
    case(
        "dense_nan", "dense", lambda: dict(pixel_values=pixels().fill_(float("nan"))),
        ValueError, "`pixel_values`", "NaN",
    ),
    case(
        "dense_mask_shape", "dense", lambda: dict(pixel_values=pixels(), attention_mask=torch.ones(BATCH, 8, 7)),
        ValueError, "`attention_mask`", "[3, 8, 8] or [3, 64]", "[3, 8, 7]",
    ),
    case(
        "dense_labels_shape", "dense",
        lambda: dict(pixel_values=pixels(), labels=torch.zeros(BATCH, 8, 7, dtype=torch.long)),
        ValueError, "`labels`", "[3, 8, 8]", "[3, 8, 7]",
    ),
    case(
        "dense_labels_int32", "dense",
        lambda: dict(pixel_values=pixels(), labels=torch.zeros(BATCH, 8, 8, dtype=torch.int32)),
        TypeError, "`labels`", "torch.long", "torch.int32",
    ),
    case(
        "dense_labels_range", "dense", lambda: dict(pixel_values=pixels(), labels=torch.full((BATCH, 8, 8), 3)),
        ValueError, "`labels`", "[0, 2]", "[3]",
    ),
    case(
        "dense_regression_labels_shape", "dense", lambda: dict(pixel_values=pixels(), labels=torch.zeros(BATCH, 8, 8)),
        ValueError, "`labels`", "regression targets of shape [3, 3, 8, 8]", problem_type="regression",
    ),
    case(
        "dense_multi_label_int", "dense",
        lambda: dict(pixel_values=pixels(), labels=torch.zeros(BATCH, 3, 8, 8, dtype=torch.long)),
        TypeError, "`labels`", "floating", "torch.int64", problem_type="multi_label_classification",
    ),
    case(
        "dense_multi_label_shape", "dense", lambda: dict(pixel_values=pixels(), labels=torch.zeros(BATCH, 8, 8)),
        ValueError, "`labels`", "multi-hot targets of shape [3, 3, 8, 8]", problem_type="multi_label_classification",
    ),
    case(
        "dense_too_large_learned_queries", "dense", lambda: dict(pixel_values=pixels(BATCH, 3, 9, 8)),
        ValueError, "`pixel_values`", "exceed the nominal grid", "`decoder_query_type`", decoder_query_type="learned",
    ),
    case(
        "dense_too_large_learned_positions", "dense", lambda: dict(pixel_values=pixels(BATCH, 3, 8, 9)),
        ValueError, "`pixel_values`", "exceed the nominal grid", "`position_encoding_type`",
        position_encoding_type="learned",
    ),
]


def count_submodule_calls(model: torch.nn.Module) -> list[str]:
    """Names of the submodules that run, as they run."""
    calls = []
    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("kind, overrides, make_kwargs", VALID)
def test_valid_inputs_run(kind, overrides, make_kwargs):
    """The valid counterparts of the cases below run: each error comes from the one defect a case introduces."""
    model = build(kind, **overrides)
    calls = count_submodule_calls(model)
    with torch.no_grad():
        output = model(**make_kwargs())
    assert calls, "the hook must see the submodules run"
    tensor = output if isinstance(output, torch.Tensor) else output[0]
    assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("kind, overrides, make_kwargs, error, fragments", INVALID)
def test_invalid_input_raises_clear_error_before_compute(kind, overrides, make_kwargs, error, fragments):
    model = build(kind, **overrides)
    calls = count_submodule_calls(model)
    with pytest.raises(Exception) as excinfo:
        model(**make_kwargs())
    assert type(excinfo.value) is error, f"{type(excinfo.value).__name__}: {excinfo.value}"
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert calls == [], f"submodules ran before the error: {calls}"


@pytest.mark.parametrize("kind, overrides, make_kwargs", [param for param in VALID if param.values[0] != "layer"])
def test_unknown_keywords_raise_naming_them_before_compute(kind, overrides, make_kwargs):
    """A misspelt argument, or an input of other models that this one does not take, is an error naming it (and the
    parameter it is closest to), not carried in `**kwargs` and dropped: `attenion_mask=` would otherwise attend to
    the padding."""
    model = build(kind, **overrides)
    calls = count_submodule_calls(model)
    unknown = dict(attenion_mask=torch.ones(BATCH, 10), position_ids=torch.arange(10)[None])
    with pytest.raises(TypeError) as excinfo:
        model(**make_kwargs(), **unknown)
    message = str(excinfo.value)
    expected = "got unexpected keyword arguments `attenion_mask` (did you mean `attention_mask`?), `position_ids` ("
    assert message.startswith(f"{type(model).__name__}.forward() {expected}"), message
    takes = message.split("; it takes ")[1]  # the forward's parameters, then the options
    assert "attention_mask" in takes and takes.endswith("and output_attentions, output_hidden_states, return_dict")
    assert calls == [], f"submodules ran before the error: {calls}"


def test_numpy_and_python_inputs_name_their_type():
    """A message names the argument even for an input that has no shape at all."""
    with pytest.raises(TypeError, match=re.escape("`input_ids` must be a torch.Tensor")):
        build("text")(input_ids=np.zeros((BATCH, 10), dtype=np.int64))
    with pytest.raises(TypeError, match=r"`k` must be a torch\.Tensor.*got list"):
        build("layer")(q=qkv()[0], k=[[0.0]], v=qkv()[2])


def on_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("kind, overrides, make_kwargs", VALID)
def test_meta_device_runs_on_shapes_alone(kind, overrides, make_kwargs):
    """On the meta device (shapes only: tracing, counting FLOPs without compute) a forward pass gives the shapes it
    gives on the CPU: the checks of values (finite, 0/1 masks, label and token ranges) step aside, those of shapes and
    dtypes do not."""
    model, kwargs = build(kind, **overrides), make_kwargs()
    with torch.no_grad():
        expected = model(**kwargs)
        output = model.to("meta")(**{name: on_meta(value) for name, value in kwargs.items()})
    expected, output = ((o,) if isinstance(o, torch.Tensor) else o.to_tuple() for o in (expected, output))
    assert [t.shape for t in output] == [t.shape for t in expected]
    assert all(t.device.type == "meta" for t in output)
    if "attention_mask" in kwargs:  # one element short
        kwargs["attention_mask"] = kwargs["attention_mask"][:, :-1]
        with pytest.raises(ValueError, match="`attention_mask` must have shape"):
            model(**{name: on_meta(value) for name, value in kwargs.items()})


@pytest.mark.parametrize(
    "build, match",
    [
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
        (lambda: PerceiverLiteForMaskedLM(tiny_config("dense")),
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
    ids=["decoder-heads", "decoder-qk", "decoder-v", "query-type",
         "classifier-pooling", "decoder-ff-scale", "decoder-dim", "decoder-heads-zero", "token-2d", "mlm-2d",
         "cross-attend-unknown-block", "cross-attend-repeated", "cross-attend-none", "position-dim-fourier",
         "added-width-mismatch", "position-type", "qk-heads", "cross-v-heads", "input-projection-zero"],
)  # fmt: skip
def test_bad_decoder_and_encoder_configs_raise_naming_the_field(build, match):
    """Config fields of the decoder and of the encoder options, and heads on sequences given a 2-D `data_shape`."""
    with pytest.raises(ValueError, match=match):
        build()
