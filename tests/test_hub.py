"""Sharing on the Hub: what `save_pretrained` writes, loading with and without the package (`trust_remote_code`),
`push_to_hub` (model, `Trainer`, `scripts/train.py`) against a stand-in for the Hub client, loading options and the
errors that bad files raise.

The remote-code checks run `remote_code_loader.py` in a subprocess that cannot import `perceiver_lite`.
"""

import importlib.util
import json
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
import transformers
import transformers.utils.hub
from conftest import (
    MODELS,
    PER_ELEMENT,
    VOCAB_SIZE,
    PerceiverLiteModelTester,
    labelled_inputs,
    load_without_package,
    make_head,
)
from datasets import Dataset
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification, TrainingArguments
from transformers.dynamic_module_utils import get_imports, get_relative_imports
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import perceiver_lite
from perceiver_lite import (
    PerceiverLiteConfig,
    PerceiverLiteForImageClassification,
    PerceiverLiteForTokenClassification,
    PerceiverLiteModel,
)
from perceiver_lite.trainer import PerceiverLiteTrainer


TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
PACKAGE_DIR = Path(perceiver_lite.__file__).parent
CODE_FILES = {
    "configuration_perceiver_lite.py",
    "modeling_perceiver_lite.py",
    "fast_perceiver_lite.py",
    "validation_perceiver_lite.py",
}
SAVED_FILES = {"config.json", "model.safetensors", *CODE_FILES}
AUTO_MAP = {
    "AutoConfig": "configuration_perceiver_lite.PerceiverLiteConfig",
    "AutoModel": "modeling_perceiver_lite.PerceiverLiteModel",
    "AutoModelForImageClassification": "modeling_perceiver_lite.PerceiverLiteForImageClassification",
    "AutoModelForSequenceClassification": "modeling_perceiver_lite.PerceiverLiteForSequenceClassification",
    "AutoModelForAudioClassification": "modeling_perceiver_lite.PerceiverLiteForAudioClassification",
    "AutoModelForMaskedLM": "modeling_perceiver_lite.PerceiverLiteForMaskedLM",
    "AutoModelForTokenClassification": "modeling_perceiver_lite.PerceiverLiteForTokenClassification",
    "AutoModelForSemanticSegmentation": "modeling_perceiver_lite.PerceiverLiteForDensePrediction",
    "AutoModelForCausalLM": "modeling_perceiver_lite.PerceiverLiteForCausalLM",
}
ATOL = 1e-5

def head_inputs(kind: str, batch_size: int = 3) -> torch.Tensor:
    """The main input of the model of `kind`: token ids, `(B, T)` signals or `(B, C, *axes)` floats."""
    return PerceiverLiteModelTester(kind).prepare_main_input(batch_size)


def output_name(auto_class: str) -> str:
    return "last_hidden_state" if auto_class == "AutoModel" else "logits"


@torch.no_grad()
def write_reference(model, auto_class: str, inputs: torch.Tensor, path: Path) -> Path:
    """Inputs and the output the model loaded by `auto_class` must give (`AutoModel` on a head: its base model)."""
    name = output_name(auto_class)
    source = model.perceiver if auto_class == "AutoModel" and hasattr(model, "perceiver") else model
    expected = getattr(source(inputs), name).contiguous()  # the dense head's logits are a channel-first view
    save_file({"inputs": inputs, "expected": expected}, path, metadata={"output": name})
    return path


def reference_cases(kind: str, model, folder: Path, references: Path) -> list[dict]:
    """`AutoModel` and the head's own Auto class on `folder`, each with a reference file of its outputs."""
    auto_class = MODELS[kind].auto_class
    cases = []
    for name in dict.fromkeys(["AutoModel", auto_class]):
        inputs = PerceiverLiteModelTester(kind).prepare_inputs() if name == "AutoModel" else head_inputs(kind)
        reference = write_reference(model, name, inputs, references / f"{folder.name}-{name}.safetensors")
        cases.append({"folder": str(folder), "auto_class": name, "reference": str(reference)})
    return cases


def assert_matches_references(model, cases: list[dict], auto_class: str, device: str = "cpu"):
    for case in (case for case in cases if case["auto_class"] == auto_class):
        with safe_open(case["reference"], framework="pt") as reference:
            inputs, expected = reference.get_tensor("inputs"), reference.get_tensor("expected")
        with torch.no_grad():
            output = getattr(model(inputs.to(device)), output_name(auto_class)).cpu()
        torch.testing.assert_close(output, expected, atol=ATOL, rtol=0)


def assert_loaded_without_package(report: dict, cases: list[dict]):
    assert report["package_importable_before"] is False and report["package_importable_after"] is False
    assert report["package_modules"] == []
    assert [(case["folder"], case["auto_class"]) for case in report["cases"]] == [
        (case["folder"], case["auto_class"]) for case in cases
    ]
    for case in report["cases"]:
        expected_class = AUTO_MAP[case["auto_class"]].split(".")[1]
        assert case["model_class"] == expected_class, case
        assert case["module"].startswith("transformers_modules."), case  # the saved code, from the modules cache
        assert case["module"].endswith(".modeling_perceiver_lite"), case
        assert case["max_abs_diff"] <= ATOL, case
        assert set(case["resaved_files"]) == SAVED_FILES, case
        assert case["resaved_auto_map"] == AUTO_MAP, case
        assert case["resaved_max_abs_diff"] <= ATOL, case


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each kind of model saved to its own folder, with reference outputs kept outside the folders."""
    root = tmp_path_factory.mktemp("saved")
    (root / "references").mkdir()
    torch.manual_seed(0)
    result = {}
    for kind in MODELS:
        model = make_head(kind)
        folder = root / kind
        model.save_pretrained(folder)
        cases = reference_cases(kind, model, folder, root / "references")
        result[kind] = SimpleNamespace(model=model, folder=folder, cases=cases)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# 1. What save_pretrained writes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_save_pretrained_writes_weights_code_and_auto_map(saved, kind):
    folder = saved[kind].folder
    assert {path.name for path in folder.iterdir()} == SAVED_FILES  # no pickle (`pytorch_model.bin`) beside them
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "perceiver_lite"
    assert config["architectures"] == [MODELS[kind].model_class.__name__]
    assert config["auto_map"] == AUTO_MAP  # every head, whichever class was saved
    for name in CODE_FILES:
        assert (folder / name).read_text() == (PACKAGE_DIR / name).read_text()
    weights = load_file(folder / "model.safetensors")
    model = saved[kind].model
    tied = model.all_tied_weights_keys.keys()  # the masked LM's lm_head.weight: the token embedding, saved once
    assert weights.keys() == model.state_dict().keys() - tied


def test_saved_modeling_file_imports_only_installed_packages_and_its_config(saved):
    modeling_file = saved["image"].folder / "modeling_perceiver_lite.py"
    siblings = {name.removesuffix(".py") for name in CODE_FILES} - {"modeling_perceiver_lite"}
    assert set(get_relative_imports(modeling_file)) == siblings
    for name in CODE_FILES:
        assert "perceiver_lite" not in get_imports(saved["image"].folder / name)


def test_saving_a_config_alone_writes_its_code_and_auto_config(tmp_path):
    PerceiverLiteModelTester().get_config().save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"config.json", "configuration_perceiver_lite.py"}
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {"AutoConfig": AUTO_MAP["AutoConfig"]}


# ---------------------------------------------------------------------------------------------------------------------
# 2. Loading where the package is not installed: trust_remote_code
# ---------------------------------------------------------------------------------------------------------------------


def test_remote_code_loads_every_model_without_the_package(saved, tmp_path):
    """`AutoModel` and each head's `AutoModelFor...` load through the saved code alone, give the original outputs,
    and save again with their code and the full `auto_map`."""
    cases = [case for kind in MODELS for case in saved[kind].cases]
    assert len(cases) == 2 * len(MODELS) - 1  # the base model once, each head through AutoModel and its own Auto class
    assert_loaded_without_package(load_without_package(cases, tmp_path / "run"), cases)


def test_remote_code_loader_really_runs_without_the_package(tmp_path):
    """The subprocess check can fail: a folder without the code files cannot load where the package is blocked."""
    model = make_head("image")
    model.save_pretrained(tmp_path / "model")
    for name in CODE_FILES:
        (tmp_path / "model" / name).unlink()
    reference = write_reference(model, "AutoModel", torch.randn(3, 3, 8, 8), tmp_path / "reference.safetensors")
    cases = [{"folder": str(tmp_path / "model"), "auto_class": "AutoModel", "reference": str(reference)}]
    with pytest.raises(AssertionError, match="configuration_perceiver_lite"):
        load_without_package(cases, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Loading with the package imported: no trust_remote_code
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_package_loads_without_trust_remote_code(saved, kind):
    model_class, auto_class = MODELS[kind].model_class, MODELS[kind].auto_class
    assert type(AutoConfig.from_pretrained(saved[kind].folder)) is PerceiverLiteConfig
    model = getattr(transformers, auto_class).from_pretrained(saved[kind].folder).eval()
    assert type(model) is model_class
    assert_matches_references(model, saved[kind].cases, auto_class)
    base = AutoModel.from_pretrained(saved[kind].folder).eval()
    assert type(base) is PerceiverLiteModel
    assert_matches_references(base, saved[kind].cases, "AutoModel")


# ---------------------------------------------------------------------------------------------------------------------
# 4. push_to_hub, against a stand-in for the Hub client
# ---------------------------------------------------------------------------------------------------------------------


class FakeHubApi:
    """Stands in for the `HfApi` behind transformers' `hf_api()`: records each call and writes what a commit or an
    upload would send into `root / repo_id`, the "remote" repository."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        self.repo(repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, sorted(operation.path_in_repo for operation in operations)))
        for operation in operations:
            self._upload(operation.path_or_fileobj, repo_id, operation.path_in_repo)
        return SimpleNamespace(commit_url=f"fake://{repo_id}")

    def upload_folder(
        self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
        run_as_future=False, **kwargs,
    ):  # fmt: skip
        files = [path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*") if path.is_file()]
        files = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, files))
        for name in files:
            self._upload(Path(folder_path) / name, repo_id, os.path.join(path_in_repo or "", name))
        commit = SimpleNamespace(commit_url=f"fake://{repo_id}")
        if not run_as_future:  # Trainer pushes checkpoints in the background
            return commit
        future = Future()
        future.set_result(commit)
        return future

    def _upload(self, source, repo_id, path_in_repo):
        destination = self.repo(repo_id) / path_in_repo
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


def install_fake_hub(root: Path, setattr=setattr) -> FakeHubApi:
    """Replaces the Hub client that transformers calls, and `ModelCard.load` of a repository (its README.md), with
    `FakeHubApi(root)`; `setattr` is pytest's `monkeypatch.setattr` where the change must be undone after a test."""
    hub = FakeHubApi(root)
    setattr(transformers.utils.hub, "_hf_api", hub)

    class RemoteModelCard(ModelCard):
        @classmethod
        def load(cls, repo_id_or_path, **kwargs):
            card_path = hub.repo(str(repo_id_or_path)) / "README.md"
            if not card_path.is_file():
                raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")
            return ModelCard.load(card_path)

    setattr(transformers.utils.hub, "ModelCard", RemoteModelCard)
    return hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    return install_fake_hub(tmp_path / "remote", monkeypatch.setattr)


def card_metadata(folder: Path) -> dict:
    return ModelCard.load(folder / "README.md").data.to_dict()


@pytest.mark.parametrize("kind", MODELS)
def test_model_push_to_hub_uploads_weights_code_and_model_card(fake_hub, kind):
    model = make_head(kind)
    model.push_to_hub("someone/tiny-perceiver")
    assert fake_hub.calls == [
        ("create_repo", "someone/tiny-perceiver"),
        ("create_commit", "someone/tiny-perceiver", sorted({*SAVED_FILES, "README.md"})),
    ]
    remote = fake_hub.repo("someone/tiny-perceiver")
    assert json.loads((remote / "config.json").read_text())["auto_map"] == AUTO_MAP
    metadata = card_metadata(remote)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == MODELS[kind].pipeline_tag
    assert {"perceiver", "perceiver-lite"} <= set(metadata["tags"])


def test_pushed_files_load_without_the_package(fake_hub, tmp_path):
    model = make_head("image")
    model.push_to_hub("someone/tiny-image", tags=["digits"])
    remote = fake_hub.repo("someone/tiny-image")
    assert {"perceiver", "digits"} <= set(card_metadata(remote)["tags"])
    cases = reference_cases("image", model, remote, tmp_path)
    assert_loaded_without_package(load_without_package(cases, tmp_path / "run"), cases)


def test_push_keeps_the_existing_model_card(fake_hub):
    remote = fake_hub.repo("someone/tiny-image")
    remote.mkdir(parents=True)
    (remote / "README.md").write_text("---\nlicense: mit\npipeline_tag: image-classification\n---\n\n# My model\n")
    make_head("image").push_to_hub("someone/tiny-image")
    card = ModelCard.load(remote / "README.md")
    assert "# My model" in card.text
    assert card.data.license == "mit"
    assert card.data.library_name == "transformers"
    assert "perceiver" in card.data.tags


def test_save_pretrained_with_push_to_hub(fake_hub, tmp_path):
    make_head("audio").save_pretrained(tmp_path / "audio", push_to_hub=True, repo_id="someone/tiny-audio")
    remote = fake_hub.repo("someone/tiny-audio")
    assert {path.name for path in remote.iterdir()} == {*SAVED_FILES, "README.md"}
    assert card_metadata(remote)["pipeline_tag"] == "audio-classification"


def tiny_image_dataset(config, size=12):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(size, *config.data_shape, generator=generator)
    labels = torch.arange(size) % config.num_labels
    return Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": labels.numpy()}).with_format("torch")


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def test_trainer_push_to_hub_uploads_model_and_card_with_metrics(fake_hub, tmp_path):
    model = make_head("image")
    dataset = tiny_image_dataset(model.config)
    args = TrainingArguments(
        str(tmp_path / "output"), max_steps=2, per_device_train_batch_size=3, eval_strategy="steps", eval_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, hub_model_id="someone/tiny-trainer", disable_tqdm=True,
    )  # fmt: skip
    trainer = PerceiverLiteTrainer(model, args, train_dataset=dataset, eval_dataset=dataset, compute_metrics=accuracy)
    trainer.train()
    eval_accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.push_to_hub(dataset_tags="tiny-images", dataset="tiny images")

    assert fake_hub.calls[0] == ("create_repo", "someone/tiny-trainer")
    assert fake_hub.calls[-1][0] == "upload_folder"
    remote = fake_hub.repo("someone/tiny-trainer")
    assert {*SAVED_FILES, "README.md"} <= {path.name for path in remote.iterdir()}
    assert not [path.name for path in remote.iterdir() if path.name.startswith("pytorch_model")]
    assert json.loads((remote / "config.json").read_text())["auto_map"] == AUTO_MAP
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert {"perceiver", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.datasets == ["tiny-images"]
    assert card.data.metrics == ["accuracy"]
    [result] = card.data.eval_results
    assert (result.metric_type, result.dataset_type) == ("accuracy", "tiny-images")
    assert result.metric_value == pytest.approx(eval_accuracy)

    cases = reference_cases("image", model.eval(), remote, tmp_path)
    assert_loaded_without_package(load_without_package(cases, tmp_path / "run"), cases)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Loading options
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), ("auto", torch.float32)]
)
def test_dtype(saved, dtype, expected):
    model = PerceiverLiteForImageClassification.from_pretrained(saved["image"].folder, dtype=dtype).eval()
    assert {parameter.dtype for parameter in model.parameters()} == {expected}
    case = saved["image"].cases[-1]
    with safe_open(case["reference"], framework="pt") as reference:
        inputs, expected_logits = reference.get_tensor("inputs"), reference.get_tensor("expected")
    with torch.no_grad():
        logits = model(inputs.to(expected)).logits
    assert logits.dtype == expected
    atol = ATOL if expected == torch.float32 else 0.1
    torch.testing.assert_close(logits.float(), expected_logits, atol=atol, rtol=0)


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    make_head("image").to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert PerceiverLiteForImageClassification.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert PerceiverLiteForImageClassification.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("offload", [False, True], ids=["auto", "disk-offload"])
def test_device_map_auto(saved, tmp_path, offload):
    memory = {"cpu": "30KB", **({0: "0GB"} if torch.cuda.is_available() else {})}  # too small: all on disk
    kwargs = {"max_memory": memory, "offload_folder": tmp_path} if offload else {}
    model = PerceiverLiteForImageClassification.from_pretrained(saved["image"].folder, device_map="auto", **kwargs)
    device = "cuda" if torch.cuda.is_available() and not offload else "cpu"  # offloaded: inputs on the CPU
    if offload:
        assert set(model.hf_device_map.values()) == {"disk"}
    else:
        assert {parameter.device.type for parameter in model.parameters()} == {device}
    assert_matches_references(model.eval(), saved["image"].cases, "AutoModelForImageClassification", device)


def test_sharded_checkpoint_round_trips(saved, tmp_path):
    saved["image"].model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(saved["image"].model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert_matches_references(model, saved["image"].cases, "AutoModelForImageClassification")


def load_with_report(model_class, folder, **kwargs):
    with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
        model = model_class.from_pretrained(folder, **kwargs)
    return model, captured.out


def test_base_checkpoint_into_a_head_initialises_the_classifier_with_a_warning(saved):
    head, report = load_with_report(PerceiverLiteForImageClassification, saved["base"].folder)
    for name in ("classifier.dense.weight", "classifier.dense.bias", "classifier.norm.weight"):
        assert name in report
    assert "MISSING" in report and "newly initialized" in report
    base_state = saved["base"].model.state_dict()
    for name, tensor in head.perceiver.state_dict().items():
        torch.testing.assert_close(tensor, base_state[name], atol=0, rtol=0)


def test_head_checkpoint_into_a_head_with_other_labels(saved):
    folder = saved["image"].folder
    labels = {i: f"class_{i}" for i in range(5)}
    head, report = load_with_report(
        PerceiverLiteForImageClassification, folder, id2label=labels, label2id={v: k for k, v in labels.items()},
        ignore_mismatched_sizes=True,
    )  # fmt: skip
    assert head.config.num_labels == 5 and head.classifier.dense.weight.shape == (5, head.config.dim)
    assert "MISMATCH" in report and "classifier.dense.weight" in report and "torch.Size([3, 32])" in report
    assert "classifier.norm.weight" not in report  # same shape: loaded from the checkpoint
    original = saved["image"].model.state_dict()
    for name, tensor in head.state_dict().items():
        if not name.startswith("classifier.dense"):
            torch.testing.assert_close(tensor, original[name], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        PerceiverLiteForImageClassification.from_pretrained(folder, num_labels=5)


@pytest.mark.parametrize(
    "variant", [{}, {"position_encoding_type": "learned", "decoder_query_type": "learned"}], ids=["fourier", "learned"]
)
@pytest.mark.parametrize("kind", PER_ELEMENT)
def test_per_element_heads_round_trip_exactly(kind, variant, tmp_path):
    """Loaded by their class (nothing missing, unexpected or mismatched) and by their Auto class: the same weights, and
    the same logits and loss on padded, labelled inputs."""
    model = make_head(kind, **variant)
    inputs = labelled_inputs(kind)
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    loaded, info = MODELS[kind].model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    auto = getattr(transformers, MODELS[kind].auto_class).from_pretrained(tmp_path)
    for restored in (loaded.eval(), auto.eval()):
        torch.testing.assert_close(restored.state_dict(), model.state_dict(), rtol=0, atol=0)
        outputs = restored(**inputs)
        torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(outputs.loss, expected.loss, rtol=0, atol=0)


def test_tied_lm_head_stays_tied_after_loading(tmp_path):
    model = make_head("mlm")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embeddings.weight
    assert loaded.get_output_embeddings() is loaded.lm_head and loaded.get_input_embeddings() is loaded.embeddings
    # still tied in training: one step moves both
    with torch.no_grad():
        loaded.embeddings.weight[5] += 1.0
    assert torch.equal(loaded.lm_head.weight[5], loaded.embeddings.weight[5])


def test_untied_lm_head_is_its_own_and_survives_loading(tmp_path):
    model = make_head("mlm", tie_word_embeddings=False, decoder_dim=24)
    assert model.lm_head.weight is not model.embeddings.weight
    assert model.lm_head.weight.shape == (VOCAB_SIZE, 24) and model.embeddings.weight.shape == (VOCAB_SIZE, 16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.embeddings.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_a_masked_lm_checkpoint_starts_a_token_classifier(tmp_path):
    """Pre-train with masked LM, fine-tune per token: every weight but the classifier carries over (lm_head is left)."""
    model = make_head("mlm")
    model.save_pretrained(tmp_path)
    tagger, info = AutoModelForTokenClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(tagger) is PerceiverLiteForTokenClassification
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert info["unexpected_keys"] == {"lm_head.bias"} and not info["mismatched_keys"]
    for name, value in tagger.state_dict().items():
        if not name.startswith("classifier."):
            torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Bad files fail clearly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_copy(saved, tmp_path):
    """A copy of the saved image classifier, to damage."""
    folder = tmp_path / "broken"
    shutil.copytree(saved["image"].folder, folder)
    return folder


LOADERS = {
    "class": PerceiverLiteForImageClassification.from_pretrained,
    "auto": transformers.AutoModelForImageClassification.from_pretrained,
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("keep_bytes", [0.5, 100], ids=["half", "header-only"])
def test_truncated_weights_name_the_file(broken_copy, loader, keep_bytes):
    weights = broken_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep_bytes) if keep_bytes < 1 else keep_bytes])
    with pytest.raises(OSError, match=rf"{weights}.* is truncated or corrupt"):
        LOADERS[loader](broken_copy)


def edit_config(folder: Path, **changes):
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return config_file


@pytest.mark.parametrize("load", [PerceiverLiteForImageClassification, PerceiverLiteConfig], ids=["model", "config"])
def test_config_of_another_model_type_is_refused(broken_copy, load):
    config_file = edit_config(broken_copy, model_type="bert")
    with pytest.raises(ValueError, match=rf"`{config_file}` describes a `bert` model, not `perceiver_lite`"):
        load.from_pretrained(broken_copy)


def test_auto_class_refuses_a_config_of_another_model(broken_copy):
    (broken_copy / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="ViTConfig"):
        transformers.AutoModelForAudioClassification.from_pretrained(broken_copy)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "changes, field",
    [
        ({"layers_indice": [0, 5]}, "layers_indice"),
        ({"dim": 30}, "dim"),
        ({"ff_dropout": 1.5}, "ff_dropout"),
        ({"cross_kv_dim": 7}, "cross_kv_dim"),
        ({"decoder_query_type": "random"}, "decoder_query_type"),
    ],
)
def test_invalid_config_fields_name_the_file_and_field(broken_copy, loader, changes, field):
    config_file = edit_config(broken_copy, **changes)
    with pytest.raises(ValueError, match=rf"`{config_file}` is not a valid PerceiverLite config: .*`{field}`"):
        LOADERS[loader](broken_copy)


def test_checkpoint_missing_a_tensor_warns_with_its_name(broken_copy):
    weights = load_file(broken_copy / "model.safetensors")
    del weights["perceiver.latents"]
    save_file(weights, broken_copy / "model.safetensors", metadata={"format": "pt"})
    _, report = load_with_report(PerceiverLiteForImageClassification, broken_copy)
    assert "perceiver.latents" in report and "MISSING" in report


def test_plain_config_dict_errors_say_so():
    with pytest.raises(ValueError, match="The config is not a valid PerceiverLite config: .*`heads`"):
        PerceiverLiteConfig.from_dict({"dim": 30, "heads": 4})
    with pytest.raises(ValueError, match="The config describes a `vit` model"):
        PerceiverLiteConfig.from_dict({"model_type": "vit"})


# ---------------------------------------------------------------------------------------------------------------------
# 4 (end). scripts/train.py --push_to_hub
# ---------------------------------------------------------------------------------------------------------------------


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_push_to_hub(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the script refuses to push offline
    tiny_model = ["--num_latent_tokens", "8", "--dim", "32", "--heads", "4", "--cross_heads", "2", "--num_bands", "4"]
    metrics = load_train_script().main(
        ["--output_dir", str(tmp_path / "digits"), "--max_steps", "2", "--push_to_hub", "--hub_model_id",
         "someone/perceiver-digits", "--disable_tqdm", "true", *tiny_model]
    )  # fmt: skip

    remote = fake_hub.repo("someone/perceiver-digits")
    assert {*SAVED_FILES, "README.md"} <= {path.name for path in remote.iterdir()}
    assert json.loads((remote / "config.json").read_text())["auto_map"] == AUTO_MAP
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "perceiver" in card.data.tags
    assert card.data.datasets
    assert card.data.metrics == ["accuracy"]
    [result] = card.data.eval_results
    assert result.metric_value == pytest.approx(metrics["eval_accuracy"])

    model = PerceiverLiteForImageClassification.from_pretrained(tmp_path / "digits").eval()
    cases = reference_cases("image", model, remote, tmp_path)
    assert_loaded_without_package(load_without_package(cases, tmp_path / "run"), cases)
