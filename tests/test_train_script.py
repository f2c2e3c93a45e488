"""`scripts/train.py`, the project's main job: its default run (shortened with --max_steps), a local imagefolder,
bad arguments, and a two-process `torchrun` on the CPU."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from perceiver_lite import PerceiverLiteForImageClassification


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
train_script = runpy.run_path(str(SCRIPT))  # the script's functions, without running it
SHORT_RUN = ["--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "True"]
TINY_MODEL = ["--num_latent_tokens", "8", "--dim", "32", "--num_latent_transformers_in_layers", "1", "1"]


def script_environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_default_run_saves_every_promised_file(tmp_path, capsys):
    """The digits run, shortened to 3 steps: model, processor, card with the metrics, curves; the folder serves."""
    output_dir = tmp_path / "digits"
    metrics = train_script["main"](["--output_dir", str(output_dir), *SHORT_RUN])

    assert f"Held-out accuracy: {metrics['eval_accuracy']:.4f} (360 images)" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    card = (output_dir / "README.md").read_text()
    assert "trained from scratch on the scikit-learn digits" in card
    card_accuracy = next(line for line in card.splitlines() if line.startswith("- Accuracy: "))
    assert float(card_accuracy.removeprefix("- Accuracy: ")) == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    assert Image.open(output_dir / "training_curves.png").format == "PNG"
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]

    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert isinstance(model, PerceiverLiteForImageClassification)
    assert list(model.config.id2label.values()) == [str(digit) for digit in range(10)]
    assert AutoImageProcessor.from_pretrained(output_dir).size == {"height": 8, "width": 8}
    digit = Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), mode="L")
    predictions = pipeline("image-classification", model=str(output_dir))(digit, top_k=10)
    assert sorted(prediction["label"] for prediction in predictions) == [str(digit) for digit in range(10)]


def write_imagefolder(root: Path, classes=("circle", "square"), images_per_class=6) -> Path:
    """One sub-folder of 12 x 12 PNG images per class: bright for the first class, dark for the second."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(images_per_class):
            pixels = rng.integers(0, 60, (12, 12, 3)) + (190 if index == 0 else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_trains_on_a_local_imagefolder_with_a_config_file(tmp_path):
    """`--train_dir`: labels are the sub-folders' names, images are resized to `--image_size`; the architecture comes
    from `--config_name`, overridden by the size flags."""
    train_dir = write_imagefolder(tmp_path / "images")
    config_file = tmp_path / "perceiver.json"
    config_file.write_text(json.dumps({"dim": 32, "num_latent_tokens": 4, "cross_heads": 2, "layers_indice": [0]}))
    output_dir = tmp_path / "model"
    args = ["--train_dir", str(train_dir), "--train_val_split", "0.5", "--image_size", "10"]
    args += ["--config_name", str(config_file), "--num_latent_tokens", "8", "--num_latent_transformers_in_layers", "1"]

    metrics = train_script["main"]([*args, "--output_dir", str(output_dir), *SHORT_RUN])

    assert 0 <= metrics["eval_accuracy"] <= 1
    config = AutoModelForImageClassification.from_pretrained(output_dir).config
    assert config.id2label == {0: "circle", 1: "square"}
    assert (config.data_shape, config.resolution) == ([3, 10, 10], 10)
    assert (config.dim, config.cross_heads, config.num_latent_tokens, config.layers_indice) == (32, 2, 8, [0])
    assert AutoImageProcessor.from_pretrained(output_dir).size == {"height": 10, "width": 10}


BAD_ARGUMENTS = {
    "missing train folder": (["--train_dir", "/nonexistent/dir"], "--train_dir '/nonexistent/dir' is not a folder"),
    "validation without train": (["--validation_dir", "."], "--validation_dir needs --train_dir"),
    "unknown column": (["--label_column_name", "digit"], "--label_column_name 'digit' is not a dataset column"),
    "Hub dataset offline": (["--dataset_name", "ylecun/mnist"], "--dataset_name needs the Hugging Face Hub"),
    "push offline": (["--push_to_hub", "--hub_model_id", "me/digits"], "--push_to_hub needs the Hugging Face Hub"),
    "missing checkpoint": (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "is not a folder"),
    "no checkpoint to resume": (["--resume_from_checkpoint", "True"], "found no checkpoint-* folder"),
    "missing config": (["--config_name", "/nonexistent/config.json"], "--config_name '/nonexistent/config.json'"),
    "invalid model size": (["--dim", "30"], "`dim` (30) must be divisible by `heads` (4)"),
    "zero latents": (["--num_latent_tokens", "0"], "`num_latent_tokens` must be a positive integer, got 0"),
    "negative dropout": (["--ff_dropout", "-0.1"], "`ff_dropout` must be in [0, 1), got -0.1"),
    "clashing Trainer flags": (["--load_best_model_at_end", "True", "--save_strategy", "no"], "--load_best_model"),
    "negative image size": (["--image_size", "-3"], "--image_size must be a positive number of pixels, got -3"),
    "zero image size": (["--image_size", "0"], "--image_size must be a positive number of pixels, got 0"),
    "image size not a number": (["--image_size", "abc"], "invalid int value: 'abc'"),
    "unknown flag": (["--image_sise", "8"], "unrecognized arguments: --image_sise 8 (did you mean --image_size?)"),
    "zero batch size": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive"),
    "zero eval batch size": (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be a positive"),
    "zero accumulation": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate must be a number >= 0, got -1.0"),
    "negative weight decay": (["--weight_decay", "-0.5"], "--weight_decay must be a number >= 0, got -0.5"),
    "label smoothing of 2": (["--label_smoothing_factor", "2"], "--label_smoothing_factor must be in [0, 1), got 2.0"),
    "negative seed": (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    "no epochs": (["--num_train_epochs", "0", "--max_steps", "-1"], "--num_train_epochs must be positive"),
    "train split of 1": (["--train_val_split", "1"], "--train_val_split must be between 0 and 1, got 1.0"),
}


def assert_one_error_line(stderr: str, expected: str):
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("train.py: error: ") and expected in lines[-1], stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_end_with_one_sentence(case, tmp_path, capsys):
    """Every bad argument ends as argparse's own errors do: status 2 and one `train.py: error:` line, before training."""
    args, expected = BAD_ARGUMENTS[case]
    with pytest.raises(SystemExit) as exit_info:
        train_script["main"]([*SHORT_RUN, "--output_dir", str(tmp_path / "out"), *args])  # the case overrides
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert_one_error_line(stderr, expected)
    assert stderr.count("train.py: error:") == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["missing train folder", "negative image size", "zero image size", "image size not a number"])
def test_bad_argument_on_the_command_line_prints_no_traceback(case, tmp_path):
    args, expected = BAD_ARGUMENTS[case]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**script_environment(), "PYTHONPATH": str(SCRIPT.parents[1])},
        timeout=300,
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="needs torchrun")
def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP over gloo: both processes train, rank 0 saves a loadable model. With two processes an epoch of the 1,437
    training digits is ceil(1437 / (2 x 32)) = 23 steps instead of 45."""
    output_dir = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", str(SCRIPT), "--output_dir", str(output_dir), *SHORT_RUN, *TINY_MODEL]
    result = subprocess.run(command, capture_output=True, text=True, env=script_environment(), timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Held-out accuracy") == 1  # printed by rank 0 only
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(3 / 23)
    assert isinstance(AutoModelForImageClassification.from_pretrained(output_dir), PerceiverLiteForImageClassification)
