"""Training that can be trusted: reproducible runs, deterministic evaluation, nothing lost when `scripts/train.py` is
killed and resumed, the same result from a two-process DDP run, and files that are safe to load.

What the checkpoint files are: model weights only ever as safetensors (`from_pretrained` reads nothing else); the
optimizer, scheduler and RNG states of a `Trainer` checkpoint are Trainer's own `torch.save` files, which Trainer
loads back with `torch.load(weights_only=True)`; Trainer's `training_args.bin` is written for the record and never
loaded.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PerceiverLiteModelTester
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from perceiver_lite import PerceiverLiteForImageClassification


REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "perceiver_lite"
CODE_FILES = {
    "configuration_perceiver_lite.py",
    "modeling_perceiver_lite.py",
    "fast_perceiver_lite.py",
    "validation_perceiver_lite.py",
}


def tiny_dataset(num_samples=24, seed=0) -> Dataset:
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 3, num_samples)
    pixel_values = generator.normal(size=(num_samples, 3, 8, 8)).astype(np.float32) + labels[:, None, None, None]
    return Dataset.from_dict({"pixel_values": pixel_values, "labels": labels}).with_format("torch")


def train_tiny_model(output_dir, seed: int) -> dict[str, torch.Tensor]:
    """Four Trainer steps with dropout on (so that the seed matters); the final weights."""
    config = PerceiverLiteModelTester(ff_dropout=0.1, attention_dropout=0.1).get_config()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    model_init = partial(PerceiverLiteForImageClassification, config)  # Trainer seeds the initialisation too
    trainer = Trainer(model_init=model_init, args=args, train_dataset=tiny_dataset())
    trainer.train()
    return {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------------


def test_training_with_the_same_seed_gives_identical_weights(tmp_path):
    first = train_tiny_model(tmp_path / "first", seed=7)
    second = train_tiny_model(tmp_path / "second", seed=7)
    other_seed = train_tiny_model(tmp_path / "other", seed=8)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert any(not torch.equal(first[name], other_seed[name]) for name in first), "the seed must matter"


def test_evaluation_is_deterministic():
    config = PerceiverLiteModelTester(ff_dropout=0.3, attention_dropout=0.3).get_config()
    model = PerceiverLiteForImageClassification(config)
    pixel_values = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(pixel_values).logits, model(pixel_values).logits), "dropout is live in training"
        model.eval()
        torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# scripts/train.py killed and resumed, and under torchrun: the same result as one uninterrupted process
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_SCRIPT = REPO / "scripts" / "train.py"
MAX_STEPS, SAVE_STEPS, KILL_AT_STEP, GLOBAL_BATCH = 12, 4, 6, 8
TINY_RUN = [
    *("--dim", "16", "--heads", "2", "--cross_heads", "2", "--num_latent_tokens", "4", "--num_bands", "2"),
    *("--layers_indice", "0", "--num_latent_transformers_in_layers", "1"),
    *("--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS)),
    *("--eval_strategy", "no", "--logging_steps", str(SAVE_STEPS), "--seed", "0", "--disable_tqdm", "true"),
    # 360 held-out images in batches of 36 split evenly over 2 processes: no padded evaluation batch
    *("--per_device_eval_batch_size", "36"),
    # dropout draws differ between one process and two
    *("--ff_dropout", "0", "--attention_dropout", "0"),
]
PAUSE_AT_STEP = """
import os, runpy, sys, time
import transformers.trainer
from transformers import TrainerCallback

class PauseAtStep(TrainerCallback):
    # At the end of a given step, tell the parent and wait: it kills the process there, with SIGKILL.
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["PAUSE_AT_STEP"]):
            open(os.environ["PAUSE_MARKER"], "w").close()
            time.sleep(600)

transformers.trainer.DEFAULT_CALLBACKS.append(PauseAtStep)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_train_script(output_dir, *args, launcher=(), batch_size=GLOBAL_BATCH):
    command = [*launcher, str(TRAIN_SCRIPT), *TINY_RUN, "--output_dir", str(output_dir)]
    command += ["--per_device_train_batch_size", str(batch_size), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_results(output_dir) -> tuple[dict[str, torch.Tensor], dict[str, float], list[float]]:
    """The saved weights, the final evaluation metrics and the logged training losses of a finished run."""
    output_dir = Path(output_dir)
    weights = load_file(output_dir / "model.safetensors")
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    log_history = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == MAX_STEPS // SAVE_STEPS
    return weights, {key: metrics[key] for key in ("eval_loss", "eval_accuracy")}, losses


def assert_same_results(actual, expected, atol):
    """The same weights, metrics and losses within `atol`. The keys' biases are left out: the softmax over the keys is
    invariant to them, so their gradients are rounding noise, which Adam's normalised step turns into updates of its
    full size (a different reduction order under DDP flips their signs); they change no output."""
    (weights, metrics, losses), (expected_weights, expected_metrics, expected_losses) = actual, expected
    assert weights.keys() == expected_weights.keys()
    compared = [name for name in weights if not name.endswith("k_proj.bias")]
    torch.testing.assert_close({n: weights[n] for n in compared}, {n: expected_weights[n] for n in compared}, rtol=0,
                               atol=atol)  # fmt: skip
    assert metrics["eval_accuracy"] == expected_metrics["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(expected_metrics["eval_loss"], abs=atol)
    assert losses == pytest.approx(expected_losses, abs=atol)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """One process, batch 8, never stopped: the reference for the tests below."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train_script(output_dir, launcher=(sys.executable,))
    return final_results(output_dir)


def test_train_script_killed_mid_training_resumes_to_the_same_result(uninterrupted_run, tmp_path):
    marker = tmp_path / "paused"
    env = {**os.environ, "PAUSE_AT_STEP": str(KILL_AT_STEP), "PAUSE_MARKER": str(marker)}
    command = [sys.executable, "-c", PAUSE_AT_STEP, str(TRAIN_SCRIPT), *TINY_RUN, "--output_dir", str(tmp_path)]
    command += ["--per_device_train_batch_size", str(GLOBAL_BATCH)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to kill it at"
            time.sleep(0.1)
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup, as when a machine is lost
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    checkpoints = sorted(path.name for path in tmp_path.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{SAVE_STEPS}"]  # steps 5 and 6 are lost ...
    assert not (tmp_path / "model.safetensors").exists()  # ... and the run never finished

    run_train_script(tmp_path, "--resume_from_checkpoint", str(tmp_path / checkpoints[0]), launcher=(sys.executable,))
    assert_same_results(final_results(tmp_path), uninterrupted_run, atol=1e-6)


def test_two_process_ddp_matches_one_process_and_saves_a_loadable_model(uninterrupted_run, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) with batch 4 per process equals one process with batch 8."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run_train_script(tmp_path, launcher=torchrun, batch_size=GLOBAL_BATCH // 2)
    # equal losses at every logged step: one training over two processes, not two independent trainings
    state = json.loads((tmp_path / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    results = final_results(tmp_path)
    assert_same_results(results, uninterrupted_run, atol=1e-5)

    model, loading_info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in loading_info.values()), loading_info  # no `module.` prefixes, nothing missing
    torch.testing.assert_close(model.state_dict(), results[0], rtol=0, atol=0)  # the saved weights, as saved


# ---------------------------------------------------------------------------------------------------------------------
# Safe files: safetensors only, only our code, no network
# ---------------------------------------------------------------------------------------------------------------------


def test_saved_folder_holds_safetensors_weights_and_only_our_code(tmp_path):
    model = PerceiverLiteForImageClassification(PerceiverLiteModelTester().get_config())
    model.save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert {name for name in names if name.endswith(".py")} == CODE_FILES  # what trust_remote_code would run
    for name in CODE_FILES:
        assert (tmp_path / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()


def test_pickled_weights_are_refused(tmp_path):
    model = PerceiverLiteForImageClassification(PerceiverLiteModelTester().get_config())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: could run code when loaded
    with pytest.raises(OSError, match="model.safetensors"):
        PerceiverLiteForImageClassification.from_pretrained(tmp_path)


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling_calls(path: Path) -> list[str]:
    """Imports of pickle-like modules, `torch.load` and `weights_only=False` in a Python file, found in its syntax tree
    (so that prose mentioning them does not count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {name}" for name in modules if name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.Attribute) and node.attr in ("load", "load_state_dict_from_url"):
            if isinstance(node.value, ast.Name) and node.value.id in ("torch", "hub"):
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "weights_only":
            if isinstance(node.value, ast.Constant) and node.value.value is False:
                found.append("weights_only=False")
    return [f"{path.name}:{node}" for node in found]


def test_package_and_scripts_never_unpickle(tmp_path):
    sources = sorted(PACKAGE_DIR.glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    assert [call for path in sources for call in unpickling_calls(path)] == []
    control = tmp_path / "control.py"
    control.write_text("import pickle\nimport torch\nstate = torch.load('x', weights_only=False)\n")
    expected = ["control.py:import pickle", "control.py:torch.load", "control.py:weights_only=False"]
    assert sorted(unpickling_calls(control)) == expected


NETWORK_AUDIT = """
import json, socket, sys, tempfile
EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto", "urllib.Request")
seen = []
sys.addaudithook(lambda event, args: seen.append(f"{event} {args!r}") if event in EVENTS else None)

import perceiver_lite, torch
from transformers import AutoModelForImageClassification
config = perceiver_lite.PerceiverLiteConfig(
    data_shape=[1, 4], num_latent_tokens=2, dim=8, heads=1, layers_indice=[0], num_latent_transformers_in_layers=[0],
    num_bands=1, resolution=4,
)
with tempfile.TemporaryDirectory() as folder:
    perceiver_lite.PerceiverLiteForImageClassification(config).save_pretrained(folder)
    AutoModelForImageClassification.from_pretrained(folder)(torch.randn(1, 1, 4))
print(json.dumps(seen))
try:  # the control: the hook does see a connection attempt
    socket.create_connection(("127.0.0.1", 9), timeout=0.1)
except OSError:
    pass
print(json.dumps(seen))
"""


def test_import_save_and_local_load_touch_no_network():
    """Without HF_HUB_OFFLINE, importing the package and saving / loading a local folder open no connection."""
    env = {key: value for key, value in os.environ.items() if "OFFLINE" not in key}
    result = subprocess.run(
        [sys.executable, "-c", NETWORK_AUDIT], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    during, with_control = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert during == []
    assert any(event.startswith("socket.connect") for event in with_control)
