"""Gradient accumulation of a token head under DDP: `Trainer` gathers its count of labelled tokens over the processes
(`num_items_in_batch`) and the masked LM divides its summed loss by it, so two processes with accumulated batches make
the optimizer step one process makes on the same tokens, however unevenly the batches are labelled.

The test launches this file with `torchrun --standalone --nproc_per_node 2 tests/test_distributed_accumulation.py
OUT`: the processes train together (`main` below) and the first writes the weights; the test then trains in one
process and compares.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import VOCAB_SIZE, PerceiverLiteModelTester
from safetensors.torch import load_file, save_file
from test_heads import unevenly_labelled, weights_after_one_step


REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES, GLOBAL_BATCH, ACCUMULATION = 2, 8, 2


def tiny_masked_lm():
    """The same initial weights in every process, and no dropout (its draws differ between one process and two)."""
    torch.manual_seed(0)
    tester = PerceiverLiteModelTester("mlm", ff_dropout=0.0, attention_dropout=0.0)
    return tester.model_class(tester.get_config())


def trained_weights(output_dir, per_device_batch: int) -> dict[str, torch.Tensor]:
    """One SGD step through `Trainer` over the 8 sequences, `ACCUMULATION` batches of `per_device_batch` a process;
    the tied `lm_head.weight` left out (safetensors stores a tensor once)."""
    weights = weights_after_one_step(tiny_masked_lm(), unevenly_labelled(VOCAB_SIZE), output_dir, per_device_batch,
                                     ACCUMULATION)  # fmt: skip
    return {name: weight.contiguous() for name, weight in weights.items() if name != "lm_head.weight"}


def main(output_dir: Path):
    weights = trained_weights(output_dir, GLOBAL_BATCH // (NUM_PROCESSES * ACCUMULATION))
    if int(os.environ["RANK"]) == 0:
        save_file(weights, output_dir / "weights.safetensors")


def test_two_processes_accumulate_as_one(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NUM_PROCESSES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [*torchrun, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two_processes = load_file(tmp_path / "weights.safetensors")
    one_process = trained_weights(tmp_path / "one", GLOBAL_BATCH // ACCUMULATION)
    initial = tiny_masked_lm().state_dict()
    assert any(not torch.equal(weight, initial[name]) for name, weight in one_process.items())
    for name, weight in one_process.items():
        torch.testing.assert_close(two_processes[name], weight, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
