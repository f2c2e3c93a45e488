"""Shared test setup: offline Hub, seeded torch, and a tiny model tester in the spirit of transformers' `ModelTester`s.

Other test files use it either as `from conftest import PerceiverLiteModelTester` or through the fixtures below. The
tester builds every model class of the package (`kind`: the base model or a head, see `MODELS`) with its inputs.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

os.environ["HF_HUB_OFFLINE"] = "1"  # the Hub is unreachable; fail fast instead of retrying

import pytest
import torch

from transformers import TrainingArguments

from perceiver_lite import (
    PerceiverLiteConfig,
    PerceiverLiteForAudioClassification,
    PerceiverLiteForDensePrediction,
    PerceiverLiteForImageClassification,
    PerceiverLiteForMaskedLM,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteForTokenClassification,
    PerceiverLiteModel,
)
from perceiver_lite.modeling_perceiver_lite import PerceiverLiteAttention


SEED = 0
torch.manual_seed(SEED)
ATOL = 1e-5  # absolute tolerance between two float32 routes of one computation
NUM_LABELS = 3
VOCAB_SIZE = 262  # the config's default: transformers' byte-level PerceiverTokenizer


class ModelKind(NamedTuple):
    model_class: type
    auto_class: str
    data_shape: tuple  # of the tiny config: 1-D for tokens and signals
    input_name: str  # of the main input
    config_fields: dict  # what the class needs beyond the tester's defaults
    pipeline_tag: str


# kind: the model class and how the tester builds it
MODELS = {
    "base": ModelKind(PerceiverLiteModel, "AutoModel", (3, 8, 8), "inputs", {}, "feature-extraction"),
    "image": ModelKind(PerceiverLiteForImageClassification, "AutoModelForImageClassification", (3, 8, 8),
                       "pixel_values", {}, "image-classification"),
    "text": ModelKind(PerceiverLiteForSequenceClassification, "AutoModelForSequenceClassification", (16, 12),
                      "input_ids", {}, "text-classification"),
    "audio": ModelKind(PerceiverLiteForAudioClassification, "AutoModelForAudioClassification", (1, 16),
                       "input_values", {}, "audio-classification"),
    "mlm": ModelKind(PerceiverLiteForMaskedLM, "AutoModelForMaskedLM", (16, 12), "input_ids", {"decoder_dim": 16},
                     "fill-mask"),
    "token": ModelKind(PerceiverLiteForTokenClassification, "AutoModelForTokenClassification", (16, 12), "input_ids",
                       {}, "token-classification"),
    "dense": ModelKind(PerceiverLiteForDensePrediction, "AutoModelForSemanticSegmentation", (3, 8, 8), "pixel_values",
                       {}, "image-segmentation"),
}  # fmt: skip
PER_ELEMENT = ("mlm", "token", "dense")  # the Perceiver IO heads: one output per input element


class PerceiverLiteModelTester:
    """A tiny PerceiverLite: width 32, two unique blocks (block 1 runs twice, sharing its weights), batch 3.

    `kind` picks the model class (a key of `MODELS`; the base model by default) and the default `data_shape`, whose
    length picks the number of spatial axes: `[C, T]`, `[C, H, W]` or `[C, T, H, W]`.
    """

    def __init__(
        self,
        kind="base",
        batch_size=3,
        data_shape=None,
        num_latent_tokens=8,
        dim=32,
        heads=4,
        cross_heads=2,
        layers_indice=(0, 1, 1),
        num_latent_transformers_in_layers=(1, 2),
        num_bands=4,
        resolution=8,
        frequency_base=None,
        num_labels=NUM_LABELS,
        **config_kwargs,
    ):
        self.kind = kind
        self.batch_size = batch_size
        self.data_shape = list(data_shape or MODELS[kind].data_shape)
        self.num_latent_tokens = num_latent_tokens
        self.dim = dim
        self.heads = heads
        self.cross_heads = cross_heads
        self.layers_indice = list(layers_indice)
        self.num_latent_transformers_in_layers = list(num_latent_transformers_in_layers)
        self.num_bands = num_bands
        self.resolution = resolution
        self.frequency_base = frequency_base
        self.num_labels = num_labels
        self.config_kwargs = {**MODELS[kind].config_fields, **config_kwargs}

    @property
    def num_axes(self) -> int:
        return len(self.data_shape) - 1

    @property
    def num_self_attention_layers(self) -> int:
        """Latent self-attention layers run by one forward pass (a block run twice counts twice)."""
        return sum(self.num_latent_transformers_in_layers[i] for i in self.layers_indice)

    @property
    def num_cross_attentions(self) -> int:
        return len(self.layers_indice)

    def get_config(self, **overrides) -> PerceiverLiteConfig:
        kwargs = dict(
            data_shape=self.data_shape,
            num_latent_tokens=self.num_latent_tokens,
            dim=self.dim,
            heads=self.heads,
            cross_heads=self.cross_heads,
            layers_indice=self.layers_indice,
            num_latent_transformers_in_layers=self.num_latent_transformers_in_layers,
            num_bands=self.num_bands,
            resolution=self.resolution,
            frequency_base=self.frequency_base,
            num_labels=self.num_labels,
            # weights and latents at 0.02: the scale the tolerances (bfloat16 autocast above all) are set for; the
            # config's width-dependent defaults have their own tests
            initializer_range=0.02,
            latent_initializer_range=None,
            # the plain feed-forward, `fc1` / activation / `fc2`, that the hand computations write out; the gated
            # default and its fast paths have their own tests (`gated_feed_forward=True`)
            gated_feed_forward=False,
        )
        return PerceiverLiteConfig(**{**kwargs, **self.config_kwargs, **overrides})

    def prepare_inputs(self, spatial_shape=None, batch_size=None) -> torch.Tensor:
        """Random channel-first inputs `(B, C, *axes)`; `spatial_shape` defaults to `data_shape`'s axes."""
        spatial_shape = self.data_shape[1:] if spatial_shape is None else list(spatial_shape)
        return torch.randn(batch_size or self.batch_size, self.data_shape[0], *spatial_shape)

    def prepare_config_and_inputs(self):
        """`(config, inputs, labels)`: inputs `(B, C, *axes)`, integer class labels `(B,)`."""
        config = self.get_config()
        inputs = self.prepare_inputs()
        labels = torch.randint(0, self.num_labels, (self.batch_size,))
        return config, inputs, labels

    def prepare_config_and_inputs_for_common(self):
        config, inputs, _ = self.prepare_config_and_inputs()
        return config, {"inputs": inputs}

    @property
    def model_class(self) -> type:
        return MODELS[self.kind].model_class

    def create_model(self, config=None, attn_implementation="sdpa", state_dict=None, **overrides):
        """The model of `kind` in eval mode, from `config` (a copy) or `get_config(**overrides)`. A Perceiver IO
        classifier gets weights of unit scale (at `initializer_range` its logits are ~0.01 and every absolute
        tolerance would pass); `state_dict` replaces all weights."""
        config = copy.deepcopy(config if config is not None else self.get_config(**overrides))
        model = self.model_class._from_config(config, attn_implementation=attn_implementation)
        if self.kind in ("token", "dense"):
            with torch.no_grad():
                model.classifier.weight.normal_(0.0, 1.0)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.eval()

    def prepare_main_input(self, batch_size=None, spatial_shape=None) -> torch.Tensor:
        """The model's main input (`MODELS[kind].input_name`): token ids `(B, T)`, signals `(B, T)` (one channel) or
        channel-first floats `(B, C, *axes)`; `spatial_shape` defaults to `data_shape`'s axes."""
        batch_size = batch_size or self.batch_size
        spatial_shape = self.data_shape[1:] if spatial_shape is None else list(spatial_shape)
        if MODELS[self.kind].input_name == "input_ids":
            return torch.randint(0, VOCAB_SIZE, (batch_size, *spatial_shape))
        if self.kind == "audio" and self.data_shape[0] == 1:
            return torch.randn(batch_size, *spatial_shape)
        return self.prepare_inputs(spatial_shape, batch_size)

    def prepare_labelled_inputs(self, batch_size=None) -> dict:
        """A Perceiver IO head's inputs with a padding mask (sample 1 padded) and per-element labels: class ids on a
        6 x 7 grid for the dense head; for the token heads, 10 tokens labelled but for about half of them and the
        padding (-100)."""
        batch_size = batch_size or self.batch_size
        if self.kind == "dense":
            mask = torch.ones(batch_size, 6, 7, dtype=torch.long)
            mask[1, 4:] = 0
            mask[1, :, 5:] = 0
            pixel_values = self.prepare_inputs((6, 7), batch_size)
            labels = torch.randint(0, self.num_labels, (batch_size, 6, 7))
            return {"pixel_values": pixel_values, "attention_mask": mask, "labels": labels}
        input_ids = self.prepare_main_input(batch_size, (10,))
        mask = length_mask([10, 6, 9][:batch_size] + [10] * max(0, batch_size - 3), 10)
        labels = torch.randint(0, VOCAB_SIZE if self.kind == "mlm" else self.num_labels, (batch_size, 10))
        labels[torch.rand(batch_size, 10) < 0.5] = -100
        labels[mask == 0] = -100
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(autouse=True)
def seed_torch():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(SEED)


@pytest.fixture
def model_tester():
    return PerceiverLiteModelTester()


@pytest.fixture(params=[(2, 12), (3, 8, 8), (2, 4, 6, 6)], ids=["1d", "2d", "3d"])
def model_tester_nd(request):
    """The tiny model for 1-D, 2-D and 3-D inputs."""
    return PerceiverLiteModelTester(data_shape=request.param)


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    """Quiet, CPU-only, checkpoint-free `TrainingArguments` for the tests' tiny Trainer runs."""
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def count_reference_attention(monkeypatch) -> list:
    """Calls of the reference `PerceiverLiteAttention.forward` from now on (the fast paths never call it). Patched on
    the class, not hooked on the modules: a hook would itself make `fast_plan` step aside."""
    calls, forward = [], PerceiverLiteAttention.forward
    monkeypatch.setattr(PerceiverLiteAttention, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def tiny_config(kind: str, **overrides) -> PerceiverLiteConfig:
    """The tester's config for the model of `kind` (`data_shape` among the overrides)."""
    return PerceiverLiteModelTester(kind).get_config(**overrides)


def make_head(kind: str, config=None, attn_implementation="sdpa", state_dict=None, **overrides):
    """`PerceiverLiteModelTester(kind).create_model(...)`: the tiny model of `kind` in eval mode."""
    return PerceiverLiteModelTester(kind).create_model(config, attn_implementation, state_dict, **overrides)


def labelled_inputs(kind: str, batch_size: int = 3) -> dict:
    """`PerceiverLiteModelTester(kind).prepare_labelled_inputs(batch_size)`."""
    return PerceiverLiteModelTester(kind).prepare_labelled_inputs(batch_size)


def token_ids(batch_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch_size, length))


def length_mask(lengths, max_length: int) -> torch.Tensor:
    """`(B, max_length)`, 1 for the first `lengths[i]` elements of sample `i`."""
    return (torch.arange(max_length) < torch.as_tensor(lengths)[:, None]).long()


def logits_loss_and_gradients(model, inputs: dict):
    """`(logits, loss, {name: gradient})` of one forward and backward of the loss."""
    model.zero_grad()
    outputs = model(**inputs)
    outputs.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.logits.detach(), outputs.loss.detach(), gradients


def assert_same_logits_loss_and_gradients(first, second, atol=ATOL, rtol=1e-4):
    """Two `logits_loss_and_gradients` agree: logits and loss within `atol`, every gradient within `rtol` / `atol`."""
    (logits1, loss1, grads1), (logits2, loss2, grads2) = first, second
    torch.testing.assert_close(logits1, logits2, rtol=0, atol=atol)
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=atol)
    assert grads1.keys() == grads2.keys() and len(grads1) > 0
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=rtol, atol=atol, msg=name)


def load_without_package(cases: list[dict], workdir: Path) -> dict:
    """Runs `remote_code_loader.py` on `cases` in a Python that cannot import `perceiver_lite` (`python -I`, from
    `workdir`, offline, with a fresh modules cache) and returns its report (see that file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    report_path = workdir / "report.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"), OMP_NUM_THREADS="1")
    loader = Path(__file__).parent / "remote_code_loader.py"
    command = [sys.executable, "-I", str(loader), json.dumps(cases), str(report_path)]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(report_path.read_text())
