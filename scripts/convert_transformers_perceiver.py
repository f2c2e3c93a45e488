#!/usr/bin/env python
"""Convert a transformers Perceiver checkpoint into a perceiver-lite folder that gives the same outputs.

    python scripts/convert_transformers_perceiver.py deepmind/language-perceiver language-perceiver-lite
    python scripts/convert_transformers_perceiver.py ./my-perceiver out --dtype bfloat16 --verify

Supported: `PerceiverForMaskedLM`, `PerceiverForSequenceClassification`, `PerceiverForImageClassificationFourier` and
`PerceiverForImageClassificationLearned`, from a Hub name or a local folder (read with transformers' `from_pretrained`)
or as a model object (`convert(model)`). The output folder (`save_pretrained`: safetensors and perceiver-lite's code)
loads with the matching `AutoModelForMaskedLM` / `AutoModelForSequenceClassification` /
`AutoModelForImageClassification`, with this package installed or with `trust_remote_code=True`.

The mapping is exact: the same weights in perceiver-lite's layout (see `docs/conversion.md`). transformers' encoder
(one cross-attend, then its block of self-attention layers `num_blocks` times with shared weights) becomes two unique
blocks, `layers_indice=[0, 1, ..., 1]`; the Fourier features' channels are reordered by permuting the key/value input
columns of the cross-attention; the learned image positions' projection is folded into the position table. Anything
perceiver-lite cannot represent exactly (a preprocessor or decoder option, a missing or mis-sized weight) is an error
naming it.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig

from perceiver_lite import PerceiverLiteConfig
from perceiver_lite.modeling_perceiver_lite import (
    PerceiverLiteForImageClassification,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForSequenceClassification,
)


# transformers class -> (perceiver-lite class, the Auto class that loads the converted folder)
SUPPORTED = {
    "PerceiverForMaskedLM": (PerceiverLiteForMaskedLM, "AutoModelForMaskedLM"),
    "PerceiverForSequenceClassification": (
        PerceiverLiteForSequenceClassification, "AutoModelForSequenceClassification"
    ),
    "PerceiverForImageClassificationFourier": (PerceiverLiteForImageClassification, "AutoModelForImageClassification"),
    "PerceiverForImageClassificationLearned": (PerceiverLiteForImageClassification, "AutoModelForImageClassification"),
}
TEXT_CLASSES = ("PerceiverForMaskedLM", "PerceiverForSequenceClassification")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """A source that perceiver-lite cannot represent exactly, or that is not a complete supported Perceiver."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading the source
# ---------------------------------------------------------------------------------------------------------------------


def load_source(source: str) -> nn.Module:
    """The transformers Perceiver of a Hub name or local folder, in float32 and eval mode.

    Every weight the config describes must be in the checkpoint with its shape, and no other: transformers would
    otherwise initialise the missing or mis-sized ones at random (with a warning) and the conversion would be wrong.
    """
    config_dict = read_config_dict(source)
    architecture = source_architecture(source, config_dict)
    model_class = getattr(transformers, architecture)
    model, info = model_class.from_pretrained(
        source, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    check_loading_info(source, info)
    return model.eval()


def read_config_dict(source: str) -> dict:
    """The `config.json` of `source` as a dict; a clear error where there is none."""
    if os.path.isfile(source):
        raise FileNotFoundError(f"`{source}` is a file; the SOURCE to convert is a folder or a Hub name")
    if not os.path.isdir(source) and (os.path.isabs(source) or source.startswith(".")):
        raise FileNotFoundError(f"`{source}`: no such folder (the SOURCE to convert)")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"`{source}` has no config.json: it is not a saved transformers model")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as error:
        where = "in this folder" if os.path.isdir(source) else "from the Hub, and there is no local folder of that name"
        raise FileNotFoundError(f"`{source}`: its config.json could not be read {where} ({error})") from error
    return config_dict


def source_architecture(source: str, config_dict: dict) -> str:
    """The supported transformers class that `config_dict` names; an error for other models and classes."""
    model_type = config_dict.get("model_type")
    if model_type != "perceiver":
        raise ConversionError(
            f"`{source}` holds a `{model_type}` model, not a transformers Perceiver (config.json model_type "
            "'perceiver')"
        )
    architectures = config_dict.get("architectures") or []
    supported = [name for name in architectures if name in SUPPORTED]
    if not supported:
        raise ConversionError(
            f"`{source}` is a {' / '.join(architectures) or 'Perceiver without architectures in config.json'}; "
            f"only {', '.join(SUPPORTED)} convert"
        )
    return supported[0]


def check_loading_info(source: str, info: dict):
    """Raise where the checkpoint's tensors do not match what its config.json describes."""
    problems = []
    if info["missing_keys"]:
        problems.append(f"lack {listed(info['missing_keys'])}, which config.json describes")
    if info["mismatched_keys"]:
        shapes = [f"`{key}` is {list(saved)} where config.json implies {list(expected)}"
                  for key, saved, expected in sorted(info["mismatched_keys"])]  # fmt: skip
        problems.append(f"have other shapes than config.json describes: {listed(shapes, quote=False)}")
    if info["unexpected_keys"]:
        problems.append(f"have {listed(info['unexpected_keys'])}, which config.json does not describe")
    if problems:
        raise ConversionError(
            f"`{source}`: the weights ({weight_files(source)}) " + "; they ".join(problems) + ". The checkpoint is "
            "incomplete or its config.json is wrong."
        )


def listed(items, quote: bool = True, limit: int = 3) -> str:
    """The first `limit` of `items`, sorted, and how many more."""
    items = sorted(f"`{item}`" if quote else item for item in items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def weight_files(source: str) -> str:
    """The weight files of a local folder, for error messages; the Hub checkpoint's otherwise."""
    if not os.path.isdir(source):
        return "of the Hub checkpoint"
    names = sorted(name for name in os.listdir(source) if name.endswith((".safetensors", ".bin")))
    return ", ".join(names) or "no weight file"


# ---------------------------------------------------------------------------------------------------------------------
# What has no perceiver-lite equivalent
# ---------------------------------------------------------------------------------------------------------------------


def require(component: str, settings: dict):
    """Raise naming the first `option: (actual, needed)` of `settings` whose actual value is not the needed one."""
    for option, (actual, needed) in settings.items():
        if actual != needed:
            raise ConversionError(
                f"{component}: `{option}={actual!r}` has no perceiver-lite equivalent (only {needed!r} converts)"
            )


def check_supported(model: nn.Module):
    """The options of `model`'s modules that perceiver-lite represents exactly; an error naming any other."""
    num_blocks, num_self_attends = model.config.num_blocks, len(model.perceiver.encoder.self_attends)
    if num_blocks < 1 or num_self_attends < 1:
        raise ConversionError(
            f"PerceiverConfig: `num_blocks={num_blocks}`, `num_self_attends_per_block={num_self_attends}`: only "
            "encoders with latent self-attention (both at least 1) convert"
        )
    epsilons = {module.eps for module in model.modules() if isinstance(module, nn.LayerNorm)}
    require("LayerNorm", {"eps (one value for all)": (len(epsilons), 1)})
    name = type(model).__name__
    if name in ("PerceiverForImageClassificationFourier", "PerceiverForImageClassificationLearned"):
        check_image_preprocessor(model.perceiver.input_preprocessor, learned=name.endswith("Learned"))
    decoder = model.perceiver.decoder if name == "PerceiverForMaskedLM" else model.perceiver.decoder.decoder
    require(f"{name}'s decoder", {
        "position_encoding_type": (decoder.position_encoding_type, "trainable"),
        "concat_preprocessed_input": (decoder.concat_preprocessed_input, False),
        "positions_projection": (type(decoder.positions_projection).__name__, "Identity"),
        "final_project": (decoder.final_project, name != "PerceiverForMaskedLM"),
    })  # fmt: skip


def check_image_preprocessor(preprocessor: nn.Module, learned: bool):
    component = "PerceiverImagePreprocessor"
    require(component, {
        "prep_type": (preprocessor.prep_type, "conv1x1" if learned else "pixels"),
        "spatial_downsample": (preprocessor.spatial_downsample, 1),
        "concat_or_add_pos": (preprocessor.concat_or_add_pos, "concat"),
        "position_encoding_type": (preprocessor.position_encoding_type, "trainable" if learned else "fourier"),
    })  # fmt: skip
    if learned:
        convolution = preprocessor.convnet_1x1
        require(component, {"convnet_1x1 kernel_size": (convolution.kernel_size, (1, 1)),
                            "convnet_1x1 stride": (convolution.stride, (1, 1))})  # fmt: skip
    else:
        encoding = preprocessor.position_embeddings
        require("PerceiverFourierPositionEncoding", {
            "sine_only": (encoding.sine_only, False),
            "concat_pos": (encoding.concat_pos, True),
            "project_pos_dim": (preprocessor.project_pos_dim if preprocessor.project_pos_dim > 0 else -1, -1),
        })  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def attention_fields(layer: nn.Module) -> tuple[int, int, int]:
    """`(heads, qk_channels, v_channels)` of a transformers `PerceiverLayer`, from its projections' shapes."""
    attention = layer.attention.self
    return attention.num_heads, attention.key.out_features, attention.value.out_features


def encoder_fields(model: nn.Module) -> dict:
    """The latent array and the encoder: one cross-attend block, then the shared self-attention block `num_blocks`
    times. Widths come from the weights (transformers' cross-attention defaults its query/key width to the inputs')."""
    encoder = model.perceiver.encoder
    cross, latent_layer = encoder.cross_attention, encoder.self_attends[0]
    cross_heads, cross_qk_channels, cross_v_channels = attention_fields(cross)
    heads, qk_channels, v_channels = attention_fields(latent_layer)
    num_latent_tokens, dim = model.perceiver.embeddings.latents.shape
    return {
        "num_latent_tokens": num_latent_tokens,
        "dim": dim,
        "num_latent_transformers_in_layers": [0, len(encoder.self_attends)],
        "layers_indice": [0] + [1] * model.config.num_blocks,
        "cross_attend_blocks": [0],
        "cross_heads": cross_heads,
        "cross_qk_channels": cross_qk_channels,
        "cross_v_channels": cross_v_channels,
        "cross_ff_dim": cross.mlp.dense1.out_features,
        "cross_attention_query_residual": cross.attention.use_query_residual,
        "heads": heads,
        "qk_channels": qk_channels,
        "v_channels": v_channels,
        "ff_dim": latent_layer.mlp.dense1.out_features,
        "pre_norm": True,
        "gated_feed_forward": False,  # transformers' MLP: dense1, activation, dense2
        "layer_norm_eps": cross.layernorm.eps,
        "hidden_act": model.config.hidden_act,
        "attention_dropout": model.config.attention_probs_dropout_prob,
        "ff_dropout": 0.0,
        "initializer_range": model.config.initializer_range,
    }


def input_fields(model: nn.Module) -> dict:
    """How the inputs reach the cross-attention: token embedding plus learned positions (text), pixels and Fourier
    features (image, Fourier), or a 1x1 convolution and projected learned positions (image, learned)."""
    preprocessor = model.perceiver.input_preprocessor
    name = type(model).__name__
    if name in TEXT_CLASSES:
        vocab_size, d_model = preprocessor.embeddings.weight.shape
        max_positions = preprocessor.position_embeddings.num_embeddings
        return {"data_shape": [d_model, max_positions], "vocab_size": vocab_size, "position_encoding_type": "learned",
                "concat_positions": False}  # fmt: skip
    if name == "PerceiverForImageClassificationFourier":
        encoding = preprocessor.position_embeddings
        return {"data_shape": [preprocessor.in_channels, *image_size(model.config, len(encoding.max_resolution))],
                "position_encoding_type": "fourier", "num_bands": encoding.num_bands,
                "resolution": list(encoding.max_resolution), "frequency_base": None}  # fmt: skip
    height, width = image_size(model.config, 2)
    table = preprocessor.position_embeddings.position_embeddings
    if table.shape[0] != height * width:
        raise ConversionError(
            f"PerceiverForImageClassificationLearned: the position table has {table.shape[0]} rows, config.image_size "
            f"{model.config.image_size} implies {height * width}"
        )
    position_dim = getattr(preprocessor.positions_projection, "out_features", table.shape[1])
    return {"data_shape": [preprocessor.in_channels, height, width], "input_projection_dim": preprocessor.out_channels,
            "position_encoding_type": "learned", "position_dim": position_dim}  # fmt: skip


def image_size(config, num_axes: int) -> list[int]:
    """The nominal image size of `config.image_size` (an int for a square, or one size per axis)."""
    size = config.image_size
    sizes = [size] * num_axes if isinstance(size, int) else list(size)
    if len(sizes) != num_axes:
        raise ConversionError(f"config.image_size {size} has not the {num_axes} axes of the position encoding")
    return sizes


def decoder_fields(model: nn.Module) -> dict:
    """Perceiver IO's decoder: learned queries cross-attending to the latents (one per position for masked LM, with
    the token embedding as output projection; one for the classifiers, then their linear layer)."""
    masked_lm = type(model).__name__ == "PerceiverForMaskedLM"
    decoder = model.perceiver.decoder if masked_lm else model.perceiver.decoder.decoder
    layer = decoder.decoding_cross_attention
    heads, qk_channels, v_channels = attention_fields(layer)
    decoder_dim = decoder.output_position_encodings.position_embeddings.shape[1]
    fields = {
        "decoder_dim": decoder_dim,
        "decoder_heads": heads,
        "decoder_qk_channels": qk_channels,
        "decoder_v_channels": v_channels,
        "decoder_ff_dim_scale": layer.mlp.dense1.out_features // decoder_dim,
        "decoder_query_residual": layer.attention.use_query_residual,
    }
    if masked_lm:
        return {**fields, "decoder_query_type": "learned", "tie_word_embeddings": True}
    return {**fields, "classifier_pooling": "decoder"}


def label_fields(config) -> dict:
    fields = {"id2label": dict(config.id2label), "label2id": dict(config.label2id)}
    return {**fields, "problem_type": config.problem_type} if config.problem_type else fields


def lite_config(model: nn.Module) -> PerceiverLiteConfig:
    """The PerceiverLiteConfig of the same architecture as the transformers Perceiver `model`."""
    fields = {**encoder_fields(model), **input_fields(model), **decoder_fields(model), **label_fields(model.config)}
    return PerceiverLiteConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------


def take(state: dict, key: str) -> torch.Tensor:
    """`state[key]`, or an error naming the missing tensor."""
    if key not in state:
        raise ConversionError(f"the transformers state dict lacks `{key}`")
    return state[key].float()


def layer_weights(state: dict, source: str, target: str, attention: str) -> dict:
    """A transformers `PerceiverLayer` at `source` as a `PerceiverLiteLayer` at `target`, whose attention sublayer is
    `attention` (`"cross_attention"`, with the key/value LayerNorm, or `"self_attention"`)."""
    names = {
        "attention.self.layernorm1": f"{attention}_norm",
        "attention.self.query": f"{attention}.q_proj",
        "attention.self.key": f"{attention}.k_proj",
        "attention.self.value": f"{attention}.v_proj",
        "attention.output.dense": f"{attention}.o_proj",
        "layernorm": "mlp_norm",
        "mlp.dense1": "mlp.fc1",
        "mlp.dense2": "mlp.fc2",
    }
    if attention == "cross_attention":
        names["attention.self.layernorm2"] = "cross_attention.kv_norm"
    return {
        f"{target}{new}.{parameter}": take(state, f"{source}{old}.{parameter}")
        for old, new in names.items()
        for parameter in ("weight", "bias")
    }


def encoder_weights(state: dict, num_self_attends: int) -> dict:
    weights = {"perceiver.latents": take(state, "perceiver.embeddings.latents")}
    weights |= layer_weights(state, "perceiver.encoder.cross_attention.", "perceiver.blocks.0.cross_layer.",
                             "cross_attention")  # fmt: skip
    for index in range(num_self_attends):  # transformers' shared block is perceiver-lite's block 1
        source, target = f"perceiver.encoder.self_attends.{index}.", f"perceiver.blocks.1.layers.{index}."
        weights |= layer_weights(state, source, target, "self_attention")
    return weights


def fourier_column_order(num_channels: int, num_axes: int, num_bands: int) -> list[int]:
    """For each cross-attention input column of perceiver-lite (data, then per axis `[x, sines, cosines]`), its column
    in transformers' layout (data, then `[x of every axis, every sine (axis-major), every cosine]`)."""
    positions, sines = num_channels, num_channels + num_axes
    cosines = sines + num_axes * num_bands
    order = list(range(num_channels))
    for axis in range(num_axes):
        bands = range(axis * num_bands, (axis + 1) * num_bands)
        order += [positions + axis, *(sines + band for band in bands), *(cosines + band for band in bands)]
    return order


def permute_cross_inputs(weights: dict, order: list[int]):
    """Reorder the key/value input columns of the encoder's cross-attention (its LayerNorm and k/v projections)."""
    prefix = "perceiver.blocks.0.cross_layer.cross_attention."
    for key in ("kv_norm.weight", "kv_norm.bias"):
        weights[prefix + key] = weights[prefix + key][order]
    for key in ("k_proj.weight", "v_proj.weight"):
        weights[prefix + key] = weights[prefix + key][:, order]


def input_weights(model: nn.Module, state: dict) -> dict:
    """The token embedding and positions (text), or the 1x1 convolution as a linear layer with the position table
    through its projection (learned images); Fourier images have none."""
    name = type(model).__name__
    prefix = "perceiver.input_preprocessor."
    if name in TEXT_CLASSES:
        return {
            "embeddings.weight": take(state, prefix + "embeddings.weight"),
            "perceiver.embeddings.position_embeddings": take(state, prefix + "position_embeddings.weight"),
        }
    if name == "PerceiverForImageClassificationFourier":
        return {}
    table = take(state, prefix + "position_embeddings.position_embeddings")
    if f"{prefix}positions_projection.weight" in state:  # transformers projects the table in every forward
        projection = [take(state, f"{prefix}positions_projection.{name}") for name in ("weight", "bias")]
        table = nn.functional.linear(table, *projection)
    convolution = take(state, prefix + "convnet_1x1.weight")
    return {
        "perceiver.embeddings.input_projection.weight": convolution.reshape(convolution.shape[:2]),
        "perceiver.embeddings.input_projection.bias": take(state, prefix + "convnet_1x1.bias"),
        "perceiver.embeddings.position_embeddings": table,
    }


def decoder_weights(model: nn.Module, state: dict) -> dict:
    if type(model).__name__ == "PerceiverForMaskedLM":
        source, target = "perceiver.decoder.", "decoder."
        weights = {"lm_head.weight": take(state, "perceiver.input_preprocessor.embeddings.weight"),  # tied
                   "lm_head.bias": take(state, "embedding_decoder.bias")}  # fmt: skip
    else:
        source, target = "perceiver.decoder.decoder.", "classifier.decoder."
        weights = {"classifier.dense.weight": take(state, source + "final_layer.weight"),
                   "classifier.dense.bias": take(state, source + "final_layer.bias")}  # fmt: skip
    weights[target + "queries"] = take(state, source + "output_position_encodings.position_embeddings")
    return weights | layer_weights(state, source + "decoding_cross_attention.", target + "layer.", "cross_attention")


def lite_weights(model: nn.Module, config: PerceiverLiteConfig) -> dict:
    """The perceiver-lite state dict (float32) of the transformers Perceiver `model`."""
    state = model.state_dict()
    weights = encoder_weights(state, len(model.perceiver.encoder.self_attends))
    if config.position_encoding_type == "fourier":
        order = fourier_column_order(config.data_shape[0], config.num_axes, config.num_bands)
        permute_cross_inputs(weights, order)
    return weights | input_weights(model, state) | decoder_weights(model, state)


def load_weights(lite_model: nn.Module, weights: dict):
    """Load `weights` strictly: every parameter of `lite_model` from the source, each with its shape."""
    try:
        lite_model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ConversionError(f"the converted weights do not fit {type(lite_model).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def check_model(model) -> nn.Module:
    """`model` itself where it is a supported transformers Perceiver, else an error naming its class."""
    if type(model).__name__ not in SUPPORTED or not isinstance(model, transformers.PerceiverPreTrainedModel):
        raise ConversionError(
            f"`model_or_path` is a {type(model).__name__}; only {', '.join(SUPPORTED)} (or a path to one) convert"
        )
    return model


def convert(model_or_path, output_dir=None) -> nn.Module:
    """Convert a transformers Perceiver (a supported model, or a Hub name or local folder of one) into the
    perceiver-lite model with the same outputs, in eval mode; saved with `save_pretrained` into `output_dir` if given.

    The weights are mapped in float32 (the learned image positions' projection is folded in that precision) and the
    result has the source's dtype: float32 for a path.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        source = load_source(os.fspath(model_or_path))
    else:
        source = check_model(model_or_path)
    check_supported(source)
    config = lite_config(source)
    lite_class, _ = SUPPORTED[type(source).__name__]
    lite_model = lite_class(config)
    with torch.no_grad():
        load_weights(lite_model, lite_weights(source, config))
    lite_model = lite_model.to(source.dtype).eval()
    if output_dir is not None:
        lite_model.save_pretrained(output_dir)
    return lite_model


# ---------------------------------------------------------------------------------------------------------------------
# Verification and command line
# ---------------------------------------------------------------------------------------------------------------------


def example_inputs(lite_model: nn.Module, batch_size: int = 2) -> dict:
    """Random inputs of `lite_model`'s nominal size, with a padded second sample for the text models."""
    config, generator = lite_model.config, torch.Generator().manual_seed(0)
    if lite_model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(batch_size, *config.data_shape, generator=generator)}
    length = config.data_shape[1]
    input_ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1:, length // 2 + 1 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def max_difference(source: nn.Module, lite_model: nn.Module) -> float:
    """Largest absolute difference of the logits of `source` and `lite_model` on `example_inputs`."""
    inputs = example_inputs(lite_model)
    main_input = lite_model.main_input_name  # transformers' Perceivers call it `inputs`
    source_inputs = {("inputs" if key == main_input else key): value for key, value in inputs.items()}
    with torch.no_grad():
        expected = source(**source_inputs).logits
        logits = lite_model(**inputs).logits
    return (logits - expected[:, : logits.shape[1]]).abs().max().item()


def parse_arguments(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SOURCE", help="Hub name or local folder of a transformers Perceiver")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write the perceiver-lite model into")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    parser.add_argument("--verify", action="store_true",
                        help="compare the logits of both models on random inputs (in float32) and print the largest "
                             "difference")  # fmt: skip
    return parser.parse_args(args)


def main(args=None) -> int:
    arguments = parse_arguments(args)
    try:
        source = load_source(arguments.source)
        lite_model = convert(source)  # float32, as the source: --verify compares before the cast
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if arguments.verify:
        print(json.dumps({"max_abs_diff_logits": max_difference(source, lite_model)}))
    lite_model.to(DTYPES[arguments.dtype]).save_pretrained(arguments.output_dir)
    _, auto_class = SUPPORTED[type(source).__name__]
    print(f"{type(source).__name__} -> {type(lite_model).__name__} in {arguments.output_dir} (load with {auto_class})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
