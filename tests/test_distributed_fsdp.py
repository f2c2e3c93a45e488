"""Sharded training (FSDP) on the CPU: torch's `fully_shard` over two gloo processes trains to the weights one process
reaches, and what transformers' `Trainer` (through accelerate's FSDP plugin) does when asked for FSDP there: with FSDP2
it trains data-parallel, unsharded, and `PerceiverLiteTrainer` warns; with `accelerate launch --use_fsdp`'s FSDP1
defaults accelerate stops with an error.

The test launches this file with `torchrun --standalone --nproc_per_node 2 tests/test_distributed_fsdp.py OUT`: each
process trains its half of every batch (`main` below), and both call `save_pretrained`, which gathers the weights for
the first process to write, and `push_to_hub` (against `test_hub`'s stand-in for the Hub client), which the first
process alone uploads; the test then trains the same model on the whole batches in one process and compares.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.fsdp
from conftest import PerceiverLiteModelTester
from transformers import AutoModelForImageClassification, TrainingArguments

from perceiver_lite import PerceiverLiteForImageClassification, fast_perceiver_lite, modeling_perceiver_lite
from perceiver_lite.trainer import PerceiverLiteTrainer
from test_hub import SAVED_FILES, install_fake_hub


REPO = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH, NUM_PROCESSES = 3, 8, 2
# Whether `fully_shard` is applied to every `PerceiverLiteLayer` (the model's `_no_split_modules`) before the model
# itself, as the README shows, or to the model alone (one unit, gathered whole for each forward).
SHARDINGS = {"layers_and_model": True, "model": False}
TRAINER_WARNING = "FSDP was asked for, but accelerate runs this as"
needs_fully_shard = pytest.mark.skipif(
    not hasattr(torch.distributed.fsdp, "fully_shard"), reason="`torch.distributed.fsdp.fully_shard` needs torch 2.6"
)


def tiny_model() -> PerceiverLiteForImageClassification:
    """The tiny classifier with block 1 repeated (`layers_indice` [0, 1, 1]: its layers run twice per forward), the
    same initial weights in every process, and no dropout (its draws differ between one process and two)."""
    torch.manual_seed(0)
    config = PerceiverLiteModelTester(ff_dropout=0.0, attention_dropout=0.0).get_config()
    return PerceiverLiteForImageClassification(config)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=generator)
    return list(zip(pixel_values, labels, strict=True))


def train(model, rank: int = 0, world_size: int = 1):
    """`STEPS` steps of SGD with momentum, each process on its share of every batch. SGD, not Adam: Adam's normalised
    step turns gradients that are rounding noise (the keys' biases, which the softmax ignores) into full-size updates,
    and the comparison would measure the order of the gradients' reduction."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    for pixel_values, labels in batches():
        part = slice(rank * share, (rank + 1) * share)
        model(pixel_values=pixel_values[part], labels=labels[part]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@contextlib.contextmanager
def recording_fast_plans():
    """Yields a list that says, for each `PerceiverLiteModel` forward inside the block, whether the fast paths ran
    (True) or the reference (False)."""
    served = []

    def recording_fast_plan(module, *args, **kwargs):
        plan = fast_perceiver_lite.fast_plan(module, *args, **kwargs)
        if isinstance(module, modeling_perceiver_lite.PerceiverLiteModel):
            served.append(plan is not None)
        return plan

    modeling_perceiver_lite.fast_plan = recording_fast_plan
    try:
        yield served
    finally:
        modeling_perceiver_lite.fast_plan = fast_perceiver_lite.fast_plan


# ---------------------------------------------------------------------------------------------------------------------
# What each of the two processes runs
# ---------------------------------------------------------------------------------------------------------------------


def main(output_dir: Path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hub = install_fake_hub(output_dir / "remote")
    report = {}
    for name, shard_layers in SHARDINGS.items():
        model = tiny_model()
        for module in model.modules():
            if shard_layers and type(module).__name__ in model._no_split_modules:
                fully_shard(module)
        fully_shard(model)
        with recording_fast_plans() as served:
            train(model, rank, dist.get_world_size())
        report[name] = {
            "sharded": all(isinstance(parameter, DTensor) for parameter in model.parameters()),
            "fast_paths_served": served,
        }
        model.save_pretrained(output_dir / name)  # every process: the weights are gathered, the first one writes
        model.push_to_hub(f"someone/{name}")  # every process, as save_pretrained; the first one uploads
    (output_dir / f"hub_calls{rank}.json").write_text(json.dumps(hub.calls))
    report["trainer"] = trainer_asked_for_fsdp(output_dir / "trainer")
    if rank == 0:
        (output_dir / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def trainer_asked_for_fsdp(output_dir: Path) -> dict:
    """What `PerceiverLiteTrainer(args=TrainingArguments(fsdp=True, use_cpu=True))` sets up in this process: the FSDP
    plugin transformers builds for accelerate, whether accelerate shards, how it wraps the model, what we warn."""
    args = TrainingArguments(output_dir=str(output_dir), fsdp=True, use_cpu=True, report_to="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = PerceiverLiteTrainer(model=tiny_model(), args=args)
    return {
        "fsdp_plugin_args": args.fsdp_plugin_args,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_as": type(trainer.accelerator.prepare_model(trainer.model)).__name__,
        "warnings": [str(warning.message) for warning in caught if TRAINER_WARNING in str(warning.message)],
    }


# ---------------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("fsdp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NUM_PROCESSES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [*torchrun, __file__, str(output_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, json.loads((output_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def one_process_weights() -> dict[str, torch.Tensor]:
    """The weights one process reaches on the whole batches, with the fast paths on."""
    model = tiny_model()
    with recording_fast_plans() as served:
        train(model)
    assert served == [True] * STEPS
    return model.state_dict()


@needs_fully_shard
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_fully_shard_over_two_processes_trains_to_the_weights_of_one_process(
    two_process_run, one_process_weights, sharding
):
    output_dir, report = two_process_run
    assert report[sharding]["sharded"]  # every parameter a DTensor, each process holding half of it
    model, loading_info = AutoModelForImageClassification.from_pretrained(
        output_dir / sharding, output_loading_info=True
    )
    assert all(not keys for keys in loading_info.values()), loading_info
    torch.testing.assert_close(model.state_dict(), one_process_weights, rtol=0, atol=1e-6)  # float32 rounding


@needs_fully_shard
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_save_pretrained_of_a_sharded_model_writes_the_unsharded_model_and_its_code(two_process_run, sharding):
    """`fully_shard` makes the model's class a subclass defined in torch (`FSDPPerceiverLite...`): the folder names the
    package's class and code, as an unsharded model's does, and loads as remote code too."""
    output_dir, _ = two_process_run
    folder = output_dir / sharding
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["PerceiverLiteForImageClassification"]
    auto_map = config["auto_map"]["AutoModelForImageClassification"]
    assert auto_map == "modeling_perceiver_lite.PerceiverLiteForImageClassification"
    code = sorted(path.name for path in folder.glob("*.py"))
    assert code == [f"{name}_perceiver_lite.py" for name in ("configuration", "fast", "modeling", "validation")]


@needs_fully_shard
def test_push_to_hub_of_a_sharded_model_uploads_once_from_the_first_process(two_process_run):
    """Every process calls `push_to_hub` (the weights are gathered, as for `save_pretrained`); the first creates the
    repository and uploads the unsharded model with its code and card, the others call nothing of the Hub."""
    output_dir, _ = two_process_run
    first, second = (json.loads((output_dir / f"hub_calls{rank}.json").read_text()) for rank in range(NUM_PROCESSES))
    expected = []
    for name in SHARDINGS:
        repo_id = f"someone/{name}"
        expected += [("create_repo", repo_id), ("create_commit", repo_id, sorted({*SAVED_FILES, "README.md"}))]
    assert [tuple(call) for call in first] == expected
    assert second == []
    pushed = PerceiverLiteForImageClassification.from_pretrained(output_dir / "remote" / "someone" / "model")
    saved = PerceiverLiteForImageClassification.from_pretrained(output_dir / "model")
    torch.testing.assert_close(pushed.state_dict(), saved.state_dict(), rtol=0, atol=0)


def test_a_process_training_alone_on_its_share_ends_elsewhere(one_process_weights):
    """The control of the comparison above: without the processes' gradient reduction, the weights differ by far more
    than its tolerance."""
    alone = tiny_model()
    train(alone, rank=0, world_size=NUM_PROCESSES)
    distance = max((alone.state_dict()[name] - weights).abs().max() for name, weights in one_process_weights.items())
    assert distance > 1e-3


@needs_fully_shard
def test_fast_paths_step_aside_for_sharded_layers_and_serve_a_model_gathered_whole(two_process_run):
    """Layers with `fully_shard` carry its forward hooks (which gather their weights), so the model's forward runs the
    reference; with the model as the only unit, its weights are gathered whole before its forward, and the fast paths
    read them. Both train to the one-process weights (above)."""
    _, report = two_process_run
    assert report["layers_and_model"]["fast_paths_served"] == [False] * STEPS
    assert report["model"]["fast_paths_served"] == [True] * STEPS


@needs_fully_shard
def test_trainer_asked_for_fsdp_on_the_cpu_trains_data_parallel_and_warns(two_process_run):
    """transformers builds accelerate's FSDP plugin, but accelerate makes the CPU's processes `MULTI_CPU`, never FSDP:
    the model is wrapped in DDP, unsharded. `PerceiverLiteTrainer` warns once."""
    _, report = two_process_run
    trainer = report["trainer"]
    assert trainer["fsdp_plugin_args"]["fsdp_version"] == 2
    assert not trainer["is_fsdp_enabled"]
    assert trainer["distributed_type"] == "DistributedType.MULTI_CPU"
    assert trainer["wrapped_as"] == "DistributedDataParallel"
    assert len(trainer["warnings"]) == 1 and "fully_shard" in trainer["warnings"][0], trainer["warnings"]


@pytest.fixture
def fsdp_environment():
    """No FSDP settings in the environment during the test, and the environment as it was after it: accelerate's FSDP
    plugin writes its settings there (`ACCELERATE_USE_FSDP`, `FSDP_...`), where later Trainers would read them."""
    saved = dict(os.environ)
    for name in [name for name in os.environ if name == "ACCELERATE_USE_FSDP" or name.startswith("FSDP_")]:
        del os.environ[name]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_trainer_asked_for_fsdp_in_one_process(fsdp_environment, tmp_path):
    """`fsdp=True` in one process is transformers' error; `accelerate launch --use_fsdp --fsdp_version 2` (its
    environment variable) with one process trains unsharded, and `PerceiverLiteTrainer` warns, as it does not without
    FSDP."""
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="Using fsdp only works in distributed training"):
        PerceiverLiteTrainer(model=tiny_model(), args=args)

    fsdp_environment["ACCELERATE_USE_FSDP"] = "false"  # the FSDP plugin above set it to "true"
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=TRAINER_WARNING)
        PerceiverLiteTrainer(model=tiny_model(), args=args)
    fsdp_environment.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    with pytest.warns(UserWarning, match=f"{TRAINER_WARNING} DistributedType.NO"):
        trainer = PerceiverLiteTrainer(model=tiny_model(), args=args)
    assert not trainer.is_fsdp_enabled


@pytest.mark.skipif(torch.accelerator.is_available(), reason="accelerate refuses this only without an accelerator")
def test_accelerate_launch_use_fsdp_defaults_stop_on_the_cpu(fsdp_environment, tmp_path):
    """`accelerate launch --use_fsdp` asks for FSDP1 with `sync_module_states` by default (these environment variables),
    which accelerate refuses without an accelerator, before any training. `--fsdp_version 2` builds the FSDP2 plugin
    that `fsdp=True` builds (the tests above)."""
    fsdp_environment.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1", FSDP_SYNC_MODULE_STATES="true")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    refused = "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu."
    with pytest.raises(RuntimeError, match=re.escape(refused)):
        PerceiverLiteTrainer(model=tiny_model(), args=args)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
