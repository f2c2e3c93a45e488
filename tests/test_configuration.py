"""PerceiverLiteConfig: the seed README's usage, defaults, aliases, round-trips and validation."""

import json
import re

import pytest
import torch
from transformers import AutoConfig

from perceiver_lite import PerceiverLiteConfig, PerceiverLiteModel
from perceiver_lite.modeling_perceiver_lite import PerceiverLiteLayer, PerceiverLiteMLP


# The seed README's usage example, verbatim but for `Perceiver(` -> `PerceiverLiteConfig(`.
def seed_readme_config():
    return PerceiverLiteConfig(
        data_shape=[1, 224, 224],                 # Channel Major, ex: image -> [C H W]
        cross_heads=1,                            # Number of heads for the cross attention block
        num_latent_tokens=1024,                   # Latent array: [num_latent_tokens, dim]
        dim=512,                                  #
        heads=16,                                 # Number of heads for latent transformers
        layers_indice=[0] + [1]*7,                # a list of indice for indicating which layer go next. Ex: [0, 0, 0, 1, 1, 1, 2, 2, 2] means 3 unique layers and each of them iterates 3 times.
        num_latent_transformers_in_layers=[6]*2,  # Number of latent transformers in one layer, its length should be as same as the number of unique layers.
        num_bands=64,                             # Number of bands for Fourier features
        resolution=224,                           # max_resolution = resolution / 2
        frequency_base=2,                         # Frequency base for Fourier features
        pre_norm=True,
        ff_dim=None,
        ff_dim_scale=4,
        ff_dropout=0.0,
        attention_dropout=0.0,
        cross_kv_dim=None,
        head_dim=None
    )  # fmt: skip


SEED_VALUES = dict(
    data_shape=[1, 224, 224],
    cross_heads=1,
    num_latent_tokens=1024,
    dim=512,
    heads=16,
    layers_indice=[0, 1, 1, 1, 1, 1, 1, 1],
    num_latent_transformers_in_layers=[6, 6],
    num_bands=64,
    resolution=224,
    frequency_base=2,
    pre_norm=True,
    ff_dim=None,
    ff_dim_scale=4,
    ff_dropout=0.0,
    attention_dropout=0.0,
    head_dim=None,
)


def test_seed_readme_usage_builds_unchanged():
    config = seed_readme_config()
    for name, value in SEED_VALUES.items():
        assert getattr(config, name) == value, name
    assert config.cross_kv_dim == 1 + 2 * (2 * 64 + 1)  # C + axes x (2 x num_bands + 1)
    assert config.model_type == "perceiver_lite"


def test_seed_readme_model_structure():
    """8 cross-attends (block 0 once, block 1 seven times with shared weights), 6 latent self-attention layers after
    each, over 1024 latents of width 512. Built on the meta device: structure only, no 44M-parameter initialisation."""
    with torch.device("meta"):
        model = PerceiverLiteModel(seed_readme_config())

    assert tuple(model.latents.shape) == (1024, 512)
    assert len(model.blocks) == 2
    steps = [model.blocks[i] for i in model.config.layers_indice]
    assert len(steps) == 8
    assert steps[0] is model.blocks[0] and all(step is model.blocks[1] for step in steps[1:])
    for block in model.blocks:
        assert len(block.layers) == 6
        assert all(layer.self_attention is not None and layer.cross_attention is None for layer in block.layers)
        cross = block.cross_layer.cross_attention
        assert (cross.num_heads, cross.head_dim) == (1, 512)
        assert cross.k_proj.in_features == 259 and cross.q_proj.in_features == 512
        self_attention = block.layers[0].self_attention
        assert (self_attention.num_heads, self_attention.head_dim) == (16, 32)
        mlp = block.layers[0].mlp  # ff_dim_scale=4: 4 x 512 hidden units, gated by default (values and gates)
        assert mlp.fc2.in_features == 4 * 512 and mlp.fc1.out_features == 2 * 4 * 512
    # 8 cross-attends and 8 x 6 self-attention layers run, from 2 + 12 distinct layer modules
    assert sum(1 + len(step.layers) for step in steps) == 8 + 48
    assert sum(isinstance(module, PerceiverLiteLayer) for module in model.modules()) == 14


def test_seed_readme_structure_runs_at_small_size():
    """The seed's block structure (`[0] + [1] * 7`, six self-attention layers each) at a small width and input: every
    cross-attend and self-attention layer runs."""
    small = dict(data_shape=[1, 16, 16], num_latent_tokens=8, dim=32, heads=4)
    config = PerceiverLiteConfig(**{**SEED_VALUES, **small})
    model = PerceiverLiteModel._from_config(config, attn_implementation="eager").eval()
    outputs = model(torch.randn(2, 1, 16, 16), output_attentions=True, output_hidden_states=True)
    assert len(outputs.cross_attentions) == 8
    assert len(outputs.attentions) == 48
    assert len(outputs.hidden_states) == 1 + 8 + 48
    assert outputs.last_hidden_state.shape == (2, 8, 32)


def test_defaults_are_the_seed_usage_values_but_the_cross_heads():
    """The seed README's values (the paper's ImageNet model), but for `cross_heads`: 4, with which small models learn
    better (docs/design.md, section 2.1)."""
    config = PerceiverLiteConfig()
    assert config.cross_heads == 4
    assert {**config.to_dict(), "cross_heads": 1} == seed_readme_config().to_dict()
    others = dict(vocab_size=262, hidden_act="gelu", layer_norm_eps=1e-5, cross_kv_dim=259)
    assert {name: getattr(config, name) for name in others} == others


def test_hidden_size_and_num_attention_heads_aliases():
    config = PerceiverLiteConfig(dim=64, heads=8)
    assert (config.hidden_size, config.num_attention_heads) == (64, 8)
    config = PerceiverLiteConfig(hidden_size=96, num_attention_heads=12)
    assert (config.dim, config.heads) == (96, 12)
    config.hidden_size = 48
    assert config.dim == 48


NON_DEFAULT = dict(
    data_shape=[2, 16, 12, 10],
    cross_heads=2,
    num_latent_tokens=5,
    dim=24,
    heads=3,
    layers_indice=[1, 0, 2, 2],
    num_latent_transformers_in_layers=[0, 2, 1],
    num_bands=3,
    resolution=[16, 12, 10],
    frequency_base=None,
    pre_norm=False,
    ff_dim=40,
    ff_dropout=0.25,
    attention_dropout=0.5,
    head_dim=7,
    hidden_act="relu",
    num_labels=4,
    problem_type="multi_label_classification",
)


def test_round_trip_to_dict():
    config = PerceiverLiteConfig(**NON_DEFAULT)
    restored = PerceiverLiteConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    for name, value in NON_DEFAULT.items():
        assert getattr(restored, name) == value, name
    assert restored.cross_kv_dim == 2 + 3 * 7


def without_name_or_path(config):
    """`to_dict()` without `_name_or_path`, which `from_pretrained` sets to the folder it loaded from."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_round_trip_save_pretrained(tmp_path):
    config = PerceiverLiteConfig(**NON_DEFAULT)
    config.save_pretrained(tmp_path)
    for restored in (PerceiverLiteConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(restored) is PerceiverLiteConfig
        assert without_name_or_path(restored) == without_name_or_path(config)
        assert restored.resolution == [16, 12, 10] and restored.frequency_base is None


def test_tuples_are_stored_as_lists():
    config = PerceiverLiteConfig(data_shape=(3, 8), layers_indice=(0,), num_latent_transformers_in_layers=(1,),
                                 resolution=(8,), num_bands=2, dim=32, heads=4)  # fmt: skip
    assert config.data_shape == [3, 8] and config.layers_indice == [0] and config.resolution == [8]
    assert PerceiverLiteConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


INVALID = [
    (dict(layers_indice=[0, 2]), "layers_indice", "does not define"),
    (dict(layers_indice=[0, -1]), "layers_indice", "does not define"),
    (dict(layers_indice=[0, 0]), "layers_indice", "unused"),
    (dict(layers_indice=[]), "layers_indice", "at least one"),
    (dict(num_latent_transformers_in_layers=[]), "num_latent_transformers_in_layers", "non-empty"),
    (dict(num_latent_transformers_in_layers=[6, -1]), "num_latent_transformers_in_layers", ">= 0"),
    (dict(dim=500), "dim", "divisible by `heads`"),
    (dict(cross_heads=3), "dim", "divisible by `cross_heads`"),
    (dict(cross_kv_dim=258), "cross_kv_dim", "disagrees with the inputs"),
    (dict(data_shape=[3, 224, 224], cross_kv_dim=259), "cross_kv_dim", "disagrees"),
    (dict(num_bands=32, cross_kv_dim=259), "cross_kv_dim", "disagrees"),
    (dict(dim=0), "dim", "positive"),
    (dict(heads=-4), "heads", "positive"),
    (dict(cross_heads=0), "cross_heads", "positive"),
    (dict(num_latent_tokens=0), "num_latent_tokens", "positive"),
    (dict(num_bands=0), "num_bands", "positive"),
    (dict(ff_dim=0), "ff_dim", "positive"),
    (dict(ff_dim_scale=0), "ff_dim_scale", "positive"),
    (dict(head_dim=-1), "head_dim", "positive"),
    (dict(cross_kv_dim=0), "cross_kv_dim", "positive"),
    (dict(vocab_size=0), "vocab_size", "positive"),
    (dict(num_latent_tokens=2.5), "num_latent_tokens", "positive integer"),
    (dict(dim=512.0), "dim", "positive integer"),
    (dict(heads=True), "heads", "positive integer"),
    (dict(num_bands=2.5), "num_bands", "positive integer"),
    (dict(ff_dim="64"), "ff_dim", "positive integer"),
    (dict(ff_dim_scale=-1.5), "ff_dim_scale", "positive number"),
    (dict(data_shape=[1, 0, 224]), "data_shape", "positive"),
    (dict(data_shape=[3]), "data_shape", "at least one axis"),
    (dict(resolution=0), "resolution", "positive"),
    (dict(resolution=[224, -2]), "resolution", "positive"),
    (dict(ff_dropout=1.0), "ff_dropout", r"\[0, 1\)"),
    (dict(ff_dropout=-0.1), "ff_dropout", r"\[0, 1\)"),
    (dict(attention_dropout=1.5), "attention_dropout", r"\[0, 1\)"),
    (dict(attention_dropout=-0.01), "attention_dropout", r"\[0, 1\)"),
    (dict(resolution=[224]), "resolution", "one value per spatial axis"),
    (dict(resolution=[224, 224, 224]), "resolution", "one value per spatial axis"),
    (dict(frequency_base=113), "frequency_base", "resolution / 2"),
    (dict(resolution=[224, 8], frequency_base=5), "frequency_base", "resolution / 2"),
    (dict(frequency_base=0), "frequency_base", "resolution / 2"),
    (dict(layer_norm_eps=0), "layer_norm_eps", "positive"),
    (dict(initializer_range=-0.02), "initializer_range", ">= 0"),
    (dict(latent_initializer_range=-0.25), "latent_initializer_range", ">= 0 or None"),
]


@pytest.mark.parametrize(("kwargs", "field", "reason"), INVALID, ids=[f"{f}-{k}" for k, f, _ in INVALID])
def test_invalid_config_raises_naming_the_field(kwargs, field, reason):
    with pytest.raises(ValueError, match=rf"`{re.escape(field)}`.*{reason}"):
        PerceiverLiteConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=500, heads=10, cross_heads=4, head_dim=50),  # head_dim given: dim need not divide
        dict(cross_kv_dim=259),  # agrees with data_shape and num_bands
        dict(frequency_base=112),  # exactly Nyquist
        dict(resolution=[224, 64], frequency_base=None),
        dict(num_latent_transformers_in_layers=[0, 3]),  # a block of only its cross-attend
        dict(ff_dropout=0.0, attention_dropout=0.999),
        dict(ff_dim_scale=2.5),  # a float expansion factor
    ],
)
def test_valid_edge_configs(kwargs):
    config = PerceiverLiteConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize("change", [dict(num_bands=4), dict(data_shape=[1, 8, 8]), dict(heads=5)])
def test_config_changed_after_construction_is_validated_when_a_model_is_built(change):
    """A config edited field by field after construction (where `cross_kv_dim`, derived at construction, goes stale)
    is validated again by the model, with the same error naming the field, before any weight is built."""
    config = PerceiverLiteConfig(data_shape=[3, 8, 8], num_bands=6, dim=32, heads=4, cross_heads=1)
    for name, value in change.items():
        setattr(config, name, value)
    field = "dim" if "heads" in change else "cross_kv_dim"
    with pytest.raises(ValueError, match=rf"`{field}`"):
        PerceiverLiteModel(config)


def test_unknown_keyword_warns_naming_the_closest_field():
    """A typo is kept as an attribute that nothing reads (transformers' behaviour): the warning says so and names the
    field meant, at the caller's line."""
    with pytest.warns(UserWarning, match=r"unknown keyword `dmi` \(dmi=64\).*did you mean `dim`\?") as record:
        config = PerceiverLiteConfig(dmi=64)
    assert record[0].filename == __file__
    assert config.dim == 512
    with pytest.warns(UserWarning, match=r"`num_latent_token`.*did you mean `num_latent_tokens`\?"):
        PerceiverLiteConfig(num_latent_token=8)
    with pytest.warns(UserWarning, match=r"`zzz`.*fields are listed in PerceiverLiteConfig's docstring"):
        PerceiverLiteConfig(zzz=1)


def test_fields_aliases_and_transformers_keywords_do_not_warn(recwarn):
    PerceiverLiteConfig(
        dim=64, hidden_size=64, num_attention_heads=4, num_labels=3, problem_type="single_label_classification",
        torch_dtype="float32", dtype="float32", architectures=["PerceiverLiteModel"], name_or_path="x",
        auto_map={"AutoConfig": "configuration_perceiver_lite.PerceiverLiteConfig"}, transformers_version="5.0.0",
        attn_implementation="eager", output_attentions=False, return_dict=True, pad_token_id=0,
    )  # fmt: skip
    assert [str(w.message) for w in recwarn if "PerceiverLiteConfig" in str(w.message)] == []


def test_config_file_with_an_extra_key_loads_with_a_warning(tmp_path, recwarn):
    """A `config.json` with a key this version does not know (written by another version, or by hand) loads; the
    warning names the key and the file. The keys transformers writes never warn."""
    PerceiverLiteModel(PerceiverLiteConfig(dim=32, heads=4, num_latent_tokens=4, data_shape=[3, 8, 8], resolution=8,
                                           num_bands=4, id2label={0: "a", 1: "b"})).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    assert {"architectures", "auto_map", "transformers_version", "id2label", "label2id", "dtype"} <= saved.keys()
    for config in (PerceiverLiteConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert config.id2label == {0: "a", 1: "b"}
    assert [str(w.message) for w in recwarn if "PerceiverLiteConfig" in str(w.message)] == []

    config_file.write_text(json.dumps({**saved, "torch_dtype": "float32", "_name_or_path": "x", "latent_size": 7}))
    for load in (PerceiverLiteConfig.from_pretrained, AutoConfig.from_pretrained, PerceiverLiteModel.from_pretrained):
        with pytest.warns(UserWarning, match=r"unknown keyword `latent_size` .*config\.json") as record:
            loaded = load(tmp_path)
        assert len([w for w in record if "PerceiverLiteConfig" in str(w.message)]) == 1
        assert getattr(loaded, "config", loaded).dim == 32


@pytest.mark.parametrize("dim", [64, 512, 768])
def test_default_initializer_range_follows_the_width(dim):
    """`initializer_range=None` becomes PyTorch's `nn.Linear` scale for `dim` inputs when the config is built; saved and
    loaded as that number. A given value stays."""
    config = PerceiverLiteConfig(dim=dim, heads=4)
    assert config.initializer_range == pytest.approx((3 * dim) ** -0.5)
    assert config.latent_initializer_range == 0.25
    assert PerceiverLiteConfig.from_dict(config.to_diff_dict()).initializer_range == config.initializer_range
    assert PerceiverLiteConfig(dim=dim, heads=4, initializer_range=0.02).initializer_range == 0.02


# What the package wrote before the initialisation defaults changed, for `SAVED_BEFORE_KWARGS` (a
# `PerceiverLiteForImageClassification`): every field, the initialisation ranges of that time among them.
SAVED_BEFORE_KWARGS = dict(data_shape=[1, 8, 8], num_latent_tokens=8, dim=32, heads=4, layers_indice=[0, 1, 1],
                           num_latent_transformers_in_layers=[1, 1], num_bands=4, resolution=8, num_labels=3)
SAVED_BEFORE = {
    "architectures": ["PerceiverLiteForImageClassification"], "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_perceiver_lite.PerceiverLiteConfig",
        "AutoModel": "modeling_perceiver_lite.PerceiverLiteModel",
        "AutoModelForAudioClassification": "modeling_perceiver_lite.PerceiverLiteForAudioClassification",
        "AutoModelForImageClassification": "modeling_perceiver_lite.PerceiverLiteForImageClassification",
        "AutoModelForMaskedLM": "modeling_perceiver_lite.PerceiverLiteForMaskedLM",
        "AutoModelForSemanticSegmentation": "modeling_perceiver_lite.PerceiverLiteForDensePrediction",
        "AutoModelForSequenceClassification": "modeling_perceiver_lite.PerceiverLiteForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_perceiver_lite.PerceiverLiteForTokenClassification",
    },
    "classifier_pooling": "mean", "concat_positions": True, "cross_attend_blocks": None,
    "cross_attention_query_residual": True, "cross_ff_dim": None, "cross_heads": 1, "cross_kv_dim": 19,
    "cross_qk_channels": None, "cross_v_channels": None, "data_shape": [1, 8, 8], "decoder_dim": None,
    "decoder_ff_dim_scale": 1, "decoder_heads": 1, "decoder_qk_channels": None, "decoder_query_inputs": False,
    "decoder_query_residual": True, "decoder_query_type": "fourier", "decoder_v_channels": None, "dim": 32,
    "dtype": "float32", "ff_dim": None, "ff_dim_scale": 4, "ff_dropout": 0.0, "frequency_base": 2,
    "gated_feed_forward": False, "head_dim": None, "heads": 4, "hidden_act": "gelu",
    "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}, "initializer_range": 0.02,
    "input_projection_dim": None, "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    "latent_initializer_range": None, "layer_norm_eps": 1e-05, "layers_indice": [0, 1, 1],
    "model_type": "perceiver_lite", "num_bands": 4, "num_latent_tokens": 8, "num_latent_transformers_in_layers": [1, 1],
    "position_dim": None, "position_encoding_type": "fourier", "pre_norm": True, "qk_channels": None, "resolution": 8,
    "sparse_prediction": False, "tie_word_embeddings": True, "transformers_version": "5.25.0",
    "use_fast_paths": True, "v_channels": None, "vocab_size": 262,
}  # fmt: skip


def test_a_config_saved_before_the_default_changes_loads_unchanged(tmp_path):
    """`save_pretrained` writes every PerceiverLite field, defaults included (`to_diff_dict` leaves out only the fields
    of transformers' base config at their base value), so a folder keeps its values whatever the defaults become: its
    initialisation ranges, `gated_feed_forward`, `cross_heads` and all."""
    (tmp_path / "config.json").write_text(json.dumps(SAVED_BEFORE))
    config = PerceiverLiteConfig.from_pretrained(tmp_path)
    assert (config.initializer_range, config.latent_initializer_range, config.gated_feed_forward) == (0.02, None, False)
    assert config.cross_heads == 1 and config.attention_channels("cross")[0] == 1  # one head, under today's 4
    mlp = PerceiverLiteMLP(config)  # the plain feed-forward it was saved with, under today's gated default
    assert not mlp.gated and mlp.fc1.out_features == mlp.fc2.in_features
    written = {k: v for k, v in SAVED_BEFORE.items() if k not in ("architectures", "auto_map", "transformers_version")}
    loaded = json.loads(config.to_json_string(use_diff=False))
    for name, value in written.items():
        assert loaded[name] == value, name
    # what the package writes today holds every field too, so a folder saved now loads unchanged under later defaults
    current = PerceiverLiteConfig(**SAVED_BEFORE_KWARGS)
    assert set(current.to_diff_dict()) >= set(written) - {"dtype"}
    assert current.to_diff_dict()["initializer_range"] == pytest.approx(32 ** -0.5 / 3**0.5)
