"""Input checks of PerceiverLite: every public forward validates its inputs before any compute, with an error that names
the argument, what was expected and what came.

Checks of shapes and dtypes always run. Checks of values (finite floats, 0/1 masks, label and token ranges) read values
back, so they run only on concrete tensors: not on the meta device (shapes only: counting FLOPs, building models) and
not while the model is traced (`torch.export`, `torch.onnx.export`, `torch.compile`, `torch.jit.trace`), where a value
would be a data-dependent branch of the traced graph.
"""

import torch


def is_tracing() -> bool:
    """Whether the model runs under a tracer (`torch.export`, `torch.onnx.export(dynamo=True)`, `torch.compile`,
    `torch.jit.trace`, `torch.fx`), where the forward must not branch on values."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def has_values(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s values may be read: not on the meta device and not while tracing."""
    return tensor.device.type != "meta" and not is_tracing()


def describe(tensor) -> str:
    return f"{type(tensor).__name__}" if not isinstance(tensor, torch.Tensor) else f"shape {list(tensor.shape)}"


def check_tensor(
    name: str,
    tensor,
    expected: str,
    ndim: int | None = None,
    floating: bool | None = None,
    dtype: torch.dtype | None = None,
):
    """Raise a clear error unless `tensor` is a tensor of rank `ndim` with a non-empty shape of the right kind of dtype
    and finite values, also once cast to `dtype` (the model's, when the forward casts its inputs)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {expected}, got {describe(tensor)}")
    if 0 in tensor.shape:
        raise ValueError(f"`{name}` must not be empty (a zero-length batch or axis), expected {expected}, got {describe(tensor)}")
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


def check_mask(name: str, mask, allowed_shapes: list[tuple[int, ...]]):
    """Check a mask (1/True = attend) against the shapes it may take."""
    expected = " or ".join(dict.fromkeys(str(list(shape)) for shape in allowed_shapes))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(mask).__name__}")
    if tuple(mask.shape) not in allowed_shapes:
        raise ValueError(f"`{name}` must have shape {expected}, got {list(mask.shape)}")
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


def check_labels(labels, batch_size: int, num_labels: int, problem_type: str | None, element_shape: tuple = ()):
    """Labels by `problem_type`, inferred from their dtype as transformers' loss does when it is None: per sample, or
    per element of `element_shape` (the tokens or grid of a per-element head; classes `(B, *elements)`, regression and
    multi-hot targets channel-first `(B, num_labels, *elements)`)."""
    if problem_type is None:
        integer = isinstance(labels, torch.Tensor) and labels.dtype in (torch.long, torch.int)
        problem_type = "regression" if num_labels == 1 else ("single_label_classification" if integer else None)
    elements = tuple(element_shape)
    if problem_type == "single_label_classification":
        shapes, kind = [(batch_size, *elements)] + [(batch_size, 1)] * (not elements), "torch.long class ids"
    elif problem_type == "regression":
        shapes = [(batch_size, num_labels, *elements)] + [(batch_size, *elements)] * (num_labels == 1)
        kind = "regression targets"
    else:
        shapes, kind = [(batch_size, num_labels, *elements)], "multi-hot floats"
    expected = " or ".join(str(list(shape)) for shape in shapes) + f" ({kind})"
    check_tensor("labels", labels, expected, floating=True if kind == "multi-hot floats" else None)
    if tuple(labels.shape) not in shapes:
        raise ValueError(f"`labels` must have shape {expected}, got {describe(labels)}")
    if problem_type != "single_label_classification":
        return
    if labels.dtype != torch.long:
        raise TypeError(f"`labels` must be {expected}, got dtype {labels.dtype}; convert them with `.long()`")
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
