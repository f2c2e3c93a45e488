"""Input checks of PerceiverLite: every public forward validates its inputs before any compute, with an error that names
the argument, what was expected and what came.

Checks of shapes and dtypes always run. Checks of values (finite floats, 0/1 masks, label and token ranges) read values
back, so they run only on concrete tensors: not on the meta device (shapes only: counting FLOPs, building models) and
not while the model is traced (`torch.export`, `torch.onnx.export`, `torch.compile`, `torch.jit.trace`), where a value
would be a data-dependent branch of the traced graph. Messages are written only when a check fails, so that the checks
trace into one graph under `torch.compile(fullgraph=True, dynamic=True)`, where shapes are symbols.
"""

import difflib
import inspect

import torch


# The keyword arguments a forward takes beyond its own parameters: what transformers' output decorators read
FORWARD_OPTIONS = ("output_attentions", "output_hidden_states", "return_dict")
# Other models' inputs, and why these models do without them
FOREIGN_INPUTS = {
    "position_ids": "positions come from the inputs' order",
    "token_type_ids": "no token types; a tokenizer that returns them takes "
    "model_input_names=['input_ids', 'attention_mask']",
}


def is_tracing() -> bool:
    """Whether the model runs under a tracer (`torch.export`, `torch.onnx.export(dynamo=True)`, `torch.compile`,
    `torch.jit.trace`, `torch.fx`), where the forward must not branch on values."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def has_values(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s values may be read: not on the meta device and not while tracing."""
    return tensor.device.type != "meta" and not is_tracing()


def describe(tensor) -> str:
    return f"{type(tensor).__name__}" if not isinstance(tensor, torch.Tensor) else f"shape {list(tensor.shape)}"


def as_text(expected) -> str:
    """An expectation given as text, or as a function that writes it: messages that format shapes are written only
    when a check fails, since formatting a shape is not traceable under `torch.compile(dynamic=True)`."""
    return expected() if callable(expected) else expected


def tensor_hint(name: str, value) -> str:
    """How to turn a non-tensor `value` of argument `name` into a tensor."""
    converter = "torch.from_numpy" if type(value).__module__ == "numpy" else "torch.tensor"
    return f"; pass a tensor, e.g. {converter}({name})"


def check_keywords(model, kwargs: dict):
    """Raise a `TypeError` for a keyword argument that the forward of `model` neither names nor reads
    (`FORWARD_OPTIONS`): a typo such as `attenion_mask=`, or an input of other models (`FOREIGN_INPUTS`), would
    otherwise be carried in `**kwargs` and dropped silently. The message names each, with the parameter it is
    closest to or why the model does without it."""
    unknown = [name for name in kwargs if name not in FORWARD_OPTIONS]
    if unknown:
        raise TypeError(unknown_keywords_message(type(model), unknown))


def unknown_keywords_message(model_class: type, unknown: list[str]) -> str:
    parameters = [
        name for name, parameter in inspect.signature(model_class.forward).parameters.items()
        if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
    ]  # fmt: skip
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, parameters, n=1, cutoff=0.75)
        hint = f"did you mean `{close[0]}`?" if close else FOREIGN_INPUTS.get(name)
        hints.append(f"`{name}`" + (f" ({hint})" if hint else ""))
    noun = "argument" if len(unknown) == 1 else "arguments"
    return (
        f"{model_class.__name__}.forward() got unexpected keyword {noun} {', '.join(hints)}; it takes "
        f"{', '.join(parameters)}, and {', '.join(FORWARD_OPTIONS)}"
    )


def check_tensor(
    name: str,
    tensor,
    expected,
    ndim: int | None = None,
    floating: bool | None = None,
    dtype: torch.dtype | None = None,
):
    """Raise a clear error unless `tensor` is a tensor of rank `ndim` with a non-empty shape of the right kind of dtype
    and finite values, also once cast to `dtype` (the model's, when the forward casts its inputs). `expected`, the
    shape in words, is text or a function that writes it (see `as_text`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape {as_text(expected)}, got {type(tensor).__name__}"
            + tensor_hint(name, tensor)
        )
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {as_text(expected)}, got {describe(tensor)}")
    if 0 in tensor.shape:
        raise ValueError(
            f"`{name}` must not be empty (a zero-length batch or axis), expected {as_text(expected)}, "
            f"got {describe(tensor)}"
        )
    if floating is True and not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got dtype {tensor.dtype}; convert it with `.float()`")
    if floating is False and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {tensor.dtype}")
    if not tensor.is_floating_point() or not has_values(tensor):
        return
    if not torch.isfinite(tensor.to(dtype or tensor.dtype)).all():
        beyond = f" (or values beyond the range of the model's {dtype})" if dtype not in (None, tensor.dtype) else ""
        raise ValueError(
            f"`{name}` contains NaN or Inf values{beyond}; clean the inputs (for example with torch.nan_to_num)"
        )


def shapes_text(shapes) -> str:
    return " or ".join(dict.fromkeys(str(list(shape)) for shape in shapes))


def check_mask(name: str, mask, allowed_shapes: list[tuple[int, ...]]):
    """Check a mask (1/True = attend) against the shapes it may take."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape {shapes_text(allowed_shapes)}, got {type(mask).__name__}"
            + tensor_hint(name, mask)
        )
    if tuple(mask.shape) not in allowed_shapes:
        raise ValueError(f"`{name}` must have shape {shapes_text(allowed_shapes)}, got {list(mask.shape)}")
    if mask.dtype != torch.bool and has_values(mask) and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"`{name}` must hold 1 (attend) or 0 (padding), got values {mask.unique().tolist()[:8]}")


def check_token_ids(input_ids, vocab_size: int):
    """Token ids `(B, T)` in `[0, vocab_size)`."""
    check_tensor("input_ids", input_ids, "[B, T]", ndim=2, floating=False)
    if has_values(input_ids) and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"`input_ids` must be in [0, vocab_size={vocab_size}), got values in "
            f"[{input_ids.min().item()}, {input_ids.max().item()}]"
        )


SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
LABEL_KINDS = {
    SINGLE_LABEL: ("class ids", "torch.long", "`.long()`"),
    MULTI_LABEL: ("multi-hot targets", "floats", "`.float()`"),
    REGRESSION: ("regression targets", "floats", "`.float()`"),
}


def label_readings(batch_size: int, num_labels: int, problem_type: str | None, elements: tuple) -> dict:
    """`{problem_type: allowed shapes}` of the readings of labels that `problem_type` allows: with None, as
    transformers' loss infers it, regression for one label, else class ids or multi-hot targets by the labels' dtype."""
    shapes = {
        SINGLE_LABEL: [(batch_size, *elements)] + [(batch_size, 1)] * (len(elements) == 0),
        MULTI_LABEL: [(batch_size, num_labels, *elements)],
        REGRESSION: [(batch_size, num_labels, *elements)] + [(batch_size, *elements)] * (num_labels == 1),
    }
    if problem_type is None:
        problem_types = [REGRESSION] if num_labels == 1 else [SINGLE_LABEL, MULTI_LABEL]
    else:
        problem_types = [problem_type]
    return {kind: shapes[kind] for kind in problem_types}


def labels_text(readings: dict) -> str:
    """The readings in words: `class ids of shape [2] or [2, 1] (torch.long) or multi-hot targets of shape [2, 10]
    (floats)`; with two, why the dtype decides."""
    text = " or ".join(
        f"{LABEL_KINDS[kind][0]} of shape {shapes_text(shapes)} ({LABEL_KINDS[kind][1]})"
        for kind, shapes in readings.items()
    )
    if len(readings) > 1:
        text += " (config.problem_type is unset, so the labels' dtype says which; set it to choose)"
    return text


def check_labels(labels, batch_size: int, num_labels: int, problem_type: str | None, element_shape: tuple = ()):
    """Labels by `problem_type`, inferred from their dtype as transformers' loss does when it is None: per sample, or
    per element of `element_shape` (the tokens or grid of a per-element head; classes `(B, *elements)`, regression and
    multi-hot targets channel-first `(B, num_labels, *elements)`). Errors name every reading `problem_type` allows."""
    readings = label_readings(batch_size, num_labels, problem_type, tuple(element_shape))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"`labels` must be a torch.Tensor: {labels_text(readings)}, got {type(labels).__name__}"
            + tensor_hint("labels", labels)
        )
    if len(readings) > 1:
        problem_type = SINGLE_LABEL if labels.dtype in (torch.long, torch.int) else MULTI_LABEL
    else:
        (problem_type,) = readings
    if tuple(labels.shape) not in readings[problem_type]:
        fits = [LABEL_KINDS[kind] for kind, shapes in readings.items() if tuple(labels.shape) in shapes]
        hint = f"; that is the shape of {fits[0][0]}: convert them with {fits[0][2]}" if fits else ""
        raise ValueError(
            f"`labels` must be {labels_text(readings)}, got {describe(labels)} of dtype {labels.dtype}{hint}"
        )
    kind, dtype_text, conversion = LABEL_KINDS[problem_type]
    floating = None if problem_type == SINGLE_LABEL else True
    check_tensor("labels", labels, lambda: labels_text(readings), floating=floating)
    if problem_type != SINGLE_LABEL:
        return
    if labels.dtype != torch.long:
        raise TypeError(
            f"`labels` must be {kind} ({dtype_text}), got dtype {labels.dtype}; convert them with {conversion}"
        )
    invalid = (labels != -100) & ((labels < 0) | (labels >= num_labels))
    if has_values(labels) and invalid.any():
        raise ValueError(
            f"`labels` must be class ids in [0, {num_labels - 1}] (or -100 to ignore), "
            f"got {labels[invalid].unique().tolist()[:8]}"
        )


def check_grid(config, name: str, shape, spatial_shape, decoder: bool = False):
    """Learned positions (and a per-element head's learned decoder queries) exist for the nominal grid
    `config.data_shape[1:]` only: an input larger along an axis has no embedding for its far positions."""
    learned = [field for field, used in (
        ("position_encoding_type", config.position_encoding_type == "learned"),
        ("decoder_query_type", decoder and config.decoder_query_type == "learned"),
    ) if used]  # fmt: skip
    nominal = config.data_shape[1:]
    if learned and any(size > limit for size, limit in zip(spatial_shape, nominal)):
        raise ValueError(
            f"`{name}` has shape {list(shape)}: its axes {list(spatial_shape)} exceed the nominal grid data_shape[1:] = "
            f"{nominal}, the positions that learned {' and '.join(f'`{field}`' for field in learned)} embed"
        )
