"""`scripts/benchmark.py` runs end to end (`--quick`: tiny sizes, one repeat) and reports what it measured
consistently. It checks the report, never the speed: speed is for the benchmark itself, on a quiet machine."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_growth_exponent_recovers_a_power_law():
    benchmark = load_benchmark()
    sizes = [4107, 16428, 65712]
    assert benchmark.growth_exponent(sizes, [3.0 * s**0.8 for s in sizes]) == pytest.approx(0.8)
    assert benchmark.growth_exponent(sizes, [7.0] * 3) == pytest.approx(0.0)


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def quick_results(request, tmp_path_factory):
    """The report of `--quick` on the CPU, and on a GPU where there is one."""
    pytest.importorskip("perceiver_pytorch", reason="the bench extra (perceiver-pytorch) is not installed")
    pytest.importorskip("perceiver_ar_pytorch", reason="the bench extra (perceiver-ar-pytorch) is not installed")
    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    output_dir = tmp_path_factory.mktemp("benchmark")
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--device", device]
    command += ["--output-dir", str(output_dir)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output_dir / f"benchmark-{device}-quick.json").read_text())
    return results, (output_dir / f"benchmark-{device}-quick.md").read_text()


def test_quick_benchmark_reports_every_model_of_every_scenario(quick_results):
    results, markdown = quick_results
    benchmark = load_benchmark()
    rows = results["rows"]
    for scenario in benchmark.SCENARIO_MODELS:
        for dtype in ("float32", "bfloat16") if scenario != "C" else ("float32",):
            reported = [row["model"] for row in rows if row["scenario"] == scenario and row["dtype"] == dtype]
            sizes = 2 if scenario == "C" else 1  # scenario C: one row per model and input size
            assert sorted(reported) == sorted(benchmark.scenario_models(scenario, dtype) * sizes), (scenario, dtype)
    for row in rows:
        assert row.get("train_peak_mib", 1) > 0 and row.get("parameters", 1) > 0, row
        assert ("train_peak_mib" in row) == (row["model"] not in benchmark.GENERATION_ONLY), row
        assert row.get("train_samples_per_s", 1) > 0 and row.get("train_step_s", 1) > 0, row
    assert set(results["growth_exponents"]) == set(benchmark.SCENARIO_MODELS["C"])
    assert all(math.isfinite(v) for e in results["growth_exponents"].values() for v in e.values())
    assert results["environment"]["command"].startswith("python scripts/benchmark.py --quick")
    assert markdown.count("| A |") == 10 and markdown.count("| B |") == 4 and markdown.count("| C |") == 6
    assert markdown.count("| E |") == 7  # perceiver-ar-pytorch in float32 only


def test_quick_benchmark_scenario_e_measures_training_generation_and_memory(quick_results):
    results, markdown = quick_results
    rows = [row for row in results["rows"] if row["scenario"] == "E"]
    assert {row["model"] for row in rows} == {"ours", "ours (sliding cache)", "GPT-2", "perceiver-ar-pytorch"}
    for row in rows:
        assert row["generate_tokens_per_s"] > 0 and row["parameters"] > 0, row
        if row["model"] != "ours (sliding cache)":  # it trains as "ours"
            assert row["train_samples_per_s"] > 0 and row["train_peak_mib"] > 0 and row["train_gflops_per_s"] > 0, row
    for dtype in ("float32", "bfloat16"):
        same_dtype = [row for row in rows if row["dtype"] == dtype]
        fastest = max(row["generate_tokens_per_s"] for row in same_dtype if not row["model"].startswith("ours"))
        for row in same_dtype:
            assert row["generate_tokens_per_s_vs_best_peer"] == pytest.approx(row["generate_tokens_per_s"] / fastest)
    assert results["setups"]["E"]["seq_len"] > results["setups"]["E"]["num_latents"]
    assert "Scenario E: causal language modelling (Perceiver AR)" in markdown and "generate tokens/s" in markdown


def test_causal_lm_loss_scores_the_next_token_of_the_covered_positions():
    """The loss of logits for the last K positions is the cross-entropy against the K - 1 tokens after them."""
    benchmark = load_benchmark()
    setup = benchmark.CausalLMSetup(seq_len=10, batch_size=2, vocab_size=5)
    inputs, labels = setup.batch(torch.Generator().manual_seed(0))
    assert torch.equal(inputs, labels) and inputs.shape == (2, 10)
    logits = torch.nn.functional.one_hot(labels[:, 6:], 5).float() * 50  # position t "predicts" token t ...
    assert setup.loss(logits, labels) > 10  # ... so it misses token t + 1
    logits = torch.nn.functional.one_hot(labels[:, 7:], 5).float() * 50  # position t predicts token t + 1
    assert setup.loss(torch.cat([logits, logits[:, :1]], dim=1), labels) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["ours", "ours (sliding cache)", "GPT-2", "perceiver-ar-pytorch"])
def test_causal_lm_generation_continues_the_prompt(name):
    """Each model of scenario E continues the `seq_len - new_tokens` prompt by `new_tokens` tokens."""
    if name == "perceiver-ar-pytorch":
        pytest.importorskip("perceiver_ar_pytorch", reason="the bench extra (perceiver-ar-pytorch) is not installed")
    benchmark = load_benchmark()
    sizes = dict(seq_len=40, batch_size=2, num_latents=8, dim=64, self_attends=1, heads=2, new_tokens=5)
    setup = benchmark.CausalLMSetup(**sizes)
    runner = benchmark.Runner(name, setup, "cpu", "float32")
    tokens = runner.generate()[:, -setup.new_tokens :]
    assert tokens.shape == (2, 5) and tokens.dtype == torch.long
    assert ((0 <= tokens) & (tokens < setup.vocab_size)).all()


def test_quick_benchmark_ratios_are_against_the_best_peer(quick_results):
    results, _ = quick_results
    for scenario in ("A", "B"):
        for dtype in ("float32", "bfloat16"):
            rows = [r for r in results["rows"] if r["scenario"] == scenario and r["dtype"] == dtype]
            peers = [r for r in rows if r["model"] in ("transformers", "perceiver-pytorch")]
            fastest = max(r["train_samples_per_s"] for r in peers)
            leanest = min(r["train_peak_mib"] for r in peers)
            for row in rows:
                assert row["train_samples_per_s_vs_best_peer"] == pytest.approx(row["train_samples_per_s"] / fastest)
                assert row["train_peak_mib_vs_best_peer"] == pytest.approx(row["train_peak_mib"] / leanest)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: `--device cuda` runs")
    command = [sys.executable, str(SCRIPT), "--quick", "--device", "cuda", "--output-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "--device cuda: no CUDA device is available" in completed.stderr
    assert not list(tmp_path.iterdir())  # stopped before measuring anything
