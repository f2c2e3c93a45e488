"""PerceiverLite model configuration."""

import dataclasses
import difflib
import math
import os
import sys
import warnings

import transformers
from transformers import GenerationConfig, PreTrainedConfig


# Keywords that transformers itself writes into a `config.json` or passes to a config, beside the dataclass fields of
# `PreTrainedConfig`: never a typo. transformers 4.x wrote the legacy ones into every saved config.
TRANSFORMERS_KEYWORDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype", "name_or_path",
    "_name_or_path", "_commit_hash", "num_labels", "id2label", "label2id", "problem_type", "attn_implementation",
    "experts_implementation", "output_attentions", "per_layer_config", "_attn_implementation",
    "_attn_implementation_internal", "_attn_implementation_autoset", "_experts_implementation",
    "_experts_implementation_internal",
    # legacy fields of transformers 4.x configs
    "return_dict", "output_hidden_states", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_encoder_decoder", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "use_cache",
}  # fmt: skip


class PerceiverLiteConfig(PreTrainedConfig):
    r"""
    Configuration of a Perceiver (Jaegle et al., 2021, "General Perception with Iterative Attention"): a latent array
    that cross-attends to the inputs (data channels plus Fourier position features) and refines itself with latent
    self-attention. The defaults are the paper's ImageNet model: 8 cross-attends over 1024 latents of width 512, 6 latent
    self-attention layers after each, the last 7 sharing weights; two defaults depart from it, because small models
    learn better with them: gated feed-forward layers (`gated_feed_forward`; the paper's plain ones with
    `gated_feed_forward=False`) and 4 cross-attention heads (`cross_heads`; the paper's one with `cross_heads=1`).

    Args:
        data_shape (`list[int]`, *optional*, defaults to `[1, 224, 224]`):
            Channel-first shape of one input: `[C, H, W]` for images, `[C, T]` for 1-D signals and tokens (the token
            embedding width), `[C, T, H, W]` for video. Its length fixes the number of spatial axes; the axes' sizes
            are only the nominal size: any size works at run time.
        cross_heads (`int`, *optional*, defaults to 4):
            Number of heads of the cross-attention from the latents to the inputs. The paper's model has one; several
            narrower heads locate single input elements more reliably in small models (on the learning benchmark's
            1-D sequence task every seed learns with 2, 4 or 8 heads, where one head leaves some seeds far behind:
            docs/design.md, section 2.1). A config saved with one head keeps it when loaded.
        num_latent_tokens (`int`, *optional*, defaults to 1024):
            Number of latent vectors `N`; the latent array is `[N, dim]`.
        dim (`int`, *optional*, defaults to 512):
            Width of the latent vectors (alias `hidden_size`).
        heads (`int`, *optional*, defaults to 16):
            Number of heads of the latent self-attention (alias `num_attention_heads`).
        layers_indice (`list[int]`, *optional*, defaults to `[0, 1, 1, 1, 1, 1, 1, 1]`):
            Which unique block runs at each step. A repeated index runs the same block again, with the same weights:
            `[0, 1, 1, 1]` is four cross-attends using two blocks. Every block must be used.
        num_latent_transformers_in_layers (`list[int]`, *optional*, defaults to `[6, 6]`):
            Number of latent self-attention layers in each unique block; its length is the number of unique blocks.
        num_bands (`int`, *optional*, defaults to 64):
            Number of Fourier frequency bands per spatial axis.
        resolution (`int` or `list[int]`, *optional*, defaults to 224):
            Sampling resolution of the Fourier features, one value for all axes or one per axis. The highest band
            frequency is `resolution / 2` (Nyquist).
        frequency_base (`float`, *optional*, defaults to 2):
            Lowest band frequency: the bands are spaced geometrically from `frequency_base` up to `resolution / 2`.
            `None` gives the paper's spacing, linear from 1 to `resolution / 2`.
        pre_norm (`bool`, *optional*, defaults to `True`):
            LayerNorm before each attention and feed-forward sublayer (and on the inputs before the cross-attention's
            key/value projections); `False` puts it after each residual sum instead.
        ff_dim (`int`, *optional*):
            Hidden width of the feed-forward layers; `None` uses `dim * ff_dim_scale`.
        ff_dim_scale (`int`, *optional*, defaults to 4):
            Feed-forward expansion factor, used when `ff_dim` is `None`.
        ff_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the output of each feed-forward layer.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        cross_kv_dim (`int`, *optional*):
            Width of the cross-attention's inputs: `C + axes * (2 * num_bands + 1)`. `None` derives it; a given value
            must agree with `data_shape` and `num_bands`.
        head_dim (`int`, *optional*):
            Width of every attention head; `None` uses `dim // heads` for the latent self-attention and
            `dim // cross_heads` for the cross-attention.
        vocab_size (`int`, *optional*, defaults to 262):
            Vocabulary size of the token embedding of the heads on token ids (`PerceiverLiteForSequenceClassification`,
            `PerceiverLiteForMaskedLM`, `PerceiverLiteForTokenClassification`) and of the masked-LM head's output (262
            matches transformers' byte-level `PerceiverTokenizer`).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward layers (any name in `transformers.activations.ACT2FN`).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        initializer_range (`float`, *optional*):
            Standard deviation of the normal initialisation of the weights. `None` (the default) sets it, when the
            config is built, to `(3 * dim) ** -0.5`: the scale of PyTorch's default `nn.Linear` initialisation for
            `dim` inputs (0.072 at width 64, 0.026 at the paper's 512, 0.021 at 768, where transformers' usual 0.02
            sits). A fixed small value such as 0.02 leaves narrow models with near-uniform attention and tiny updates
            at the start, and they learn slowly.
        use_fast_paths (`bool`, *optional*, defaults to `True`):
            Run the exact fast paths of `fast_perceiver_lite.py` where they are proven exact (the conditions are in
            that module's docstring: sdpa attention, the package's own modules without hooks, no tracing, ...); the
            reference model runs everywhere else. `False` runs the reference model's math alone, as
            `attn_implementation="eager"` does with its own attention.

        Encoder options beyond the paper's model (their defaults give the paper's model; transformers' Perceiver
        checkpoints need some of them, see `scripts/convert_transformers_perceiver.py`):

        cross_attend_blocks (`list[int]`, *optional*):
            The unique blocks that begin with a cross-attend to the inputs; the others are latent self-attention only.
            `None` (every block cross-attends) is the paper's model. transformers' Perceiver cross-attends once:
            `layers_indice=[0, 1, 1, ...]`, `num_latent_transformers_in_layers=[0, n]`, `cross_attend_blocks=[0]`.
        qk_channels (`int`, *optional*):
            Total query/key width of each latent self-attention, split over its `heads`. `None` uses `heads * head_dim`,
            or `dim` without `head_dim`.
        v_channels (`int`, *optional*):
            Total value width of each latent self-attention (the input width of its `o_proj`); `None` is the query/key
            width.
        cross_qk_channels (`int`, *optional*):
            Total query/key width of the cross-attention, split over `cross_heads`; `None` uses `cross_heads * head_dim`,
            or `dim` without `head_dim`.
        cross_v_channels (`int`, *optional*):
            Total value width of the cross-attention; `None` is its query/key width.
        cross_ff_dim (`int`, *optional*):
            Hidden width of the cross-attend layers' feed-forward; `None` uses the latent layers' width (`ff_dim` or
            `dim * ff_dim_scale`).
        cross_attention_query_residual (`bool`, *optional*, defaults to `True`):
            Add the latents back after the cross-attention (the residual around it); `False` keeps only the attention's
            output, as transformers' `use_query_residual=False`.
        input_projection_dim (`int`, *optional*):
            Project each input element's `C` data channels to this width with a linear layer (a 1x1 convolution for
            images) before the position features are joined; `None` joins the raw channels.
        position_encoding_type (`str`, *optional*, defaults to `"fourier"`):
            `"fourier"`: the Fourier features above. `"learned"`: a learned embedding per position of the nominal grid
            `data_shape[1:]`; an input of a smaller size takes the embeddings of its own positions (the top-left
            corner), a larger one is an error.
            `"rotary"`: rotary position embeddings on the attention's queries and keys, no position channels (the
            causal language model only, which needs it).
        position_dim (`int`, *optional*):
            Width of the learned position embeddings; `None` is the data width (`input_projection_dim` or `C`).
        concat_positions (`bool`, *optional*, defaults to `True`):
            Concatenate the position features after the data channels; `False` adds them to the data channels (then
            both must have the same width), as transformers' language Perceiver does.

        Decoder (Perceiver IO, Jaegle et al., 2021b: output queries cross-attend to the final latents, one output per
        query). Used by the per-element heads (`...ForMaskedLM`, `...ForTokenClassification`, `...ForDensePrediction`)
        and by `classifier_pooling="decoder"`; the encoder-only models build none:

        decoder_dim (`int`, *optional*):
            Width of the output queries and of the decoder's outputs; `None` uses `dim`.
        decoder_heads (`int`, *optional*, defaults to 1):
            Number of heads of the decoder's cross-attention.
        decoder_qk_channels (`int`, *optional*):
            Total query/key width of the decoder's cross-attention; `None` uses `decoder_dim`.
        decoder_v_channels (`int`, *optional*):
            Total value width of the decoder's cross-attention; `None` is its query/key width.
        decoder_ff_dim_scale (`int` or `float`, *optional*, defaults to 1):
            Expansion factor of the decoder's feed-forward (`decoder_dim * decoder_ff_dim_scale` hidden units); 0 leaves
            the feed-forward out.
        decoder_query_residual (`bool`, *optional*, defaults to `True`):
            Add the queries back after the decoder's cross-attention; `False` suits queries that only say where to
            decode (positions), whose values mean something else than the outputs.
        decoder_query_type (`str`, *optional*, defaults to `"fourier"`):
            Queries of the per-element heads: `"fourier"`, the Fourier features of each output position (of each
            sample's valid extent under a mask) through a linear layer, for any output size; `"learned"`, a learned
            query per position of the nominal grid `data_shape[1:]` (outputs up to that size).
        decoder_query_inputs (`bool`, *optional*, defaults to `False`):
            Add to each per-element query its own input element (the `C` data channels through a linear layer), as
            Perceiver IO's optical-flow decoder joins the inputs to its queries: outputs that depend on the element
            itself (a token's tag, a pixel's class) then need not be recovered from the latents.
        classifier_pooling (`str`, *optional*, defaults to `"mean"`):
            How the classification heads read the latents: `"mean"`, LayerNorm and a linear layer on their mean (the
            paper); `"decoder"`, one learned decoder query cross-attends to them and a linear layer reads its output
            (Perceiver IO and transformers' Perceiver classifiers).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            `PerceiverLiteForMaskedLM`'s output projection shares the token embedding's weight (as transformers'
            language Perceiver). Where `decoder_dim` is not the embedding's width `data_shape[0]`, the decoder's
            outputs are first projected to that width (a linear layer, `hidden_act` and a LayerNorm, as ALBERT's
            masked-LM head); where it is, they go straight to the tied projection. `False` learns its own projection
            from the decoder's outputs.
        latent_initializer_range (`float`, *optional*, defaults to 0.25):
            Standard deviation of the latent array's initialisation; `None` uses `initializer_range`. The latents are
            normalised before every sublayer, so what matters is their scale against the residual updates added to
            them: at the default `initializer_range` the first cross-attend (attention and feed-forward) adds updates
            of standard deviation about 0.4, at any width. Latents much smaller than that are overwritten by the first
            update, nearly the same for every latent, and start alike; at 0.25 they stay distinct.
        gated_feed_forward (`bool`, *optional*, defaults to `True`):
            Gated feed-forward layers: `fc1` gives values and gates, the hidden units are `values * act(gates)`
            (GEGLU with `hidden_act="gelu"`, as perceiver-pytorch's); `ff_dim` is the number of hidden units, so
            `ff_dim_scale=4` has the parameters of a plain feed-forward of scale 6. Small models learn faster with it:
            in the learning benchmark, with one cross head, it lifted digits, the 1-D sequence task and tokens to
            perceiver-pytorch's level and above; with the default 4 heads it is ahead on tokens and level on the others
            (docs/design.md, section 2.1). `False` is the paper's plain feed-forward, `fc1`, activation,
            `fc2`, the structure of transformers' Perceiver checkpoints (the conversion sets it); a config saved
            before this default changed has the field, and loads as it was.
        sparse_prediction (`bool`, *optional*, defaults to `False`):
            Where `PerceiverLiteForMaskedLM` or `PerceiverLiteForTokenClassification` get `labels`, decode only the
            positions that have one (not -100): `logits` then holds those rows alone, `(num_labelled, vocab_size)` or
            `(num_labelled, num_labels)` in the order of `labels[labels != -100]`, and the loss is the same as without.
            The decoder's queries are independent of each other, so the skipped positions change nothing of the rest;
            at masked language modelling's 15 % that is about a seventh of the decoder's work. As ModernBERT's
            `sparse_prediction`. Without `labels` every position is decoded.

        Causal language model (`PerceiverLiteForCausalLM`, Perceiver AR: Hawthorne et al., 2022). `data_shape` is
        `[embedding width, longest context]`, `num_latent_tokens` the latent window (the last positions, which carry
        the predictions), and `position_encoding_type="rotary"`:

        prefix_dropout (`float`, *optional*, defaults to 0.0):
            In training, the fraction of the prefix positions (the context before the latents) that each sample drops
            from the cross-attention, chosen at random per sample (the paper's regularisation and training speed-up).
            Evaluation and generation see the whole prefix.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary position embeddings' frequencies (`position_encoding_type="rotary"`).

    Labels (`num_labels`, `id2label`, `label2id`, `problem_type`) work as in every transformers config.

    Example:

    ```python
    >>> from perceiver_lite import PerceiverLiteConfig, PerceiverLiteModel

    >>> config = PerceiverLiteConfig(data_shape=[3, 32, 32], num_latent_tokens=64, dim=128, heads=4,
    ...                              layers_indice=[0, 1, 1], num_latent_transformers_in_layers=[2, 2], resolution=32)
    >>> model = PerceiverLiteModel(config)
    ```
    """

    model_type = "perceiver_lite"
    attribute_map = {"hidden_size": "dim", "num_attention_heads": "heads"}

    data_shape: list[int] | tuple[int, ...] = (1, 224, 224)
    cross_heads: int = 4
    num_latent_tokens: int = 1024
    dim: int = 512
    heads: int = 16
    layers_indice: list[int] | tuple[int, ...] = (0, 1, 1, 1, 1, 1, 1, 1)
    num_latent_transformers_in_layers: list[int] | tuple[int, ...] = (6, 6)
    num_bands: int = 64
    resolution: int | list[int] | tuple[int, ...] = 224
    frequency_base: float | int | None = 2
    pre_norm: bool = True
    ff_dim: int | None = None
    ff_dim_scale: int | float = 4
    ff_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    cross_kv_dim: int | None = None
    head_dim: int | None = None
    vocab_size: int = 262
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float | None = None
    use_fast_paths: bool = True
    cross_attend_blocks: list[int] | tuple[int, ...] | None = None
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_qk_channels: int | None = None
    cross_v_channels: int | None = None
    cross_ff_dim: int | None = None
    cross_attention_query_residual: bool = True
    input_projection_dim: int | None = None
    position_encoding_type: str = "fourier"
    position_dim: int | None = None
    concat_positions: bool = True
    decoder_dim: int | None = None
    decoder_heads: int = 1
    decoder_qk_channels: int | None = None
    decoder_v_channels: int | None = None
    decoder_ff_dim_scale: int | float = 1
    decoder_query_residual: bool = True
    decoder_query_type: str = "fourier"
    decoder_query_inputs: bool = False
    classifier_pooling: str = "mean"
    tie_word_embeddings: bool = True
    gated_feed_forward: bool = True
    latent_initializer_range: float | None = 0.25
    sparse_prediction: bool = False
    prefix_dropout: float | int = 0.0
    rope_theta: float | int = 10000.0

    def __post_init__(self, **kwargs):
        self._warn_unknown_keywords(kwargs)
        for name in ("data_shape", "layers_indice", "num_latent_transformers_in_layers"):
            setattr(self, name, list(getattr(self, name)))
        if self.cross_attend_blocks is not None:
            self.cross_attend_blocks = list(self.cross_attend_blocks)
        if not isinstance(self.resolution, int):
            self.resolution = list(self.resolution)
        super().__post_init__(**kwargs)
        if self.initializer_range is None and isinstance(self.dim, int) and self.dim > 0:  # else `_validate` fails
            self.initializer_range = (3 * self.dim) ** -0.5
        self._validate()
        if self.cross_kv_dim is None:
            self.cross_kv_dim = self.expected_cross_kv_dim

    def _warn_unknown_keywords(self, kwargs: dict):
        """Warn about each keyword that is neither a field, an alias (`attribute_map`) nor one of transformers' own
        keys, naming the closest field: `PerceiverLiteConfig(dmi=64)` is a typo of `dim`. transformers keeps unknown
        keywords as attributes that nothing reads, so without the warning the typo would silently build a model of
        the default width. A warning, not an error, because a `config.json` with extra keys (written by another
        version, or by a user) must still load. `warnings.warn` rather than `logger.warning`: it points at the
        caller's line, shows once per line and typo, and `python -W error` or pytest's `filterwarnings` turn it into
        an error for whoever wants configs checked strictly."""
        fields = [field.name for field in dataclasses.fields(self) if not field.name.startswith("_")]
        generation = GenerationConfig._get_default_generation_params()  # dropped by transformers, as from any config
        known = {*fields, *self.attribute_map, *TRANSFORMERS_KEYWORDS, *generation}
        for name in kwargs:
            if name in known:
                continue
            close = difflib.get_close_matches(name, [*fields, *self.attribute_map], n=1)
            hint = f"did you mean `{close[0]}`?" if close else "the fields are listed in PerceiverLiteConfig's docstring"
            source = f" from {_config_source(kwargs['name_or_path'])}" if kwargs.get("name_or_path") else ""
            warnings.warn(
                f"PerceiverLiteConfig got an unknown keyword `{name}` ({name}={kwargs[name]!r}){source}, which no part "
                f"of the model reads; {hint}",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))  # for `from_dict`'s errors, as Auto does
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As transformers does, but a config of another model type, or with invalid fields, raises a `ValueError`
        naming the problem and the file it came from (`name_or_path`, from `from_pretrained` or an Auto class)."""
        source = _config_source(kwargs.get("name_or_path"))
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{source} describes a `{model_type}` model, not `{cls.model_type}` (PerceiverLite)")
        try:
            return super().from_dict(config_dict, **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source} is not a valid PerceiverLite config: {error}") from error

    @property
    def num_axes(self) -> int:
        """Number of spatial axes of the inputs (`len(data_shape) - 1`)."""
        return len(self.data_shape) - 1

    @property
    def num_position_features(self) -> int:
        """Fourier position channels of one position: `axes * (2 * num_bands + 1)`."""
        return self.num_axes * (2 * self.num_bands + 1)

    @property
    def data_width(self) -> int:
        """Data channels of one input element as the cross-attention sees them: `input_projection_dim` or `C`."""
        return self.input_projection_dim or self.data_shape[0]

    @property
    def position_width(self) -> int:
        """Position channels of one input element: the Fourier features' or the learned embeddings' width."""
        if self.position_encoding_type == "fourier":
            return self.num_position_features
        if self.position_encoding_type == "rotary":  # positions rotate the queries and keys: no channels
            return 0
        return self.position_dim or self.data_width

    @property
    def expected_cross_kv_dim(self) -> int:
        return self.data_width + self.position_width if self.concat_positions else self.data_width

    @property
    def num_positions(self) -> int:
        """Positions of the nominal grid `data_shape[1:]`: the rows of the learned position embeddings and queries."""
        return math.prod(self.data_shape[1:])

    @property
    def decoder_width(self) -> int:
        return self.decoder_dim or self.dim

    def cross_attends(self, block: int) -> bool:
        """Whether unique block `block` begins with a cross-attend to the inputs."""
        return self.cross_attend_blocks is None or block in self.cross_attend_blocks

    def attention_channels(self, kind: str) -> tuple[int, int, int]:
        """`(num_heads, qk_channels, v_channels)` of the `"self"`, `"cross"` or `"decoder"` attention."""
        if kind == "decoder":
            qk_channels = self.decoder_qk_channels or self.decoder_width
            return self.decoder_heads, qk_channels, self.decoder_v_channels or qk_channels
        heads, qk_channels, v_channels = {
            "self": (self.heads, self.qk_channels, self.v_channels),
            "cross": (self.cross_heads, self.cross_qk_channels, self.cross_v_channels),
        }[kind]
        qk_channels = qk_channels or (heads * self.head_dim if self.head_dim else self.dim)
        return heads, qk_channels, v_channels or qk_channels

    @property
    def resolutions(self) -> list[int]:
        """The Fourier resolution of each spatial axis."""
        return [self.resolution] * self.num_axes if isinstance(self.resolution, int) else list(self.resolution)

    def _validate(self):
        def fail(field, reason):
            raise ValueError(f"PerceiverLiteConfig: `{field}` {reason}")

        sizes = ["cross_heads", "num_latent_tokens", "dim", "heads", "num_bands", "vocab_size", "decoder_heads"]
        optional_sizes = ["ff_dim", "head_dim", "cross_kv_dim", "qk_channels", "v_channels", "cross_qk_channels",
                          "cross_v_channels", "cross_ff_dim", "input_projection_dim", "position_dim", "decoder_dim",
                          "decoder_qk_channels", "decoder_v_channels"]  # fmt: skip
        sizes += [name for name in optional_sizes if getattr(self, name) is not None]
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        scale = self.ff_dim_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            fail("ff_dim_scale", f"must be a positive number, got {scale!r}")
        if len(self.data_shape) < 2 or any(not isinstance(n, int) or n <= 0 for n in self.data_shape):
            fail("data_shape", f"must be [C, *axes] with at least one axis and positive sizes, got {self.data_shape}")
        for name in ("ff_dropout", "attention_dropout", "prefix_dropout"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        scale = self.decoder_ff_dim_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            fail("decoder_ff_dim_scale", f"must be a number >= 0 (0: no feed-forward), got {scale!r}")
        if not self.layer_norm_eps > 0:
            fail("layer_norm_eps", f"must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range >= 0:
            fail("initializer_range", f"must be >= 0, got {self.initializer_range!r}")
        if self.latent_initializer_range is not None and not self.latent_initializer_range >= 0:
            fail("latent_initializer_range", f"must be >= 0 or None, got {self.latent_initializer_range!r}")
        self._validate_blocks(fail)
        self._validate_positions(fail)
        self._validate_attention(fail)
        if self.cross_kv_dim is not None and self.cross_kv_dim != self.expected_cross_kv_dim:
            fail(
                "cross_kv_dim",
                f"({self.cross_kv_dim}) disagrees with the inputs: data channels {self.data_width} (data_shape "
                f"{self.data_shape}, input_projection_dim {self.input_projection_dim}) "
                f"{'+' if self.concat_positions else 'added to'} position channels {self.position_width} "
                f"({self.position_encoding_type}) = {self.expected_cross_kv_dim}",
            )

    def _validate_blocks(self, fail):
        counts = self.num_latent_transformers_in_layers
        if not counts or any(not isinstance(n, int) or n < 0 for n in counts):
            fail("num_latent_transformers_in_layers", f"must be a non-empty list of counts >= 0, got {counts}")
        if not self.layers_indice:
            fail("layers_indice", "must name at least one block, got []")
        unknown = sorted({i for i in self.layers_indice if not isinstance(i, int) or not 0 <= i < len(counts)})
        if unknown:
            fail(
                "layers_indice",
                f"names blocks {unknown} that num_latent_transformers_in_layers (length {len(counts)}) does not "
                f"define: valid blocks are 0..{len(counts) - 1}",
            )
        blocks = self.cross_attend_blocks
        if blocks is not None and (not blocks or len(set(blocks)) != len(blocks) or any(
                not isinstance(i, int) or not 0 <= i < len(counts) for i in blocks)):  # fmt: skip
            fail("cross_attend_blocks", f"must list distinct blocks of 0..{len(counts) - 1}, at least one, got {blocks}")
        unused = sorted(set(range(len(counts))) - set(self.layers_indice))
        if unused:
            fail(
                "layers_indice",
                f"{self.layers_indice} leaves blocks {unused} of num_latent_transformers_in_layers unused",
            )

    def _validate_attention(self, fail):
        for kind, heads_field in (("self", "heads"), ("cross", "cross_heads"), ("decoder", "decoder_heads")):
            heads, qk_channels, v_channels = self.attention_channels(kind)
            prefix = "" if kind == "self" else f"{kind}_"
            for field, channels in ((f"{prefix}qk_channels", qk_channels), (f"{prefix}v_channels", v_channels)):
                if channels % heads and getattr(self, field) is not None:
                    fail(field, f"({channels}) must be divisible by `{heads_field}` ({heads})")
                if channels % heads:  # derived from the query width
                    source = "decoder_dim" if kind == "decoder" else "dim"
                    fail(source, f"({channels}) must be divisible by `{heads_field}` ({heads}) when `head_dim` and "
                         f"`{field}` are None")  # fmt: skip
        for field, allowed in (("position_encoding_type", ("fourier", "learned", "rotary")),
                               ("decoder_query_type", ("fourier", "learned")),
                               ("classifier_pooling", ("mean", "decoder"))):  # fmt: skip
            if getattr(self, field) not in allowed:
                fail(field, f"must be one of {list(allowed)}, got {getattr(self, field)!r}")

    def _validate_positions(self, fail):
        if not self.rope_theta > 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if self.position_encoding_type == "rotary":
            for kind, field in (("self", "qk_channels"), ("cross", "cross_qk_channels")):
                heads, qk_channels, _ = self.attention_channels(kind)
                if qk_channels // heads % 2:
                    fail(field, f"gives odd query/key heads ({qk_channels} // {heads}); rotary positions rotate "
                         "pairs of channels: use an even width per head")  # fmt: skip
        if self.position_dim is not None and self.position_encoding_type != "learned":
            fail("position_dim", f"is the width of learned positions; position_encoding_type is "
                 f"{self.position_encoding_type!r}")  # fmt: skip
        if not self.concat_positions and self.position_width != self.data_width:
            fail("concat_positions", f"False adds the positions to the data channels, but their widths differ: "
                 f"{self.position_width} position channels ({self.position_encoding_type}), {self.data_width} data "
                 "channels")  # fmt: skip
        resolutions = self.resolutions
        if len(resolutions) != self.num_axes:
            fail("resolution", f"needs one value per spatial axis ({self.num_axes}), got {self.resolution}")
        if any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in resolutions):
            fail("resolution", f"must be positive integers, got {self.resolution}")
        if self.frequency_base is not None and not 0 < self.frequency_base <= min(resolutions) / 2:
            fail(
                "frequency_base",
                f"must be in (0, resolution / 2 = {min(resolutions) / 2}] (the highest band), got {self.frequency_base}",
            )


def _caller_stacklevel() -> int:
    """The `stacklevel` of `warnings.warn`, called from the caller of this function, that points at the first frame
    outside this file, transformers and the dataclass-generated `__init__`: the user's line."""
    internal = (os.path.dirname(transformers.__file__), os.path.dirname(dataclasses.__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename in (__file__, "<string>") or frame.f_code.co_filename.startswith(internal)
    ):
        frame, level = frame.f_back, level + 1
    return level


def _config_source(name_or_path) -> str:
    """Where a config came from, for error messages: its `config.json`, or "The config" for a plain dict."""
    if not name_or_path:
        return "The config"
    if os.path.isdir(name_or_path):
        return f"`{os.path.join(name_or_path, 'config.json')}`"
    return f"`{name_or_path}`" if os.path.isfile(name_or_path) else f"The `config.json` of `{name_or_path}`"


__all__ = ["PerceiverLiteConfig"]
