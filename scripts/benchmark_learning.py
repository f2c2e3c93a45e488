#!/usr/bin/env python
"""Learning benchmark: how well PerceiverLite learns from small data in a fixed wall-clock budget, beside
perceiver-pytorch's `Perceiver` of the same configuration.

    python scripts/benchmark_learning.py                            # 3 data sets x 5 seeds x 3 models x 60 s, ~25 min
    python scripts/benchmark_learning.py --budget 240 --seeds 0 1 2 # 4 minutes a run (about 40 minutes in all)
    python scripts/benchmark_learning.py --datasets sequence --seeds 0 --budget 20

Each model trains from scratch through `transformers.Trainer`, as a user would (perceiver-pytorch inside a small
wrapper that returns the loss): AdamW at lr 1e-3 with weight decay 0.05 (Trainer's own optimizer: no decay on biases
and LayerNorm weights, for both models), batch 32, dropout 0.1, for `--budget` seconds of training on one CPU thread.
The learning rate follows a cosine over the *time* budget, `lr(t) = lr0 * (1 + cos(pi * t / budget)) / 2` with `t` the
training time so far, so it reaches zero when the budget ends whatever the machine's speed (a cosine over an estimated
step count would stop early or late when other processes take the cores). Then the test split is evaluated.

The models of one data set and seed train at the same time, one process and one thread each (`--workers 2` on a
2-core machine), so noise from other processes falls on both. Each reports its test accuracy and training steps per
second; the table gives the mean over the seeds and every seed. Results go to `benchmarks/learning-cpu.{md,json}`.

The models: `ours` (PerceiverLite with its config defaults: weights at `(3 * dim) ** -0.5`, latents at 0.25), `ours
(initializer_range=0.02)` (weights and latents at the fixed 0.02 that transformers models commonly use), `ours (gated)`
(the defaults with a gated GELU feed-forward, `gated_feed_forward=True` with `ff_dim_scale=4`, the same parameter count)
and `perceiver-pytorch`; all but `ours (gated)` run by default (`--models` picks).

The data sets, none needing a network (a fixed train/test split each; the seed changes the models' initialisation and
batch order only):

- `digits`: scikit-learn's 1,797 handwritten digits, 8 x 8 grayscale in [-1, 1], a stratified 80/20 split (2-D).
- `sequence`: 4,000 noisy 1-D signals of length 40 with a positive and a negative pulse; the class is where the
  positive pulse is (5 bins) and whether it comes first. The values alone say nothing: the order matters.
- `tokens`: 4,000 token sequences of length 32 over 20 tokens, classified by the most frequent of tokens 0-9 (4
  times, against 3 times for two others) among filler tokens 10-19 (the token-embedding path,
  `PerceiverLiteForSequenceClassification`).

Both models share one config: 16 latents of width 64, 4 latent heads of width 16, 1 cross head of width
64, block 0 then block 1 twice with shared weights, 2 latent self-attention layers per block, 16 linear Fourier bands
up to the input's Nyquist frequency, dropout 0.1 on attention weights and feed-forward outputs; ours has feed-forward
layers of width 6 x dim, the parameter count of perceiver-pytorch's GEGLU with factor 4.
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
        cross_heads=1,
        layers_indice=[0, 1, 1],
        num_latent_transformers_in_layers=[SHARED["self_attends"]] * 2,
        num_bands=SHARED["num_bands"],
        resolution=max(task.spatial_shape),
        frequency_base=None,
        ff_dim_scale=6,
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


# Ablations of the defaults: the fixed initialisation scale of transformers models, and the gated feed-forward at the
# plain one's parameter count (perceiver-pytorch's GEGLU).
FIXED_INITIALISATION = {"initializer_range": 0.02, "latent_initializer_range": None}
GATED = {"gated_feed_forward": True, "ff_dim_scale": 4}

# Scratch scripts may add builders here (ablations); the runs are forked, so they see them.
MODELS = {
    "ours": build_ours,
    "ours (initializer_range=0.02)": lambda task: build_ours(task, **FIXED_INITIALISATION),
    "ours (gated)": lambda task: build_ours(task, **GATED),
    PEER: build_perceiver_pytorch,
}
DEFAULT_MODELS = ["ours", "ours (initializer_range=0.02)", PEER]


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from transformers import Trainer, TrainingArguments, set_seed

    task = load_task(dataset)
    set_seed(seed)
    model, input_name = MODELS[model_name](task)
    budget = TimeBudget(budget_seconds)

    class TimeCosineTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, budget.cosine)
            return self.lr_scheduler

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=32,
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
        train_data = ArrayDataset(task.train_inputs, task.train_labels, input_name)
        trainer = TimeCosineTrainer(model=model, args=args, train_dataset=train_data, callbacks=[budget_callback(budget)])
        trainer.train()
    steps, seconds = trainer.state.global_step, budget.elapsed()
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


@torch.no_grad()
def accuracy(model: nn.Module, input_name: str, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size])
        logits = model(**{input_name: batch})["logits"]
        correct += int((logits.argmax(-1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def _train_and_evaluate(arguments: tuple) -> dict:
    return train_and_evaluate(*arguments)


def run_all(models: list[str], datasets: list[str], seeds: list[int], budget: float, workers: int) -> list[dict]:
    """Every (data set, seed, model) run; the models of one data set and seed are submitted together, so that with
    `workers` >= the number of models they train at the same time. Forked processes: builders added at run time work."""
    context = multiprocessing.get_context("fork")
    runs = [(model, dataset, seed) for dataset in datasets for seed in seeds for model in models]
    results = []
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for result in pool.imap(_train_and_evaluate, [(*run, budget) for run in runs], chunksize=1):
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


def parse_arguments(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per run (default 60)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help=f"from {list(MODELS)}")
    parser.add_argument("--workers", type=int, default=2, help="runs at the same time, one thread each")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "learning-cpu", help="path without suffix")
    arguments = parser.parse_args(args)
    unknown = sorted(set(arguments.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(MODELS)}")
    return arguments


def main(args: list[str] | None = None) -> list[dict]:
    arguments = parse_arguments(args)
    command = " ".join(["python", "scripts/benchmark_learning.py", *(sys.argv[1:] if args is None else args)])
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
