"""Side-by-side benchmark of PerceiverLite against transformers' Perceiver and perceiver-pytorch.

    python scripts/benchmark.py                 # full run on the CPU, a few minutes
    python scripts/benchmark.py --quick         # smoke test: tiny sizes, seconds
    python scripts/benchmark.py --device cuda   # the same comparison on a GPU
    python scripts/benchmark.py --device cuda --scenarios A --image-size 224 --batch-size 32   # a larger model input

Every model gets the same inputs and labels and a matched size: the same latents, widths, depths, heads and Fourier
bands, and feed-forward layers of the same size (perceiver-pytorch's fixed GEGLU with factor 4 equals a plain
feed-forward of width 6 x dim, so ours and transformers' use 6 x dim); parameter counts are printed. Measurements are
interleaved across models and the minimum over repeats is kept, which filters out noise from other processes; the
short measurements (inference, and the matmul products that give this machine's rate) get four times the rounds.

- Scenario A: one cross-attend then 6 latent self-attention layers, in float32 and under bfloat16 autocast: inference
  and training-step (forward, backward, AdamW step) throughput, the peak memory of a training step and the achieved
  GFLOP/s as a fraction of this machine's matmul rate for that dtype, measured in the same run.
- Scenario B: the paper's repeated cross-attention (`layers_indice=[0, 1, 1, 1]`) against perceiver-pytorch with
  `weight_tie_layers=True` at the same depth: training-step throughput and peak memory.
- Scenario C: the float32 training step at 4.1k, 16.4k and 65.7k input elements, time and peak memory, with the fitted
  exponent of their growth (log-log least squares).
- Scenario D: byte-level masked language modelling (Perceiver IO: a decoder query per token), ours
  (`PerceiverLiteForMaskedLM` in transformers' layout: learned positions added to the token embedding, one
  cross-attend, learned position queries) against transformers' `PerceiverForMaskedLM` and perceiver-pytorch's
  `PerceiverLM` at the same widths, in float32 and bfloat16: inference and training-step throughput, peak memory.
  "ours (sparse prediction)" is the same model with `sparse_prediction=True`: its training step decodes only the
  masked tokens (the same loss), its inference every token, as "ours".
- Scenario E: byte-level causal language modelling at long context (Perceiver AR: the last `num_latents` positions
  are the latents, one causal cross-attend from them to the whole context, causal self-attention over them), ours
  (`PerceiverLiteForCausalLM`) against transformers' `GPT2LMHeadModel` (full causal attention over every position,
  `attn_implementation="sdpa"`, the same width and number of self-attention layers, built from its config) and
  perceiver-ar-pytorch's `PerceiverAR` at the same widths, no dropout: training-step throughput (each model's own
  loss: GPT-2 predicts every position, the Perceiver ARs the latent positions), generation throughput (greedy
  continuation of a `seq_len - new_tokens` prompt by `new_tokens` tokens, the prompt's forward pass included:
  transformers' `generate` with its key/value cache for ours and GPT-2, perceiver-ar-pytorch's own `generate`, which
  has no cache and runs a full forward pass per token) and peak training memory. "ours (sliding cache)" is the same
  model generating with `PerceiverLiteSlidingCausalLMCache` (opt-in, approximate: each step runs the new token alone;
  see its docstring); it trains as "ours".

Peak memory is the rise above the pre-step baseline. On a GPU that is `torch.cuda.max_memory_allocated` minus the
allocated memory before the step. On the CPU torch keeps no allocator statistics, so each model is measured in a fresh
child process whose allocator returns every large block to the OS on free (`MALLOC_MMAP_THRESHOLD_`, so the resident
set follows live memory): after a warm-up step (optimizer state allocated, gradients freed) and `malloc_trim(0)` (the
heap's free pages returned, so that small blocks of the step count too) the kernel's resident-set high-water mark is
reset through `/proc/self/clear_refs` and read back from `/proc/self/status` after one more step.

Times depend on the C allocator as well as the kernels. glibc serves a block above its mmap threshold (at most 32 MiB)
with a fresh mapping whose pages fault in on first touch, each step again: a float32 `[8, 4096, 256]` tensor (32 MiB)
or attention matrix costs more than its compute. `--heap-allocations` raises the threshold in the timing process
(`mallopt`, as jemalloc or tcmalloc would serve such blocks) so the times show the models' compute alone; memory is
still measured in the child processes.

FLOPs are counted with `torch.utils.flop_counter` on the path each model really runs (forward for inference, forward
and backward for training; the optimizer is not counted).

Results are printed and written as JSON and markdown (`benchmarks/benchmark-<device>.{json,md}` by default).
"""

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import math
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count


NUM_LABELS = 10
PEERS = ("transformers", "perceiver-pytorch", "GPT-2", "perceiver-ar-pytorch")
DTYPES = ["float32", "bfloat16"]  # `--dtypes` narrows them


@dataclasses.dataclass(frozen=True)
class Setup:
    """One model size: an image classifier over `image_size`^2 x `channels` inputs."""

    image_size: int = 64
    channels: int = 3
    batch_size: int = 8
    num_latents: int = 256
    dim: int = 256
    num_bands: int = 64
    self_attends: int = 6
    latent_heads: int = 8
    cross_attends: int = 1  # > 1: the paper's repeated cross-attention, block 1 shared by every repeat
    ff_scale: int = 6  # plain feed-forward width / dim; 6 matches perceiver-pytorch's GEGLU with factor 4

    @property
    def num_elements(self) -> int:
        return self.image_size**2 * self.channels

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.randn((self.batch_size, self.channels, self.image_size, self.image_size), generator=generator)
        return inputs, torch.randint(0, NUM_LABELS, (self.batch_size,), generator=generator)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


@dataclasses.dataclass(frozen=True)
class MaskedLMSetup:
    """A byte-level masked language model over `seq_len` tokens, `mask_fraction` of them masked and scored.

    The widths follow transformers' `PerceiverForMaskedLM`, whose decoder has 8 heads of 32 query/key channels and
    values of the embedding width; the feed-forward widths are `ff_scale` x their input, as in scenario A."""

    seq_len: int = 512
    batch_size: int = 8
    vocab_size: int = 262
    d_model: int = 256  # the token embedding's width: the cross-attention's inputs and the decoder's queries
    num_latents: int = 128
    dim: int = 256
    self_attends: int = 6
    heads: int = 8
    qk_channels: int = 256  # 8 heads x 32
    ff_scale: int = 6
    mask_fraction: float = 0.15

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=generator)
        masked = torch.rand((self.batch_size, self.seq_len), generator=generator) < self.mask_fraction
        return inputs, torch.where(masked, inputs, -100)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


@dataclasses.dataclass(frozen=True)
class CausalLMSetup:
    """A byte-level causal language model over `seq_len` tokens whose last `num_latents` positions are the latents;
    generation continues the first `seq_len - new_tokens` tokens by `new_tokens`, so the context ends at `seq_len`."""

    seq_len: int = 2048
    batch_size: int = 2
    vocab_size: int = 262
    num_latents: int = 256
    dim: int = 256
    self_attends: int = 6
    heads: int = 8
    ff_scale: int = 4  # GPT-2's and perceiver-ar-pytorch's feed-forward width / dim
    new_tokens: int = 16

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=generator)
        return inputs, inputs  # the labels are the inputs: position t predicts token t + 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over the positions the logits cover, the last `logits.shape[1]` ones."""
        targets = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())


# ---------------------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------------------


def build_ours(setup: Setup, attn_implementation="sdpa", gradient_checkpointing=False):
    from perceiver_lite import PerceiverLiteConfig, PerceiverLiteForImageClassification

    config = PerceiverLiteConfig(
        data_shape=[setup.channels, setup.image_size, setup.image_size],
        num_latent_tokens=setup.num_latents,
        dim=setup.dim,
        heads=setup.latent_heads,
        cross_heads=1,
        layers_indice=[0] + [1] * (setup.cross_attends - 1),
        num_latent_transformers_in_layers=[setup.self_attends] * min(setup.cross_attends, 2),
        num_bands=setup.num_bands,
        resolution=224,
        frequency_base=None,
        ff_dim_scale=setup.ff_scale,
        gated_feed_forward=False,  # the plain feed-forward of the published runs
        num_labels=NUM_LABELS,
    )
    model = PerceiverLiteForImageClassification(config)
    model.set_attn_implementation(attn_implementation)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, lambda inputs: model(inputs).logits


def build_transformers(setup: Setup):
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier

    if setup.cross_attends != 1:
        raise ValueError("transformers' Perceiver has a single cross-attend")
    config = PerceiverConfig(
        num_latents=setup.num_latents,
        d_latents=setup.dim,
        d_model=setup.channels + 2 * (2 * setup.num_bands + 1),
        num_blocks=1,
        num_self_attends_per_block=setup.self_attends,
        num_self_attention_heads=setup.latent_heads,
        num_cross_attention_heads=1,
        self_attention_widening_factor=setup.ff_scale,
        cross_attention_widening_factor=setup.ff_scale,
        attention_probs_dropout_prob=0.0,
        image_size=setup.image_size,
        num_labels=NUM_LABELS,
    )
    model = PerceiverForImageClassificationFourier(config)
    return model, lambda inputs: model(inputs=inputs).logits


def build_perceiver_pytorch(setup: Setup):
    from perceiver_pytorch import Perceiver

    model = Perceiver(
        num_freq_bands=setup.num_bands,
        depth=setup.cross_attends,
        max_freq=224,
        input_channels=setup.channels,
        input_axis=2,
        num_latents=setup.num_latents,
        latent_dim=setup.dim,
        cross_heads=1,
        latent_heads=setup.latent_heads,
        cross_dim_head=setup.dim,
        latent_dim_head=setup.dim // setup.latent_heads,
        num_classes=NUM_LABELS,
        weight_tie_layers=setup.cross_attends > 1,
        self_per_cross_attn=setup.self_attends,
    )
    return model, lambda inputs: model(inputs.permute(0, 2, 3, 1))  # channel-last (B, H, W, C), a view


def build_ours_masked_lm(setup: MaskedLMSetup):
    from perceiver_lite import PerceiverLiteConfig, PerceiverLiteForMaskedLM

    widths = dict(qk_channels=setup.qk_channels, v_channels=setup.dim)
    config = PerceiverLiteConfig(
        data_shape=[setup.d_model, setup.seq_len],
        num_latent_tokens=setup.num_latents,
        dim=setup.dim,
        heads=setup.heads,
        cross_heads=setup.heads,
        layers_indice=[0, 1],
        num_latent_transformers_in_layers=[0, setup.self_attends],
        cross_attend_blocks=[0],
        **widths,
        cross_qk_channels=setup.qk_channels,
        cross_v_channels=setup.dim,
        ff_dim_scale=setup.ff_scale,
        gated_feed_forward=False,  # the plain feed-forward of the published runs
        position_encoding_type="learned",
        concat_positions=False,
        decoder_dim=setup.d_model,
        decoder_heads=setup.heads,
        decoder_qk_channels=setup.qk_channels,
        decoder_v_channels=setup.d_model,
        decoder_query_residual=False,
        decoder_query_type="learned",
        vocab_size=setup.vocab_size,
    )
    model = PerceiverLiteForMaskedLM(config)
    return model, lambda inputs: model(inputs).logits


def build_transformers_masked_lm(setup: MaskedLMSetup):
    from transformers import PerceiverConfig, PerceiverForMaskedLM

    config = PerceiverConfig(
        num_latents=setup.num_latents,
        d_latents=setup.dim,
        d_model=setup.d_model,
        num_blocks=1,
        num_self_attends_per_block=setup.self_attends,
        num_self_attention_heads=setup.heads,
        num_cross_attention_heads=setup.heads,
        qk_channels=setup.qk_channels,
        v_channels=setup.dim,
        self_attention_widening_factor=setup.ff_scale,
        cross_attention_widening_factor=setup.ff_scale,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=setup.seq_len,
        vocab_size=setup.vocab_size,
    )
    model = PerceiverForMaskedLM(config)
    return model, lambda inputs: model(inputs=inputs).logits


def build_perceiver_pytorch_masked_lm(setup: MaskedLMSetup):
    from perceiver_pytorch.perceiver_io import PerceiverLM

    model = PerceiverLM(
        dim=setup.d_model,
        num_tokens=setup.vocab_size,
        max_seq_len=setup.seq_len,
        depth=setup.self_attends,
        num_latents=setup.num_latents,
        latent_dim=setup.dim,
        cross_heads=setup.heads,
        latent_heads=setup.heads,
        cross_dim_head=setup.qk_channels // setup.heads,
        latent_dim_head=setup.qk_channels // setup.heads,
    )  # its feed-forward is a GEGLU of factor 4, the size of a plain one of factor 6
    return model, model


def build_ours_masked_lm_sparse(setup: MaskedLMSetup):
    """`build_ours_masked_lm` with `sparse_prediction`, and its training loss from `labels` (decoded where masked)."""
    model, logits = build_ours_masked_lm(setup)
    model.config.sparse_prediction = True
    return model, logits, lambda inputs, labels: model(inputs, labels=labels).loss


def build_ours_causal_lm(setup: CausalLMSetup):
    from perceiver_lite import PerceiverLiteConfig, PerceiverLiteForCausalLM

    config = PerceiverLiteConfig(
        data_shape=[setup.dim, setup.seq_len],
        num_latent_tokens=setup.num_latents,
        dim=setup.dim,
        heads=setup.heads,
        cross_heads=setup.heads,
        layers_indice=[0],
        num_latent_transformers_in_layers=[setup.self_attends],
        ff_dim_scale=setup.ff_scale,
        gated_feed_forward=False,  # the plain feed-forward of the published runs
        position_encoding_type="rotary",
        vocab_size=setup.vocab_size,
    )
    model = PerceiverLiteForCausalLM(config)
    return model, lambda inputs: model(inputs).logits


def build_ours_causal_lm_sliding(setup: CausalLMSetup):
    """`build_ours_causal_lm`, generating with the sliding cache (`generate_tokens` passes `model.generation_cache`)."""
    from perceiver_lite import PerceiverLiteSlidingCausalLMCache

    model, logits = build_ours_causal_lm(setup)
    model.generation_cache = PerceiverLiteSlidingCausalLMCache
    return model, logits


def build_gpt2(setup: CausalLMSetup):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=setup.vocab_size,
        n_positions=setup.seq_len,
        n_embd=setup.dim,
        n_layer=setup.self_attends,
        n_head=setup.heads,
        n_inner=setup.ff_scale * setup.dim,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    return model, lambda inputs: model(inputs).logits


def build_perceiver_ar_pytorch(setup: CausalLMSetup):
    from perceiver_ar_pytorch import PerceiverAR

    model = PerceiverAR(
        num_tokens=setup.vocab_size,
        dim=setup.dim,
        depth=setup.self_attends,
        max_seq_len=setup.seq_len,
        cross_attn_seq_len=setup.seq_len - setup.num_latents,  # the prefix: every position before the latents
        dim_head=setup.dim // setup.heads,
        heads=setup.heads,
        ff_mult=setup.ff_scale,
    )
    return model, model  # the logits of the latent positions


def generate_tokens(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`prompt` continued by `new_tokens` tokens through the model's own generation API: transformers' greedy
    `generate` (its key/value cache), or perceiver-ar-pytorch's `AutoregressiveWrapper.generate` (top-k sampling, a
    full forward pass over the last `max_seq_len` tokens per new token)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        lengths = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        cache_class = getattr(model, "generation_cache", None)  # None: the model's own (exact) cache
        cache = {} if cache_class is None else {"cache": cache_class(model.config)}
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, **lengths, **cache)
    from perceiver_ar_pytorch.autoregressive_wrapper import AutoregressiveWrapper

    return AutoregressiveWrapper(model).generate(prompt, new_tokens)


CAUSAL_LM_BUILDERS = {
    "ours": build_ours_causal_lm,
    "ours (sliding cache)": build_ours_causal_lm_sliding,
    "GPT-2": build_gpt2,
    "perceiver-ar-pytorch": build_perceiver_ar_pytorch,
}


MASKED_LM_BUILDERS = {
    "ours": build_ours_masked_lm,
    "ours (sparse prediction)": build_ours_masked_lm_sparse,
    "transformers": build_transformers_masked_lm,
    "perceiver-pytorch": build_perceiver_pytorch_masked_lm,
}


BUILDERS = {
    "ours": build_ours,
    "ours (eager)": lambda setup: build_ours(setup, attn_implementation="eager"),
    "ours (checkpointing)": lambda setup: build_ours(setup, gradient_checkpointing=True),
    "transformers": build_transformers,
    "perceiver-pytorch": build_perceiver_pytorch,
}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def builder(name: str, setup):
    """The function that builds model `name` for `setup`: an image classifier, a masked or a causal language model."""
    builders = {MaskedLMSetup: MASKED_LM_BUILDERS, CausalLMSetup: CAUSAL_LM_BUILDERS}.get(type(setup), BUILDERS)
    return builders[name]


class Runner:
    """A model with its inputs, labels and optimizer, and the steps to time."""

    def __init__(self, name: str, setup: Setup, device: str, dtype: str, seed: int = 0):
        torch.manual_seed(seed)
        self.name, self.setup, self.device = name, setup, device
        model, self.logits, *own_loss = builder(name, setup)(setup)  # a builder may add the loss from (inputs, labels)
        self.model, self.own_loss = model.to(device), own_loss[0] if own_loss else None
        inputs, labels = setup.batch(torch.Generator().manual_seed(seed))
        self.inputs, self.labels = inputs.to(device), labels.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def infer(self, grad_mode=torch.inference_mode):
        self.model.eval()
        with grad_mode(), self.autocast:
            return self.logits(self.inputs)

    def loss(self):
        self.model.train()
        with self.autocast:
            if self.own_loss is not None:
                return self.own_loss(self.inputs, self.labels)
            return self.setup.loss(self.logits(self.inputs), self.labels)

    def generate(self):
        """The first `seq_len - new_tokens` inputs continued by `new_tokens` tokens (causal language models)."""
        self.model.eval()
        prompt = self.inputs[:, : self.setup.seq_len - self.setup.new_tokens]
        with torch.inference_mode(), self.autocast:
            return generate_tokens(self.model, prompt, self.setup.new_tokens)

    def train_step(self):
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self) -> tuple[int, int]:
        """FLOPs of one inference and of one training forward + backward."""
        with FlopCounterMode(display=False) as counter:
            self.infer(torch.enable_grad)  # the counter's module tracker fails on no-grad views of parameters
        inference = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return inference, counter.get_total_flops()


def _register_cpu_flash_attention_flops():
    """torch's flop counter knows the GPU attention kernels; count the CPU flash kernel the same way."""
    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_registry:
        register_flop_formula(forward)(lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    if backward not in flop_registry:
        register_flop_formula(backward)(
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)
        )


def cpu_name() -> str:
    """The CPU's model name and the instruction set torch's kernels use: results differ between CPUs of the same
    core count (bfloat16 matmuls most)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or "CPU"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def use_heap_for_large_allocations():
    """glibc: serve blocks up to 1 GiB from the heap and keep freed memory for reuse (no mmap / page faults per step)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("--heap-allocations: glibc's mallopt refused the thresholds")


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU seconds (robust on a busy machine)


def timed(fn, device: str) -> float:
    synchronize(device)
    start = CLOCK()
    fn()
    synchronize(device)
    return CLOCK() - start


SHORT_ROUNDS = 4  # measurements of a fraction of a second (a matmul, an inference) get this many times the rounds


def interleaved_minimum(functions: dict, device: str, repeats: int, warmup: int = 1) -> dict:
    """The minimum time of each function over `repeats` rounds; each round runs every function once, in turn."""
    for fn in functions.values():
        for _ in range(warmup):
            timed(fn, device)
    times = {name: math.inf for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name] = min(times[name], timed(fn, device))
    return times


def matmul_rates(device: str, repeats: int, size: int) -> dict:
    """This machine's sustained matmul rate (GFLOP/s) in each of `DTYPES`, square `size` matrices."""
    operands = {name: [torch.randn(size, size, device=device, dtype=getattr(torch, name)) for _ in "ab"] for name in DTYPES}
    functions = {name: (lambda a=a, b=b: a @ b) for name, (a, b) in operands.items()}
    times = interleaved_minimum(functions, device, repeats, warmup=2)
    return {name: 2 * size**3 / t / 1e9 for name, t in times.items()}


def _resident_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def _peak_memory_here(name: str, setup: Setup, device: str, dtype: str) -> float:
    """MiB that one training step allocates above the state before it, measured in this process."""
    runner = Runner(name, setup, device, dtype)
    runner.train_step()  # optimizer state, lazily built caches and library workspaces now exist
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        runner.train_step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # free heap pages back: the step must fault its own in
    baseline = _resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark (VmHWM)
    runner.train_step()
    return (_resident_kib("VmHWM") - baseline) / 2**10


def _peak_memory_child(jobs: list) -> list[float]:
    torch.set_num_threads(jobs[0][-1])
    return [_peak_memory_here(name, setup, device, dtype) for name, setup, device, dtype, _ in jobs]


def peak_memories(jobs: list[tuple], device: str) -> dict:
    """Peak training-step memory (MiB) of each `(name, setup, dtype)`; on the CPU one fresh child process per model."""
    jobs = list(dict.fromkeys(jobs))
    if device == "cuda":
        results = {}
        for job in jobs:
            results[job] = _peak_memory_here(*job[:2], device, job[2])
            gc.collect()
            torch.cuda.empty_cache()
        return results
    by_model = {}
    for name, setup, dtype in jobs:
        by_model.setdefault(name, []).append((name, setup, device, dtype, torch.get_num_threads()))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # read by the children's allocator at start-up
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = {name: pool.submit(_peak_memory_child, model_jobs) for name, model_jobs in by_model.items()}
            return {
                (name, setup, dtype): peak
                for name, model_jobs in by_model.items()
                for (_, setup, _, dtype, _), peak in zip(model_jobs, futures[name].result())
            }
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def growth_exponent(sizes, values) -> float:
    """Least-squares slope of log(value) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


# ---------------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------------


SCENARIO_MODELS = {
    "A": ["ours", "ours (eager)", "ours (checkpointing)", "transformers", "perceiver-pytorch"],
    "B": ["ours", "perceiver-pytorch"],
    "C": ["ours", "transformers", "perceiver-pytorch"],
    "D": ["ours", "ours (sparse prediction)", "transformers", "perceiver-pytorch"],
    "E": ["ours", "ours (sliding cache)", "GPT-2", "perceiver-ar-pytorch"],
}
TRAINING_ONLY = ("ours (checkpointing)", "ours (sparse prediction)")  # inference as "ours"
GENERATION_ONLY = ("ours (sliding cache)",)  # training as "ours"
# perceiver-ar-pytorch fails under bfloat16 autocast: it fills its bfloat16 attention scores with float32's minimum
UNSUPPORTED = {("perceiver-ar-pytorch", "bfloat16")}


def scenario_models(scenario: str, dtype: str) -> list[str]:
    """The models that scenario `scenario` measures in `dtype`."""
    return [name for name in SCENARIO_MODELS[scenario] if (name, dtype) not in UNSUPPORTED]


def memory_jobs(setups: dict, image_sizes: list[int]) -> list[tuple]:
    """Every `(model, setup, dtype)` whose peak training memory the scenarios report."""
    jobs = [(name, setups[s], dtype) for s in "ABDE" if s in setups for dtype in DTYPES
            for name in scenario_models(s, dtype) if name not in GENERATION_ONLY]  # fmt: skip
    for image_size in image_sizes if "C" in setups else ():
        setup = dataclasses.replace(setups["C"], image_size=image_size)
        jobs += [(name, setup, "float32") for name in SCENARIO_MODELS["C"]]
    return jobs


def scenario_a(setup: Setup, device: str, repeats: int, rates: dict, memory: dict, scenario: str = "A") -> list[dict]:
    """Inference and training throughput, achieved FLOP rate and peak memory of scenario A's models (or D's)."""
    names = SCENARIO_MODELS[scenario]
    rows = []
    for dtype in DTYPES:
        runners = {name: Runner(name, setup, device, dtype) for name in names}
        flops = {name: runners[name].flops() for name in names}
        inferring = {n: r.infer for n, r in runners.items() if n not in TRAINING_ONLY}
        inference = interleaved_minimum(inferring, device, SHORT_ROUNDS * repeats)
        training = interleaved_minimum({n: r.train_step for n, r in runners.items()}, device, repeats)
        del runners
        gc.collect()
        for name in names:
            row = {"scenario": scenario, "dtype": dtype, "model": name, "parameters": _parameters(name, setup)}
            if name in inference:
                row["inference_samples_per_s"] = setup.batch_size / inference[name]
                row["inference_gflops_per_s"] = flops[name][0] / inference[name] / 1e9
                row["inference_matmul_fraction"] = row["inference_gflops_per_s"] / rates[dtype]
            row["train_samples_per_s"] = setup.batch_size / training[name]
            row["train_gflops_per_s"] = flops[name][1] / training[name] / 1e9
            row["train_matmul_fraction"] = row["train_gflops_per_s"] / rates[dtype]
            row["train_peak_mib"] = memory[name, setup, dtype]
            rows.append(row)
        _add_ratios(rows[-len(names) :])
    return rows


def scenario_e(setup: CausalLMSetup, device: str, repeats: int, rates: dict, memory: dict) -> list[dict]:
    """Training-step and generation throughput, achieved training FLOP rate and peak memory of the causal LMs."""
    rows = []
    for dtype in DTYPES:
        names = scenario_models("E", dtype)
        runners = {name: Runner(name, setup, device, dtype) for name in names}
        trainers = {name: runner for name, runner in runners.items() if name not in GENERATION_ONLY}
        flops = {name: runner.flops()[1] for name, runner in trainers.items()}
        training = interleaved_minimum({n: r.train_step for n, r in trainers.items()}, device, repeats)
        generation = interleaved_minimum({n: r.generate for n, r in runners.items()}, device, repeats)
        del runners, trainers
        gc.collect()
        for name in names:
            row = {"scenario": "E", "dtype": dtype, "model": name, "parameters": _parameters(name, setup)}
            if name in training:
                row["train_samples_per_s"] = setup.batch_size / training[name]
                row["train_gflops_per_s"] = flops[name] / training[name] / 1e9
                row["train_matmul_fraction"] = row["train_gflops_per_s"] / rates[dtype]
                row["train_peak_mib"] = memory[name, setup, dtype]
            row["generate_tokens_per_s"] = setup.batch_size * setup.new_tokens / generation[name]
            rows.append(row)
        _add_ratios(rows[-len(names) :])
    return rows


def training_step_times(names: list[str], setup: Setup, device: str, dtype: str, repeats: int) -> dict[str, float]:
    """Seconds per training step of each model, interleaved, minimum over `repeats`; the models are freed after."""
    runners = {name: Runner(name, setup, device, dtype) for name in names}
    times = interleaved_minimum({n: r.train_step for n, r in runners.items()}, device, repeats)
    del runners
    gc.collect()
    return times


def scenario_b(setup: Setup, device: str, repeats: int, memory: dict) -> list[dict]:
    names = SCENARIO_MODELS["B"]
    rows = []
    for dtype in DTYPES:
        training = training_step_times(names, setup, device, dtype, repeats)
        for name in names:
            rows.append(
                {
                    "scenario": "B",
                    "dtype": dtype,
                    "model": name,
                    "parameters": _parameters(name, setup),
                    "train_samples_per_s": setup.batch_size / training[name],
                    "train_peak_mib": memory[name, setup, dtype],
                }
            )
        _add_ratios(rows[-len(names) :])
    return rows


def scenario_c(base: Setup, image_sizes: list[int], device: str, repeats: int, memory: dict) -> tuple[list[dict], dict]:
    names = SCENARIO_MODELS["C"]
    rows = []
    for image_size in image_sizes:
        setup = dataclasses.replace(base, image_size=image_size)
        training = training_step_times(names, setup, device, "float32", repeats)
        for name in names:
            rows.append(
                {
                    "scenario": "C",
                    "dtype": "float32",
                    "model": name,
                    "input_elements": setup.num_elements,
                    "train_step_s": training[name],
                    "train_peak_mib": memory[name, setup, "float32"],
                }
            )
    exponents = {}
    for name in names:
        own = [row for row in rows if row["model"] == name]
        sizes = [row["input_elements"] for row in own]
        exponents[name] = {
            "time": growth_exponent(sizes, [row["train_step_s"] for row in own]),
            "memory": growth_exponent(sizes, [row["train_peak_mib"] for row in own]),
        }
    return rows, exponents


_PARAMETER_COUNTS = {}


def _parameters(name: str, setup: Setup) -> int:
    key = (name.split(" (")[0], setup)
    if key not in _PARAMETER_COUNTS:
        model = builder(key[0], setup)(setup)[0]
        _PARAMETER_COUNTS[key] = sum(p.numel() for p in model.parameters())
    return _PARAMETER_COUNTS[key]


def _add_ratios(rows: list[dict]):
    """Each row's throughput over the faster peer's and peak memory over the leaner peer's."""
    peers = [row for row in rows if row["model"] in PEERS]
    for key, best in (
        ("inference_samples_per_s", max),
        ("train_samples_per_s", max),
        ("generate_tokens_per_s", max),
        ("train_peak_mib", min),
    ):
        values = [row[key] for row in peers if key in row]
        for row in rows:
            if values and key in row:
                row[f"{key}_vs_best_peer"] = row[key] / best(values)


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


COLUMNS = {
    "scenario": ("", "{}"),
    "dtype": ("dtype", "{}"),
    "model": ("model", "{}"),
    "parameters": ("params (M)", lambda v: f"{v / 1e6:.2f}"),
    "input_elements": ("input elements", "{}"),
    "inference_samples_per_s": ("infer samples/s", "{:.1f}"),
    "inference_samples_per_s_vs_best_peer": ("x faster peer", "{:.2f}"),
    "train_samples_per_s": ("train samples/s", "{:.2f}"),
    "train_samples_per_s_vs_best_peer": ("x faster peer", "{:.2f}"),
    "generate_tokens_per_s": ("generate tokens/s", "{:.1f}"),
    "generate_tokens_per_s_vs_best_peer": ("x faster peer", "{:.2f}"),
    "train_step_s": ("train step (s)", "{:.3f}"),
    "train_peak_mib": ("train peak (MiB)", "{:.0f}"),
    "train_peak_mib_vs_best_peer": ("x leaner peer", "{:.2f}"),
    "inference_gflops_per_s": ("infer GFLOP/s", "{:.0f}"),
    "inference_matmul_fraction": ("infer / matmul", "{:.0%}"),
    "train_gflops_per_s": ("train GFLOP/s", "{:.0f}"),
    "train_matmul_fraction": ("train / matmul", "{:.0%}"),
}


def markdown_table(rows: list[dict]) -> str:
    keys = [key for key in COLUMNS if any(key in row for row in rows)]
    lines = ["| " + " | ".join(COLUMNS[key][0] for key in keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            fmt = COLUMNS[key][1]
            cells.append("" if key not in row else (fmt(row[key]) if callable(fmt) else fmt.format(row[key])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict) -> str:
    environment = results["environment"]
    rates = results["matmul_gflops_per_s"]
    parts = [
        f"Command: `{environment['command']}`",
        f"Device: {environment['device_name']}, {environment['threads']} threads, {environment['clock']} clock, "
        f"{environment.get('large_allocations', 'default')} large allocations, "
        f"torch {environment['torch']}, "
        f"transformers {environment['transformers']}; {environment['date']}",
        "Matmul rate: " + ", ".join(f"{dtype} {rate:.0f} GFLOP/s" for dtype, rate in rates.items()),
    ]
    for scenario, title in (
        ("A", "Scenario A: one cross-attend, {self_attends} latent self-attention layers"),
        ("B", "Scenario B: {cross_attends} cross-attends, block 1 repeated with shared weights"),
        ("C", "Scenario C: growth with input size (float32 training step, batch {batch_size})"),
        ("D", "Scenario D: masked language modelling (Perceiver IO), {seq_len} byte tokens"),
        ("E", "Scenario E: causal language modelling (Perceiver AR), {seq_len} byte tokens, {num_latents} latents"),
    ):
        if scenario not in results["setups"]:
            continue
        setup = results["setups"][scenario]
        parts.append(f"\n### {title.format(**setup)}\n\nSetup: `{setup}`\n")
        parts.append(markdown_table([row for row in results["rows"] if row["scenario"] == scenario]))
    if results["growth_exponents"]:
        parts.append("\nScenario C fitted growth exponents (time, memory) from the smallest to the largest input:\n")
    for name, exponent in results["growth_exponents"].items():
        parts.append(f"- {name}: time {exponent['time']:.2f}, memory {exponent['memory']:.2f}")
    return "\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per training measurement (default 5, quick 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="scenario A, B, D and E batch (default 8; E 2)")
    parser.add_argument("--image-size", type=int, default=None, help="scenario A and B image side (default 64)")
    parser.add_argument("--scenarios", nargs="+", choices=list("ABCDE"), default=list("ABCDE"), help="default: all")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=DTYPES, help="scenarios A, B, D, E (default: both)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall-clock time, or this process's CPU time: on a machine shared with other work, `--clock cpu "
        "--threads 1` measures each model's own cost, unaffected by waiting for a core",
    )
    parser.add_argument(
        "--heap-allocations",
        action="store_true",
        help="time with glibc serving large tensors from its heap (no fresh mmap and page faults per step); see above",
    )
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    DTYPES[:] = args.dtypes
    if args.clock == "cpu":
        if args.device == "cuda":
            parser.error("--clock cpu measures CPU time: use the wall clock on a GPU")
        global CLOCK
        CLOCK = time.process_time
    if args.heap_allocations:
        use_heap_for_large_allocations()
    if args.device == "cpu":
        _register_cpu_flash_attention_flops()
    elif not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    if args.quick:
        base = Setup(image_size=16, batch_size=2, num_latents=32, dim=64, num_bands=8, self_attends=2)
        masked_lm = MaskedLMSetup(seq_len=256, batch_size=4, d_model=64, num_latents=16, dim=64, self_attends=2, qk_channels=32)
        causal_lm = CausalLMSetup(seq_len=256, num_latents=32, dim=64, self_attends=2, heads=2, new_tokens=4)
        image_sizes, repeats = [16, 32], args.repeats or 1
    else:
        base = Setup()
        masked_lm = MaskedLMSetup()
        causal_lm = CausalLMSetup()
        image_sizes, repeats = [37, 74, 148], args.repeats or 5  # 4.1k, 16.4k and 65.7k input elements
    if args.batch_size:
        base = dataclasses.replace(base, batch_size=args.batch_size)
        masked_lm = dataclasses.replace(masked_lm, batch_size=args.batch_size)
        causal_lm = dataclasses.replace(causal_lm, batch_size=args.batch_size)
    if args.image_size:
        base = dataclasses.replace(base, image_size=args.image_size)
    setups = {
        "A": base,
        "B": dataclasses.replace(base, cross_attends=4),
        "C": dataclasses.replace(base, batch_size=2 if args.device == "cpu" else base.batch_size),
        "D": masked_lm,
        "E": causal_lm,
    }
    setups = {name: setup for name, setup in setups.items() if name in args.scenarios}

    # minimum over many short products: the peak rate, robust to a passing slowdown of this shared machine; a GPU
    # needs larger ones (a 2048^3 bfloat16 product takes tens of microseconds there, as long as the synchronisation)
    size = 256 if args.quick else {"cpu": 2048, "cuda": 8192}[args.device]
    rates = matmul_rates(args.device, repeats=SHORT_ROUNDS * max(repeats, 3), size=size)
    print(f"matmul GFLOP/s: {rates}", flush=True)
    memory = peak_memories(memory_jobs(setups, image_sizes), args.device)
    rows, exponents = [], {}
    for name in setups:
        if name == "B":
            scenario_rows = scenario_b(setups["B"], args.device, repeats, memory)
        elif name == "C":
            scenario_rows, exponents = scenario_c(setups["C"], image_sizes, args.device, max(repeats - 2, 1), memory)
        elif name == "E":
            scenario_rows = scenario_e(setups["E"], args.device, repeats, rates, memory)  # its steps: seconds at most
        else:
            scenario_rows = scenario_a(setups[name], args.device, repeats, rates, memory, scenario=name)
        print(markdown_table(scenario_rows), flush=True)
        rows += scenario_rows

    import transformers

    results = {
        "environment": {
            "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "large_allocations": "heap" if args.heap_allocations else "default",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "setups": {name: dataclasses.asdict(setup) for name, setup in setups.items()},
        "matmul_gflops_per_s": rates,
        "rows": rows,
        "growth_exponents": exponents,
    }
    text = report(results)
    print("\n" + text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + ("-heap" if args.heap_allocations else "")
    stem = args.output_dir / f"benchmark-{args.device}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
