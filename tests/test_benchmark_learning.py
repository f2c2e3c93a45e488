"""`scripts/benchmark_learning.py` runs end to end on a tiny budget and writes its table; its data sets and time-based
schedule are what its docstring says. It checks the report, never the accuracy reached: that is for the benchmark
itself, with its full budget."""

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch


os.environ["HF_HUB_OFFLINE"] = "1"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_learning.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_learning"] = module  # the worker processes find their function by module name
    spec.loader.exec_module(module)
    return module


def test_time_cosine_falls_from_one_to_zero_over_the_budget(benchmark):
    budget = benchmark.TimeBudget(10.0)
    assert budget.cosine() == 1.0  # before training starts
    budget.start = time.perf_counter() - 5.0
    assert budget.cosine() == pytest.approx(0.5, abs=0.01)
    budget.start = time.perf_counter() - 12.0
    assert budget.cosine() == 0.0


@pytest.mark.parametrize("name", ["digits", "sequence", "tokens"])
def test_tasks_have_ten_classes_and_disjoint_splits(benchmark, name):
    task = benchmark.load_task(name)
    assert set(np.unique(task.train_labels)) == set(range(10))
    assert len(task.train_labels) == len(task.train_inputs) and len(task.test_labels) == len(task.test_inputs)
    assert len(task.test_labels) >= 300


def test_sequence_class_depends_on_the_order(benchmark):
    """Reversing a signal keeps its values but changes its class (the positive pulse moves and swaps sides)."""
    task = benchmark.sequence_task()
    signal = task.train_inputs[0, 0]
    positive, negative = int(signal.argmax()), int(signal.argmin())
    reversed_positive, reversed_negative = len(signal) - 1 - positive, len(signal) - 1 - negative
    label = positive * 5 // len(signal) + 5 * (positive < negative)
    reversed_label = reversed_positive * 5 // len(signal) + 5 * (reversed_positive < reversed_negative)
    assert task.train_labels[0] == label != reversed_label


def test_tiny_run_writes_the_table(benchmark, tmp_path):
    output = tmp_path / "learning"
    args = ["--budget", "1", "--datasets", "tokens", "--seeds", "0", "--models", "ours", "perceiver-pytorch"]
    rows = benchmark.main([*args, "--output", str(output)])

    assert [(row["dataset"], row["model"]) for row in rows] == [("tokens", "ours"), ("tokens", "perceiver-pytorch")]
    payload = json.loads(output.with_suffix(".json").read_text())
    assert len(payload["runs"]) == 2
    for run in payload["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["steps"] > 0 and run["train_seconds"] >= 1.0 and run["steps_per_second"] > 0
    table = output.with_suffix(".md").read_text()
    assert "| tokens | ours |" in table and "| tokens | perceiver-pytorch |" in table
    assert "python scripts/benchmark_learning.py --budget 1 --datasets tokens" in table


def test_unknown_model_is_refused(benchmark, tmp_path):
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--models", "ours", "nonexistent"])


@pytest.mark.parametrize("name", ["digits", "tokens"])
def test_models_have_matched_parameter_counts(benchmark, name):
    """Ours, its ablations (the fixed initialisation, the plain feed-forward) and perceiver-pytorch within 2 % of each
    other's size."""
    task = benchmark.load_task(name)
    counts = {model: sum(p.numel() for p in build(task)[0].parameters()) for model, build in benchmark.MODELS.items()}
    assert max(counts.values()) <= 1.02 * min(counts.values()), counts
    ours = benchmark.MODELS["ours"](task)[0].config
    assert ours.initializer_range == pytest.approx((3 * 64) ** -0.5) and ours.latent_initializer_range == 0.25
    fixed = benchmark.MODELS["ours (initializer_range=0.02)"](task)[0].config
    assert (fixed.initializer_range, fixed.latent_initializer_range) == (0.02, None)
    assert ours.gated_feed_forward and not benchmark.MODELS["ours (plain feed-forward)"](task)[0].config.gated_feed_forward



TINY_TEXT = {"seq_len": 32, "num_latents": 8, "dim": 32, "heads": 1, "self_attends": 1, "batch_size": 4}


def test_text_is_python_documentation_split_once(benchmark):
    train, validation = benchmark.text_bytes()
    assert len(train) + len(validation) > 400_000 and 0.09 < len(validation) / (len(train) + len(validation)) < 0.11
    assert train.dtype == np.uint8 and b"lambda" in train.tobytes() and b"class" in validation.tobytes()
    window = benchmark.ByteWindows(train, 16)[5]
    assert window["input_ids"].tolist() == list(train[5:21]) and window["input_ids"] is window["labels"]
    assert len(benchmark.ByteWindows(train, 16)) == len(train) - 15


class PeekingModel(torch.nn.Module):
    """Logits of the last `num_latents` positions from the input itself: uniform, or the next byte (a perfect model)."""

    def __init__(self, num_latents: int, perfect: bool):
        super().__init__()
        self.num_latents, self.perfect = num_latents, perfect

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 256)
        if self.perfect:
            logits[:, :-1] = 100 * torch.nn.functional.one_hot(input_ids[:, 1:], 256)
        return {"logits": logits[:, -self.num_latents :]}


def test_bits_per_byte_is_eight_for_uniform_and_zero_for_the_next_byte(benchmark, monkeypatch):
    monkeypatch.setattr(benchmark, "TEXT", TINY_TEXT)
    data = benchmark.text_bytes()[1][:1000]
    assert benchmark.bits_per_byte(PeekingModel(8, perfect=False), data) == pytest.approx(8.0)
    assert benchmark.bits_per_byte(PeekingModel(8, perfect=True), data) == pytest.approx(0.0, abs=1e-6)


def test_cached_bits_per_byte_is_the_full_forwards_with_the_exact_cache(benchmark, monkeypatch):
    """Byte by byte through the exact cache: the cross-entropy of full forwards on each byte's last `seq_len` bytes;
    through the sliding cache: another (approximate) value."""
    from perceiver_lite import PerceiverLiteCausalLMCache, PerceiverLiteSlidingCausalLMCache

    monkeypatch.setattr(benchmark, "TEXT", TINY_TEXT)
    torch.manual_seed(0)
    model = benchmark.build_ours_text(initializer_range=0.3).eval()
    data = benchmark.text_bytes()[1][:500]
    length, scored = TINY_TEXT["seq_len"], 6
    starts = np.linspace(0, len(data) - length - scored, 2).astype(int)
    ids = torch.from_numpy(np.stack([data[start : start + length + scored] for start in starts]).astype(np.int64))
    with torch.no_grad():
        logits = [model(ids[:, p - length : p]).logits[:, -1] for p in range(length, length + scored)]  # full forwards
    losses = [torch.nn.functional.cross_entropy(step, ids[:, length + i], reduction="sum") for i, step in enumerate(logits)]
    expected = sum(loss.item() for loss in losses) / (2 * scored) / math.log(2)
    exact = benchmark.cached_bits_per_byte(model, data, PerceiverLiteCausalLMCache, stretches=2, scored=scored)
    sliding = benchmark.cached_bits_per_byte(model, data, PerceiverLiteSlidingCausalLMCache, stretches=2, scored=scored)
    assert exact == pytest.approx(expected, rel=1e-5)
    assert sliding != pytest.approx(expected, rel=1e-5)


def test_text_models_have_close_parameter_counts(benchmark):
    pytest.importorskip("perceiver_ar_pytorch", reason="the bench extra (perceiver-ar-pytorch) is not installed")
    counts = {name: sum(p.numel() for p in build().parameters()) for name, build in benchmark.TEXT_MODELS.items()}
    assert max(counts.values()) <= 1.3 * min(counts.values()), counts
    defaults, fixed = (benchmark.TEXT_MODELS[name]().config for name in ("ours", "ours (initializer_range=0.02)"))
    assert defaults.initializer_range == pytest.approx((3 * defaults.dim) ** -0.5) and fixed.initializer_range == 0.02


def test_tiny_text_run_writes_the_table(benchmark, tmp_path, monkeypatch):
    pytest.importorskip("perceiver_ar_pytorch", reason="the bench extra (perceiver-ar-pytorch) is not installed")
    monkeypatch.setattr(benchmark, "TEXT", TINY_TEXT)  # the forked runs inherit it
    output = tmp_path / "text"
    results = benchmark.main(["--text", "--budget", "1", "--seeds", "0", "--workers", "4", "--output", str(output)])

    assert [run["model"] for run in results] == list(benchmark.TEXT_MODELS)
    for run in results:
        assert 0.0 < run["bits_per_byte"] < 9.0 and run["steps"] > 0 and run["train_seconds"] >= 1.0, run
    payload = json.loads(output.with_suffix(".json").read_text())
    assert payload["sizes"] == TINY_TEXT and len(payload["runs"]) == len(benchmark.TEXT_MODELS)
    table = output.with_suffix(".md").read_text()
    for run in results:
        cached = "bits_per_byte_exact_cache" in run and "bits_per_byte_sliding_cache" in run
        assert cached == run["model"].startswith("ours"), run
    assert "| ours |" in table and "| GPT-2 |" in table and "| perceiver-ar-pytorch |" in table
    assert "| exact cache | sliding cache (approximate) |" in table
    assert "python scripts/benchmark_learning.py --text --budget 1" in table
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--text", "--models", "perceiver-pytorch"])  # a classification model
