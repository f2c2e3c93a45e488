#!/usr/bin/env python
"""Learning benchmark: how well PerceiverLite learns from small data in a fixed wall-clock budget, beside
perceiver-pytorch's `Perceiver` of the same configuration.

    python scripts/benchmark_learning.py                            # 3 data sets x 5 seeds x 3 models x 60 s, ~25 min
    python scripts/benchmark_learning.py --budget 240 --seeds 0 1 2 # 4 minutes a run (about 40 minutes in all)
    python scripts/benchmark_learning.py --datasets sequence --seeds 0 --budget 20
    python scripts/benchmark_learning.py --text --budget 600 --seeds 0 1 --workers 3   # language modelling, ~25 min

Each model trains from scratch through `transformers.Trainer`, as a user would (perceiver-pytorch inside a small
wrapper that returns the loss): AdamW at lr 1e-3 with weight decay 0.05 (Trainer's own optimizer: no decay on biases
and LayerNorm weights, for both models), batch 32, dropout 0.1, for `--budget` seconds of training on one CPU thread.
The learning rate follows a cosine over the *time* budget, `lr(t) = lr0 * (1 + cos(pi * t / budget)) / 2` with `t` the
training time so far, so it reaches zero when the budget ends whatever the machine's speed (a cosine over an estimated
step count would stop early or late when other processes take the cores). Then the test split is evaluated.

The models of one data set and seed train at the same time, one process and one thread each (`--workers 2` on a
2-core machine), so noise from other processes falls on both. Each reports its test accuracy and training steps per
second; the table gives the mean over the seeds and every seed. Results go to `benchmarks/learning-cpu.{md,json}`.

The models: `ours` (PerceiverLite with its config defaults: weights at `(3 * dim) ** -0.5`, latents at 0.25, the gated
GELU feed-forward, 4 cross-attention heads), `ours (plain feed-forward)` (the defaults with the paper's plain feed-forward, `gated_feed_forward=False`
with `ff_dim_scale=6`, the same parameter count), `ours (initializer_range=0.02)` (weights and latents at the fixed 0.02
that transformers models commonly use) and `perceiver-pytorch`; all but `ours (initializer_range=0.02)` run by default
(`--models` picks).

The data sets, none needing a network (a fixed train/test split each; the seed changes the models' initialisation and
batch order only):

- `digits`: scikit-learn's 1,797 handwritten digits, 8 x 8 grayscale in [-1, 1], a stratified 80/20 split (2-D).
- `sequence`: 4,000 noisy 1-D signals of length 40 with a positive and a negative pulse; the class is where the
  positive pulse is (5 bins) and whether it comes first. The values alone say nothing: the order matters.
- `tokens`: 4,000 token sequences of length 32 over 20 tokens, classified by the most frequent of tokens 0-9 (4
  times, against 3 times for two others) among filler tokens 10-19 (the token-embedding path,
  `PerceiverLiteForSequenceClassification`).

Both models share one config: 16 latents of width 64, 4 latent heads of width 16, block 0 then block 1 twice with
shared weights, 2 latent self-attention layers per block, 16 linear Fourier bands up to the input's Nyquist frequency,
dropout 0.1 on attention weights and feed-forward outputs, gated (GEGLU) feed-forward layers of 4 x dim hidden units.
The cross-attention keeps each model's default: ours 4 heads of width 16, perceiver-pytorch 1 head of width 64 (the
head count changes no parameter count).

`--text` runs a byte-level language-modelling task instead: `pydoc_data.topics` (Python's documentation of its syntax
and built-in types, about 465 KB of English that ships with Python) as UTF-8 bytes, the first 90 % for training (every
window of `seq_len` bytes, in random order) and the last 10 % for validation. The models, of one size (`TEXT`): ours
(`PerceiverLiteForCausalLM`, Perceiver AR: the last `num_latents` positions are the latents; at the config defaults, and
at the fixed `initializer_range=0.02` for comparison), transformers'
`GPT2LMHeadModel` (causal self-attention over every position, `attn_implementation="sdpa"`) and perceiver-ar-pytorch's
`PerceiverAR`, each with `self_attends` causal self-attention layers of width `dim` and no dropout; batch 16, the same
optimizer and time-cosine schedule. The Perceiver ARs learn from the next-byte predictions of their latent positions,
GPT-2 from every position's. All are scored on the same validation targets and contexts (`bits_per_byte`). Results go
to `benchmarks/learning-text-cpu.{md,json}`.
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


REPO = Path(__file__).resolve().parents[1]
DATASETS = ("digits", "sequence", "tokens")
NUM_CLASSES = 10
PEER = "perceiver-pytorch"


@dataclass(frozen=True)
class Task:
    """One data set: channel-first float inputs `(N, C, *axes)` (or token ids `(N, T)`), labels, a train/test split."""

    name: str
    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    vocab_size: int | None = None  # token ids instead of float inputs

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.train_inputs.shape[1:] if self.vocab_size else self.train_inputs.shape[2:]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_task(name: str) -> Task:
    return {"digits": digits_task, "sequence": sequence_task, "tokens": tokens_task}[name]()


def digits_task() -> Task:
    """scikit-learn's digits `(N, 1, 8, 8)` in [-1, 1], the 80/20 stratified split of `scripts/train.py`'s seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images[:, None] / 8.0 - 1.0).astype(np.float32)
    split = train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    return Task("digits", split[0], split[2], split[1], split[3])


def sequence_task(num_train: int = 3000, num_test: int = 1000, length: int = 40) -> Task:
    """Signals `(N, 1, length)`: noise, a pulse of +1 at `a` and of -1 at `b != a`; the class is where the positive
    pulse is (5 bins of `length / 5` positions) and whether it comes before the negative one: 10 classes. The values
    alone say nothing, and swapping the pulses changes the class: the order of the elements matters."""
    rng = np.random.default_rng(1234)
    count = num_train + num_test
    first = rng.integers(0, length, count)
    second = (first + rng.integers(1, length, count)) % length  # never the same position
    labels = first * 5 // length + 5 * (first < second)
    signals = rng.normal(0.0, 0.3, (count, 1, length)).astype(np.float32)
    signals[np.arange(count), 0, first] += 1.0
    signals[np.arange(count), 0, second] -= 1.0
    return Task("sequence", signals[:num_train], labels[:num_train], signals[num_train:], labels[num_train:])


def tokens_task(num_train: int = 3000, num_test: int = 1000, length: int = 32) -> Task:
    """Token ids `(N, length)`: 17 filler tokens from 10-19 and 15 tokens from 0-9, the class 4 times, two other tokens
    3 times each and five others once; the class is the most frequent of tokens 0-9 (a count, 4 against 3)."""
    rng = np.random.default_rng(4321)
    count = num_train + num_test
    labels = rng.integers(0, NUM_CLASSES, count)
    ids = rng.integers(10, 20, (count, length))
    for row, label in enumerate(labels):
        others = rng.permutation([t for t in range(NUM_CLASSES) if t != label])
        tokens = [label] * 4 + [others[0]] * 3 + [others[1]] * 3 + list(others[2:7])
        ids[row, rng.choice(length, len(tokens), replace=False)] = tokens
    return Task("tokens", ids[:num_train], labels[:num_train], ids[num_train:], labels[num_train:], vocab_size=20)


class ArrayDataset(torch.utils.data.Dataset):
    """Rows of `inputs` under `input_name`, with `labels`: what `Trainer`'s default collator stacks into batches."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, input_name: str):
        self.inputs, self.labels, self.input_name = torch.from_numpy(inputs), torch.from_numpy(labels), input_name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.input_name: self.inputs[index], "labels": self.labels[index]}


# ---------------------------------------------------------------------------------------------------------------------
# Models: a builder takes the task and returns the model and the name of its input
# ---------------------------------------------------------------------------------------------------------------------

SHARED = {"num_latents": 16, "dim": 64, "latent_heads": 4, "self_attends": 2, "num_bands": 16, "dropout": 0.1}
TOKEN_EMBEDDING_WIDTH = 16


def ours_config(task: Task, **overrides):
    """The shared config as a `PerceiverLiteConfig`; `overrides` replace fields (for ablations)."""
    from perceiver_lite import PerceiverLiteConfig

    channels = TOKEN_EMBEDDING_WIDTH if task.vocab_size else task.train_inputs.shape[1]
    fields = dict(
        data_shape=[channels, *task.spatial_shape],
        num_latent_tokens=SHARED["num_latents"],
        dim=SHARED["dim"],
        heads=SHARED["latent_heads"],
        layers_indice=[0, 1, 1],
        num_latent_transformers_in_layers=[SHARED["self_attends"]] * 2,
        num_bands=SHARED["num_bands"],
        resolution=max(task.spatial_shape),
        frequency_base=None,
        ff_dim_scale=4,
        ff_dropout=SHARED["dropout"],
        attention_dropout=SHARED["dropout"],
        num_labels=NUM_CLASSES,
        vocab_size=task.vocab_size or 262,
    )
    return PerceiverLiteConfig(**{**fields, **overrides})


def build_ours(task: Task, **overrides) -> tuple[nn.Module, str]:
    """The head a user would pick: image classification for 2-D inputs, audio for 1-D signals, sequence for tokens."""
    import perceiver_lite

    config = ours_config(task, **overrides)
    if task.vocab_size:
        return perceiver_lite.PerceiverLiteForSequenceClassification(config), "input_ids"
    if config.num_axes == 1:
        return perceiver_lite.PerceiverLiteForAudioClassification(config), "input_values"
    return perceiver_lite.PerceiverLiteForImageClassification(config), "pixel_values"


class PerceiverPytorchClassifier(nn.Module):
    """perceiver-pytorch's `Perceiver` (and a token embedding of its default init, for token ids) behind the interface
    `Trainer` expects: keyword inputs and `labels`, a dict with the loss and the logits."""

    def __init__(self, task: Task):
        super().__init__()
        from perceiver_pytorch import Perceiver

        channels = TOKEN_EMBEDDING_WIDTH if task.vocab_size else task.train_inputs.shape[1]
        self.embedding = nn.Embedding(task.vocab_size, channels) if task.vocab_size else None
        self.perceiver = Perceiver(
            num_freq_bands=SHARED["num_bands"],
            depth=3,
            max_freq=max(task.spatial_shape),
            input_channels=channels,
            input_axis=len(task.spatial_shape),
            num_latents=SHARED["num_latents"],
            latent_dim=SHARED["dim"],
            cross_heads=1,
            latent_heads=SHARED["latent_heads"],
            cross_dim_head=SHARED["dim"],
            latent_dim_head=SHARED["dim"] // SHARED["latent_heads"],
            num_classes=NUM_CLASSES,
            attn_dropout=SHARED["dropout"],
            ff_dropout=SHARED["dropout"],
            weight_tie_layers=True,
            self_per_cross_attn=SHARED["self_attends"],
        )

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        data = self.embedding(inputs) if self.embedding is not None else inputs.movedim(1, -1)  # channel-last
        logits = self.perceiver(data)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build_perceiver_pytorch(task: Task) -> tuple[nn.Module, str]:
    return PerceiverPytorchClassifier(task), "inputs"


# Ablations of the defaults: the fixed initialisation scale of transformers models, and the plain feed-forward at the
# gated one's parameter count.
FIXED_INITIALISATION = {"initializer_range": 0.02, "latent_initializer_range": None}
PLAIN = {"gated_feed_forward": False, "ff_dim_scale": 6}

# Scratch scripts may add builders here (ablations); the runs are forked, so they see them.
MODELS = {
    "ours": build_ours,
    "ours (initializer_range=0.02)": lambda task: build_ours(task, **FIXED_INITIALISATION),
    "ours (plain feed-forward)": lambda task: build_ours(task, **PLAIN),
    PEER: build_perceiver_pytorch,
}
DEFAULT_MODELS = ["ours", "ours (plain feed-forward)", PEER]


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


class TimeBudget:
    """The training clock: started when `Trainer` begins training; the cosine factor of the time spent."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def cosine(self, _step: int = 0) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(self.elapsed() / self.seconds, 1.0)))


def budget_callback(budget: TimeBudget):
    """A `TrainerCallback` that starts `budget`'s clock with training and stops training when it runs out."""
    from transformers import TrainerCallback

    class StopAtBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            budget.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = budget.elapsed() >= budget.seconds

    return StopAtBudget()


def train_and_evaluate(model_name: str, dataset: str, seed: int, budget_seconds: float) -> dict:
    """One run on one thread: build, train through `Trainer` for the budget, evaluate on the test split."""
    from transformers import set_seed

    torch.set_num_threads(1)
    task = load_task(dataset)
    set_seed(seed)
    model, input_name = MODELS[model_name](task)
    train_data = ArrayDataset(task.train_inputs, task.train_labels, input_name)
    steps, seconds = train_for_budget(model, train_data, seed, budget_seconds)
    return {
        "model": model_name,
        "dataset": dataset,
        "seed": seed,
        "accuracy": accuracy(model, input_name, task.test_inputs, task.test_labels),
        "steps": steps,
        "train_seconds": seconds,
        "steps_per_second": steps / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def train_for_budget(model: nn.Module, train_data, seed: int, budget_seconds: float, batch_size: int = 32):
    """Train `model` through `Trainer` for `budget_seconds` under the time-cosine schedule; `(steps, seconds)`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainingArguments

    budget = TimeBudget(budget_seconds)

    class TimeCosineTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, budget.cosine)
            return self.lr_scheduler

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            learning_rate=1e-3,
            weight_decay=0.05,
            max_steps=10**8,  # the time budget ends training
            seed=seed,
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = TimeCosineTrainer(model=model, args=args, train_dataset=train_data, callbacks=[budget_callback(budget)])
        trainer.train()
    return trainer.state.global_step, budget.elapsed()


@torch.no_grad()
def accuracy(model: nn.Module, input_name: str, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size])
        logits = model(**{input_name: batch})["logits"]
        correct += int((logits.argmax(-1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def _call(function_and_arguments: tuple):
    function, arguments = function_and_arguments
    return function(*arguments)


def run_parallel(function, runs: list[tuple], workers: int):
    """`function(*run)` for every run, in order, `workers` forked processes at a time (builders added at run time
    work); runs submitted one after another start together."""
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        yield from pool.imap(_call, [(function, run) for run in runs], chunksize=1)


def run_all(models: list[str], datasets: list[str], seeds: list[int], budget: float, workers: int) -> list[dict]:
    """Every (data set, seed, model) run; the models of one data set and seed are submitted together, so that with
    `workers` >= the number of models they train at the same time."""
    runs = [(model, dataset, seed, budget) for dataset in datasets for seed in seeds for model in models]
    results = []
    for result in run_parallel(train_and_evaluate, runs, workers):
        print(
            f"{result['dataset']:>9} seed {result['seed']} {result['model']:>30}: accuracy {result['accuracy']:.3f}"
            f", {result['steps_per_second']:.1f} steps/s",
            flush=True,
        )
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def summarize(results: list[dict], models: list[str], datasets: list[str]) -> list[dict]:
    """Per data set and model: mean and per-seed test accuracy, mean steps per second."""
    rows = []
    for dataset in datasets:
        for model in models:
            runs = sorted((r for r in results if r["dataset"] == dataset and r["model"] == model), key=lambda r: r["seed"])
            rows.append({
                "dataset": dataset,
                "model": model,
                "mean_accuracy": statistics.mean(r["accuracy"] for r in runs),
                "accuracies": [r["accuracy"] for r in runs],
                "steps_per_second": statistics.mean(r["steps_per_second"] for r in runs),
                "parameters": runs[0]["parameters"],
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], command: str, budget: float, seeds: list[int]) -> str:
    lines = [
        "# Learning benchmark (CPU)",
        "",
        f"Test accuracy after {budget:g} s of training on one CPU thread per model (two runs at once), mean of "
        f"seeds {', '.join(map(str, seeds))}; written by `scripts/benchmark_learning.py`.",
        "",
        "| data set | model | parameters | test accuracy (mean) | per seed | steps/s |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in rows:
        per_seed = " / ".join(f"{a:.3f}" for a in row["accuracies"])
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['parameters']:,} | {row['mean_accuracy']:.3f} | {per_seed} "
            f"| {row['steps_per_second']:.1f} |"
        )
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}.", "", "Command:", "", "```", command, "```", ""]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Byte-level language modelling (`--text`): Python's own documentation, ours against GPT-2 and perceiver-ar-pytorch
# ---------------------------------------------------------------------------------------------------------------------

# The three models' shared size: a context of `seq_len` bytes whose last `num_latents` positions are the Perceiver ARs'
# latents (GPT-2 attends over every position), `self_attends` causal self-attention layers of width `dim`, feed-forward
# layers of width 4 x dim, no dropout (the budget is a few epochs of the data).
TEXT = {"seq_len": 512, "num_latents": 128, "dim": 128, "heads": 4, "self_attends": 4, "batch_size": 16}
TEXT_VALIDATION_FRACTION = 0.1


def text_bytes() -> tuple[np.ndarray, np.ndarray]:
    """The texts of `pydoc_data.topics` (Python's documentation of its syntax and built-in types, ~465 KB of English,
    shipped with Python) joined in key order as UTF-8 bytes; `(train, validation)`: the first 90 %, the last 10 %."""
    from pydoc_data.topics import topics

    data = np.frombuffer("\n".join(topics[key] for key in sorted(topics)).encode("utf-8"), dtype=np.uint8)
    split = round(len(data) * (1 - TEXT_VALIDATION_FRACTION))
    return data[:split], data[split:]


class ByteWindows(torch.utils.data.Dataset):
    """Every window of `length` consecutive bytes of `data` as `input_ids` and `labels` (the models shift them)."""

    def __init__(self, data: np.ndarray, length: int):
        self.data, self.length = torch.from_numpy(data.astype(np.int64)), length

    def __len__(self) -> int:
        return len(self.data) - self.length + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.data[index : index + self.length]
        return {"input_ids": window, "labels": window}


def next_byte_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits of the last `K = logits.shape[1]` positions against the byte after each (the last
    position's is outside the window: `K - 1` targets)."""
    targets = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def build_ours_text(**overrides):
    """`PerceiverLiteForCausalLM` at the shared size; `overrides` replace config fields."""
    from perceiver_lite import PerceiverLiteConfig, PerceiverLiteForCausalLM

    fields = dict(
        data_shape=[TEXT["dim"], TEXT["seq_len"]],
        num_latent_tokens=TEXT["num_latents"],
        dim=TEXT["dim"],
        heads=TEXT["heads"],
        cross_heads=TEXT["heads"],
        layers_indice=[0],
        num_latent_transformers_in_layers=[TEXT["self_attends"]],
        ff_dim_scale=4,
        gated_feed_forward=False,  # the plain feed-forward of the published text run
        ff_dropout=0.0,
        attention_dropout=0.0,
        position_encoding_type="rotary",
        vocab_size=256,
    )
    return PerceiverLiteForCausalLM(PerceiverLiteConfig(**{**fields, **overrides}))


def build_gpt2_text():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=TEXT["seq_len"],
        n_embd=TEXT["dim"],
        n_layer=TEXT["self_attends"],
        n_head=TEXT["heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


class PerceiverARLanguageModel(nn.Module):
    """perceiver-ar-pytorch's `PerceiverAR` behind the interface `Trainer` expects: `input_ids` and `labels` (the
    `input_ids`), a dict with the next-byte loss of the latent positions and their logits."""

    def __init__(self):
        super().__init__()
        from perceiver_ar_pytorch import PerceiverAR

        self.net = PerceiverAR(
            num_tokens=256,
            dim=TEXT["dim"],
            depth=TEXT["self_attends"],
            max_seq_len=TEXT["seq_len"],
            cross_attn_seq_len=TEXT["seq_len"] - TEXT["num_latents"],
            dim_head=TEXT["dim"] // TEXT["heads"],
            heads=TEXT["heads"],
            ff_mult=4,
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(input_ids)  # (B, num_latents, 256)
        return {"loss": None if labels is None else next_byte_loss(logits, labels), "logits": logits}


TEXT_MODELS = {
    "ours": build_ours_text,
    "ours (initializer_range=0.02)": lambda: build_ours_text(initializer_range=0.02),
    "GPT-2": build_gpt2_text,
    "perceiver-ar-pytorch": PerceiverARLanguageModel,
}


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy in bits over `data`, the same targets and contexts for every model: windows of
    `seq_len` bytes at a stride of `num_latents - 1`, each scoring the predictions of its last `num_latents` positions
    (the Perceiver ARs' latents), so every byte after the first `seq_len - num_latents + 1` is scored once, with at
    least `seq_len - num_latents` bytes of context."""
    model.eval()
    length, scored = TEXT["seq_len"], TEXT["num_latents"]
    windows = ByteWindows(data, length).data.unfold(0, length, scored - 1)  # (windows, seq_len)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        input_ids = windows[start : start + batch_size]
        logits = model(input_ids=input_ids)["logits"][:, -scored:]  # (B, num_latents, 256)
        total += next_byte_loss(logits, input_ids, reduction="sum").item()
    return total / (len(windows) * (scored - 1)) / math.log(2)


@torch.no_grad()
def cached_bits_per_byte(model: nn.Module, data: np.ndarray, cache_class, stretches: int = 8, scored: int = 1024):
    """Bits per byte as generation predicts: `stretches` stretches of `data` (evenly spaced), each a `seq_len`-byte
    prompt through one forward, then its next `scored` bytes one at a time through the cache `cache_class` (the exact
    `PerceiverLiteCausalLMCache`, or the approximate `PerceiverLiteSlidingCausalLMCache`), each scored before it is
    fed. With the exact cache, this is the full forward's cross-entropy on those bytes."""
    model.eval()
    length = TEXT["seq_len"] + scored
    starts = np.linspace(0, len(data) - length, stretches).astype(int)
    ids = torch.from_numpy(np.stack([data[start : start + length] for start in starts]).astype(np.int64))  # (S, L)
    cache = cache_class(model.config)
    logits = model(ids[:, : TEXT["seq_len"]], cache=cache, use_cache=True).logits[:, -1]  # (S, 256)
    total = 0.0
    for position in range(TEXT["seq_len"], length):
        total += nn.functional.cross_entropy(logits.float(), ids[:, position], reduction="sum").item()
        logits = model(ids[:, position : position + 1], cache=cache, use_cache=True).logits[:, -1]
    return total / (stretches * scored) / math.log(2)


def cache_bits_per_byte(model: nn.Module, data: np.ndarray) -> dict[str, float]:
    """`cached_bits_per_byte` with each of our caches; empty for the other models."""
    from perceiver_lite import PerceiverLiteCausalLMCache, PerceiverLiteForCausalLM, PerceiverLiteSlidingCausalLMCache

    if not isinstance(model, PerceiverLiteForCausalLM):
        return {}
    caches = {"exact_cache": PerceiverLiteCausalLMCache, "sliding_cache": PerceiverLiteSlidingCausalLMCache}
    return {f"bits_per_byte_{name}": cached_bits_per_byte(model, data, cache) for name, cache in caches.items()}


def train_and_evaluate_text(model_name: str, seed: int, budget_seconds: float) -> dict:
    """One run on one thread: build, train through `Trainer` for the budget, validation bits per byte."""
    from transformers import set_seed

    torch.set_num_threads(1)
    train, validation = text_bytes()
    set_seed(seed)
    model = TEXT_MODELS[model_name]()
    windows = ByteWindows(train, TEXT["seq_len"])
    steps, seconds = train_for_budget(model, windows, seed, budget_seconds, TEXT["batch_size"])
    return {
        "model": model_name,
        "dataset": "text",
        "seed": seed,
        "bits_per_byte": bits_per_byte(model, validation),
        **cache_bits_per_byte(model, validation),
        "steps": steps,
        "train_seconds": seconds,
        "steps_per_second": steps / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_text(models: list[str], seeds: list[int], budget: float, workers: int) -> list[dict]:
    """Every (seed, model) run of the text task; the models of one seed train at the same time."""
    runs = [(model, seed, budget) for seed in seeds for model in models]
    results = []
    for result in run_parallel(train_and_evaluate_text, runs, workers):
        print(f"seed {result['seed']} {result['model']:>22}: {result['bits_per_byte']:.3f} bits per byte, "
              f"{result['steps_per_second']:.2f} steps/s", flush=True)  # fmt: skip
        results.append(result)
    return results


def text_markdown(results: list[dict], models: list[str], command: str, budget: float, seeds: list[int]) -> str:
    train, validation = text_bytes()
    lines = [
        "# Learning benchmark: byte-level language modelling (CPU)",
        "",
        f"Validation bits per byte after {budget:g} s of training on one CPU thread per model (the models of a seed "
        f"at the same time), seeds {', '.join(map(str, seeds))}; `pydoc_data.topics` as bytes, {len(train):,} for "
        f"training and the last {len(validation):,} for validation; sizes `{TEXT}`. Written by "
        "`scripts/benchmark_learning.py --text`.",
        "",
        "| model | parameters | bits per byte (mean) | per seed | steps/s |",
        "|---|---:|---:|---|---:|",
    ]
    for model in models:
        runs = sorted((r for r in results if r["model"] == model), key=lambda r: r["seed"])
        per_seed = " / ".join(f"{r['bits_per_byte']:.3f}" for r in runs)
        lines.append(
            f"| {model} | {runs[0]['parameters']:,} | {statistics.mean(r['bits_per_byte'] for r in runs):.3f} "
            f"| {per_seed} | {statistics.mean(r['steps_per_second'] for r in runs):.2f} |"
        )
    cached = [r for r in results if "bits_per_byte_sliding_cache" in r]
    if cached:
        lines += ["", "Generation's predictions, byte by byte through a cache after a `seq_len`-byte prompt "
                  "(`cached_bits_per_byte`: 8 stretches of the validation data, 1,024 bytes scored each), bits per "
                  "byte:", "", "| model | exact cache | sliding cache (approximate) |", "|---|---:|---:|"]  # fmt: skip
        for model in dict.fromkeys(r["model"] for r in cached):
            runs = [r for r in cached if r["model"] == model]
            exact, sliding = (statistics.mean(r[f"bits_per_byte_{cache}"] for r in runs)
                              for cache in ("exact_cache", "sliding_cache"))  # fmt: skip
            lines.append(f"| {model} | {exact:.3f} | {sliding:.3f} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}.", "", "Command:", "", "```", command, "```", ""]  # fmt: skip
    return "\n".join(lines)


def main_text(arguments: argparse.Namespace, command: str) -> list[dict]:
    results = run_text(arguments.models, arguments.seeds, arguments.budget, arguments.workers)
    report = text_markdown(results, arguments.models, command, arguments.budget, arguments.seeds)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.with_suffix(".md").write_text(report)
    payload = {"command": command, "budget_seconds": arguments.budget, "sizes": TEXT, "runs": results}
    arguments.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(report)
    return results


def parse_arguments(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per run (default 60)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", help=f"from {list(MODELS)} (default {DEFAULT_MODELS}); with --text "
                        f"from {list(TEXT_MODELS)} (default all)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="runs at the same time, one thread each")
    parser.add_argument("--output", type=Path, help="path without suffix (default benchmarks/learning-cpu, --text "
                        "benchmarks/learning-text-cpu)")  # fmt: skip
    parser.add_argument("--text", action="store_true", help="the byte-level language-modelling task instead "
                        "(--datasets unused): ours, GPT-2 and perceiver-ar-pytorch, validation bits per byte")  # fmt: skip
    arguments = parser.parse_args(args)
    models = TEXT_MODELS if arguments.text else MODELS
    arguments.models = arguments.models or (list(TEXT_MODELS) if arguments.text else DEFAULT_MODELS)
    default_output = REPO / "benchmarks" / ("learning-text-cpu" if arguments.text else "learning-cpu")
    arguments.output = arguments.output or default_output
    unknown = sorted(set(arguments.models) - set(models))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(models)}")
    return arguments


def main(args: list[str] | None = None) -> list[dict]:
    arguments = parse_arguments(args)
    command = " ".join(["python", "scripts/benchmark_learning.py", *(sys.argv[1:] if args is None else args)])
    if arguments.text:
        return main_text(arguments, command)
    results = run_all(arguments.models, arguments.datasets, arguments.seeds, arguments.budget, arguments.workers)
    rows = summarize(results, arguments.models, arguments.datasets)
    report = markdown(rows, command, arguments.budget, arguments.seeds)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.with_suffix(".md").write_text(report)
    payload = {"command": command, "budget_seconds": arguments.budget, "summary": rows, "runs": results}
    arguments.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(report)
    return rows


if __name__ == "__main__":
    main()
