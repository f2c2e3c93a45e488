"""Shared test setup: offline Hub, seeded torch, and a tiny model tester in the spirit of transformers' `ModelTester`s.

Other test files use it either as `from conftest import PerceiverLiteModelTester` or through the fixtures below.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the Hub is unreachable; fail fast instead of retrying

import pytest
import torch

from transformers import TrainingArguments

from perceiver_lite import PerceiverLiteConfig
from perceiver_lite.modeling_perceiver_lite import PerceiverLiteAttention


SEED = 0
torch.manual_seed(SEED)


class PerceiverLiteModelTester:
    """A tiny PerceiverLite: width 32, two unique blocks (block 1 runs twice, sharing its weights), batch 3.

    `data_shape` picks the number of spatial axes: `[C, T]`, `[C, H, W]` or `[C, T, H, W]`.
    """

    def __init__(
        self,
        batch_size=3,
        data_shape=(3, 8, 8),
        num_latent_tokens=8,
        dim=32,
        heads=4,
        cross_heads=2,
        layers_indice=(0, 1, 1),
        num_latent_transformers_in_layers=(1, 2),
        num_bands=4,
        resolution=8,
        frequency_base=None,
        num_labels=3,
        **config_kwargs,
    ):
        self.batch_size = batch_size
        self.data_shape = list(data_shape)
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
        self.config_kwargs = config_kwargs

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
