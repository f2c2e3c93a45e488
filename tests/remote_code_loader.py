"""Loads saved PerceiverLite folders the way a user without the package does: `trust_remote_code=True`.

Run by `conftest.load_without_package` (for `test_hub.py` and `test_conversion.py`) in a subprocess (`python -I`,
from a folder outside the repository, with `HF_HUB_OFFLINE=1` and a fresh `HF_MODULES_CACHE`), as
`python -I remote_code_loader.py CASES_JSON REPORT_JSON`. `import perceiver_lite` is blocked first, so only the code
files saved beside the weights can define the model. Each case names a folder, an Auto class and a reference file
(`inputs`, `expected`, and the output's name in its metadata); the report gives, per case, the class that loaded, the
largest difference from the reference, and what a re-save of the loaded model writes.
"""

import importlib.abc
import json
import os
import sys
import tempfile


class BlockPerceiverLite(importlib.abc.MetaPathFinder):
    """Makes `import perceiver_lite` fail although the package is installed (editable) in this environment."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "perceiver_lite":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by remote_code_loader.py)", name=name)
        return None


sys.meta_path.insert(0, BlockPerceiverLite())

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402


def package_importable() -> bool:
    try:
        import perceiver_lite  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def read_reference(path):
    with safe_open(path, framework="pt") as reference:
        return reference.get_tensor("inputs"), reference.get_tensor("expected"), reference.metadata()["output"]


def max_difference(model, inputs, expected, output_name) -> float:
    with torch.no_grad():
        output = getattr(model(inputs), output_name)
    return (output.float() - expected.float()).abs().max().item()


def load_case(case: dict, resave_root: str) -> dict:
    auto_class = getattr(transformers, case["auto_class"])
    model = auto_class.from_pretrained(case["folder"], trust_remote_code=True).eval()
    inputs, expected, output_name = read_reference(case["reference"])
    resaved = os.path.join(resave_root, f"{os.path.basename(case['folder'])}-{case['auto_class']}")
    model.save_pretrained(resaved)
    reloaded = auto_class.from_pretrained(resaved, trust_remote_code=True).eval()
    with open(os.path.join(resaved, "config.json")) as config_file:
        resaved_auto_map = json.load(config_file).get("auto_map")
    return {
        **case,
        "model_class": type(model).__name__,
        "module": type(model).__module__,
        "max_abs_diff": max_difference(model, inputs, expected, output_name),
        "resaved_files": sorted(os.listdir(resaved)),
        "resaved_auto_map": resaved_auto_map,
        "resaved_max_abs_diff": max_difference(reloaded, inputs, expected, output_name),
    }


def main(cases_json: str, report_path: str):
    cases = json.loads(cases_json)
    report = {"package_importable_before": package_importable()}
    with tempfile.TemporaryDirectory() as resave_root:
        report["cases"] = [load_case(case, resave_root) for case in cases]
    report["package_importable_after"] = package_importable()
    report["package_modules"] = sorted(name for name in sys.modules if name.partition(".")[0] == "perceiver_lite")
    with open(report_path, "w") as report_file:
        json.dump(report, report_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
