"""README.md's ```python blocks run as written, and the figures README quotes are the ones they print.

Every block is picked up, new ones too. The blocks run in README's order, each in a fresh interpreter (a user pasting
it into a file), all in one folder: a block may load what an earlier one saved (`my-text-model`, `perceiver-lite-zen`),
as a reader following README would. Running one block (`-k`) runs the blocks before it first. `perceiver-lite-digits`,
which README's blocks load, comes from the Quick start's `python scripts/train.py`: here a run of that script shortened
with `--max_steps`, which saves the same files.

A marker in README itself, an HTML comment on the line before a block, says what to expect instead of a clean run:

- `<!-- readme-test: network: why -->`: the block needs the Hugging Face Hub. It runs offline and must fail at the
  network call with the Hub's own clear error (not a NameError or a missing file before it).
- `<!-- readme-test: skip: why -->`: the block is not run, for the reason given.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<kind>network|skip)\s*:\s*(?P<reason>.+?)\s*-->")
# What the Hub's client raises offline, at the end of the traceback: `OfflineModeIsEnabled`, or transformers' `OSError`
# that could not connect.
NETWORK_ERROR = re.compile(r"^(huggingface_hub\.errors\.OfflineModeIsEnabled|OSError): [\s\S]*(offline|connect)", re.M | re.I)


@dataclass
class Block:
    index: int
    line: int  # of the opening fence, 1-based
    code: str
    marker: str | None  # "network", "skip" or None
    reason: str | None

    @property
    def id(self) -> str:
        return f"block{self.index:02d}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    lines, blocks, index = text.splitlines(), [], 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        end = lines.index("```", index + 1)
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.search(previous)
        if "readme-test" in previous and marker is None:
            raise ValueError(f"README.md line {index}: unknown readme-test marker {previous!r}")
        blocks.append(Block(len(blocks), index + 1, "\n".join(lines[index + 1 : end]) + "\n",
                            marker and marker["kind"], marker and marker["reason"]))  # fmt: skip
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


class ReadmeRun:
    """The shared folder and each block's result, each block run once, after those before it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.results: dict[int, subprocess.CompletedProcess] = {}
        digits = ["--output_dir", str(folder / "perceiver-lite-digits"), "--max_steps", "20", "--save_strategy", "no"]
        prepared = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *digits], cwd=folder,
                                  env=environment(), capture_output=True, text=True, timeout=900)  # fmt: skip
        assert prepared.returncode == 0, prepared.stderr[-3000:]

    def result(self, block: Block) -> subprocess.CompletedProcess:
        for earlier in BLOCKS[: block.index + 1]:
            if earlier.index not in self.results and earlier.marker != "skip":
                script = self.folder / f"readme_{earlier.id}.py"
                script.write_text(earlier.code)
                self.results[earlier.index] = run_script(script)
        return self.results[block.index]


def run_script(script: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `script` in its folder; a run past `timeout` seconds counts as a failure (and is not run again)."""
    command = [sys.executable, script.name]
    try:
        return subprocess.run(command, cwd=script.parent, env=environment(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        return subprocess.CompletedProcess(command, -1, stdout or "", f"timed out after {timeout} s")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> ReadmeRun:
    return ReadmeRun(tmp_path_factory.mktemp("readme"))


def test_readme_has_python_blocks_and_their_markers_give_reasons():
    assert len(BLOCKS) >= 8
    assert all(block.reason for block in BLOCKS if block.marker)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs_as_written(block, readme_run):
    if block.marker == "skip":
        pytest.skip(f"README.md line {block.line}: {block.reason}")
    result = readme_run.result(block)
    if block.marker == "network":
        assert result.returncode != 0, "ran offline: the block needs no network, drop its marker"
        error = result.stderr[result.stderr.rfind("Traceback") :]
        assert NETWORK_ERROR.search(error), f"not the Hub's offline error:\n{result.stderr[-3000:]}"
    else:
        assert result.returncode == 0, f"README.md line {block.line}:\n{result.stderr[-3000:]}"


def block_printing(text: str) -> Block:
    (block,) = [block for block in BLOCKS if text in block.code]
    return block


def test_quoted_pixel_accuracy_is_what_the_dense_example_prints(readme_run):
    block = block_printing('print(f"pixel accuracy')
    printed = re.search(r"pixel accuracy (\d+\.\d)%", readme_run.result(block).stdout)
    quoted = re.search(r"\((\d+\.\d)(?: to (\d+\.\d))? % of held-out pixels", " ".join(README.read_text().split()))
    assert printed and quoted, readme_run.result(block).stdout[-2000:]
    low, high = float(quoted[1]), float(quoted[2] or quoted[1])  # the last digit varies between runs (the CPU threads' sums)
    assert low <= float(printed[1]) <= high


def test_fill_mask_example_fills_in_what_readme_says(readme_run):
    """README: the masked LM's loss falls below 0.1 and "p" comes first for "im[MASK]licit"."""
    block = block_printing('fill("Explicit is better than im[MASK]licit.")')
    stdout = readme_run.result(block).stdout
    first = re.search(r"'token_str': '(.*?)'", stdout)
    assert first and first[1] == "p", stdout[-2000:]
    losses = [float(loss) for loss in re.findall(r"'loss': '?([0-9.e-]+)'?", stdout)]
    assert losses and losses[-1] < 0.1, stdout[-2000:]
