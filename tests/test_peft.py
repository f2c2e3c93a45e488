"""PEFT LoRA on every PerceiverLite class: the adapted model equals its merged model (outputs and gradients), a LoRA
fine-tune through Trainer leaves the base weights alone and saves and loads as an adapter, gradient checkpointing with
frozen base weights gives the gradients of a plain run."""

import copy

import pytest
import torch
from conftest import PerceiverLiteModelTester, training_arguments
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import Trainer

from perceiver_lite import (
    PerceiverLiteForAudioClassification,
    PerceiverLiteForImageClassification,
    PerceiverLiteForSequenceClassification,
    PerceiverLiteModel,
)


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
NUM_LABELS = 3
BATCH_SIZE = 3
VOCAB_SIZE = 262


def lora_config(**overrides) -> LoraConfig:
    """Rank 4 on every projection; `init_lora_weights=False` makes `lora_B` non-zero, so the adapter changes outputs.
    `lora_alpha=8` makes the scaling 2, not 1, so that a missing scaling shows."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGET_MODULES, init_lora_weights=False)
    return LoraConfig(**{**kwargs, **overrides})


def lengths(batch_size: int, max_length: int) -> torch.Tensor:
    """Valid lengths, the first sample unpadded, the others from `max_length // 2` to `max_length - 1`."""
    padded = torch.randint(max_length // 2, max_length, (batch_size,))
    padded[0] = max_length
    return padded


def prefix_mask(valid: torch.Tensor, max_length: int) -> torch.Tensor:
    """`(B, T)`: 1 for the first `valid[b]` elements of sample b, 0 for the padding after them."""
    return (torch.arange(max_length) < valid[:, None]).long()


def base_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """Channel-first images `(B, 3, 8, 8)`, no mask."""
    return {"inputs": torch.randn(batch_size, 3, 8, 8)}


def image_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """Images `(B, 3, 8, 8)` padded at the bottom and right, with their padding mask `(B, 8, 8)`."""
    rows = prefix_mask(lengths(batch_size, 8), 8)  # (B, H)
    columns = prefix_mask(lengths(batch_size, 8), 8)  # (B, W)
    attention_mask = rows[:, :, None] * columns[:, None, :]  # (B, H, W)
    pixel_values = torch.randn(batch_size, 3, 8, 8) * attention_mask[:, None]
    return {"pixel_values": pixel_values, "attention_mask": attention_mask}


def text_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """Byte ids `(B, 12)` with padding (id 0) masked out."""
    attention_mask = prefix_mask(lengths(batch_size, 12), 12)
    input_ids = torch.randint(1, VOCAB_SIZE, (batch_size, 12)) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def audio_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """One-channel signals `(B, 16)` with padding (zeros) masked out."""
    attention_mask = prefix_mask(lengths(batch_size, 16), 16)
    return {"input_values": torch.randn(batch_size, 16) * attention_mask, "attention_mask": attention_mask}


# case: (model class, data_shape, extra config fields, inputs for a batch size, name of the float input or None)
CASES = {
    "base": (PerceiverLiteModel, (3, 8, 8), {}, base_inputs, "inputs"),
    "image": (PerceiverLiteForImageClassification, (3, 8, 8), {}, image_inputs, "pixel_values"),
    "text": (PerceiverLiteForSequenceClassification, (8, 12), {"vocab_size": VOCAB_SIZE}, text_inputs, None),
    "audio": (PerceiverLiteForAudioClassification, (1, 16), {}, audio_inputs, "input_values"),
}

# Adapted modules whose weight gradients are checked: the cross-attention's key projection of the block that runs
# twice with shared weights (it sees the inputs and their mask), and a feed-forward layer of the block that runs once.
CHECKED_MODULES = ["blocks.1.cross_layer.cross_attention.k_proj", "blocks.0.layers.0.mlp.fc2"]


def tiny_model(case: str, **config_overrides):
    model_class, data_shape, config_kwargs, _, _ = CASES[case]
    tester = PerceiverLiteModelTester(data_shape=data_shape, num_labels=NUM_LABELS, **config_kwargs)
    return model_class(tester.get_config(**config_overrides))


def module_path(case: str, name: str) -> str:
    """`name` inside the case's model: the heads hold the base model as `perceiver`."""
    return name if case == "base" else f"perceiver.{name}"


def output_tensors(case: str, outputs) -> dict[str, torch.Tensor]:
    if case == "base":
        return {"last_hidden_state": outputs.last_hidden_state, "pooler_output": outputs.pooler_output}
    return {"logits": outputs.logits}


def assert_close_on_scale(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5, msg=None):
    """Close within `tolerance`, relative to each element and to the largest magnitude of `expected`: gradients are
    sums of many products, whose float32 rounding grows with their scale."""
    assert actual is not None and expected is not None, msg
    atol = tolerance * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=atol, msg=msg)


def forward_and_backward(case: str, model: nn.Module, plain_model: nn.Module, inputs: dict, cotangents: dict):
    """Outputs of `model` on its own copy of `inputs`, and the float leaf whose gradient `sum(outputs * cotangents)`
    gave: the float input, or for token ids the (frozen, here made trainable) token embedding. `plain_model` is the
    transformers model inside `model` (the model itself when not wrapped)."""
    inputs = {name: tensor.clone() for name, tensor in inputs.items()}
    float_input = CASES[case][4]
    if float_input is None:
        leaf = plain_model.get_input_embeddings().weight
        leaf.requires_grad_(True)
    else:
        leaf = inputs[float_input].requires_grad_(True)
    outputs = output_tensors(case, model(**inputs))
    sum((outputs[name] * cotangents[name]).sum() for name in outputs).backward()
    return outputs, leaf


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_lora_equals_merged_model(case, attn_implementation):
    """An adapted model and its `merge_and_unload()` give the same outputs and the same gradients w.r.t. the float
    input; for adapted modules, `dL/dB = scaling * dL/dW @ A.T` and `dL/dA = scaling * B.T @ dL/dW`, with W the merged
    weight, as the chain rule through `W + scaling * B @ A` says."""
    model = tiny_model(case)
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    if case != "base":
        assert model.perceiver.config._attn_implementation == attn_implementation
    peft_model = get_peft_model(model.eval(), lora_config()).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    assert not any("lora" in name for name, _ in merged.named_modules())
    inputs = CASES[case][3](BATCH_SIZE)

    with torch.no_grad(), peft_model.disable_adapter():
        without_adapter = output_tensors(case, peft_model(**inputs))
    for name in CHECKED_MODULES:
        merged.get_submodule(module_path(case, name)).weight.requires_grad_(True)
    cotangents = {name: torch.randn_like(tensor) for name, tensor in without_adapter.items()}
    lora_outputs, lora_leaf = forward_and_backward(case, peft_model, peft_model.get_base_model(), inputs, cotangents)
    merged_outputs, merged_leaf = forward_and_backward(case, merged, merged, inputs, cotangents)

    for name, expected in merged_outputs.items():
        assert (lora_outputs[name] - without_adapter[name]).abs().max() > 1e-3, f"the adapter does not change {name}"
        torch.testing.assert_close(lora_outputs[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    assert lora_leaf.grad is not None and lora_leaf.grad.abs().max() > 0
    assert_close_on_scale(lora_leaf.grad, merged_leaf.grad)

    for name in CHECKED_MODULES:
        lora_module = peft_model.get_base_model().get_submodule(module_path(case, name))
        lora_a, lora_b = lora_module.lora_A["default"].weight, lora_module.lora_B["default"].weight
        scaling = lora_module.scaling["default"]
        assert scaling == 2.0
        weight_grad = merged.get_submodule(module_path(case, name)).weight.grad
        assert weight_grad is not None and weight_grad.abs().max() > 0, name
        assert_close_on_scale(lora_b.grad, scaling * weight_grad @ lora_a.detach().T, msg=f"{name}: lora_B")
        assert_close_on_scale(lora_a.grad, scaling * lora_b.detach().T @ weight_grad, msg=f"{name}: lora_A")


def image_dataset(num_samples: int) -> Dataset:
    """Images `(3, 8, 8)` whose brightness gives the class, and a `label` column, as Trainer gets them from `datasets`."""
    labels = torch.arange(num_samples) % NUM_LABELS
    pixel_values = torch.randn(num_samples, 3, 8, 8) * 0.2 + (labels[:, None, None, None] - 1)
    return Dataset.from_dict({"pixel_values": pixel_values.tolist(), "label": labels.tolist()}).with_format("torch")


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state inside a peft model, under the plain model's names: without the adapters and the trainable
    copies, with `base_layer.` and `original_module.` (where peft keeps the originals) taken out of the names."""
    weights = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        weights[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return weights


def test_lora_fine_tune_with_trainer_saves_and_loads(tmp_path):
    """A LoRA fine-tune (and a trainable copy of the classifier) through Trainer: the adapters and the copy change,
    every base weight stays bit-identical, the losses are finite; the saved adapter holds only adapters and the copy,
    and loads onto a fresh model with the same base weights into the trained model's logits."""
    model = tiny_model("image")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGET_MODULES, modules_to_save=["classifier"]))
    trainable = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("lora_B" in name for name in trainable)
    assert any(".modules_to_save.default." in name for name in trainable)
    assert all("lora_" in name or ".modules_to_save.default." in name for name in trainable), list(trainable)

    args = training_arguments(
        tmp_path / "run", max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=image_dataset(24))
    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, parameter in peft_model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, trainable[name]), f"{name} did not train"
    after = base_weights(peft_model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"base weight {name} changed"

    peft_model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        saved_names = list(saved.keys())
    assert any("lora_B" in name for name in saved_names) and any("classifier" in name for name in saved_names)
    assert all("lora_" in name or "classifier" in name for name in saved_names), saved_names

    torch.manual_seed(1)  # other initial weights, replaced by the base weights
    fresh = tiny_model("image")
    fresh.load_state_dict(before)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    peft_model.eval()
    pixel_values = image_dataset(6)[:]["pixel_values"]  # held-out images of the same kind
    with torch.no_grad():
        expected = peft_model(pixel_values=pixel_values).logits
        with loaded.disable_adapter():
            untrained = loaded(pixel_values=pixel_values).logits
        logits = loaded(pixel_values=pixel_values).logits
    assert (expected - untrained).abs().max() > 1e-3, "the fine-tune did not change the logits"
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_with_lora_gives_the_gradients_without_it():
    """Reentrant gradient checkpointing on frozen base weights, as README says (`gradient_checkpointing_enable` and
    `enable_input_require_grads` before `get_peft_model`): every LoRA parameter gets a non-zero gradient, equal to the
    gradient without checkpointing; the checkpointed layers run again in the backward pass."""
    model = tiny_model("image", ff_dropout=0.0, attention_dropout=0.0)  # train mode is deterministic
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed.enable_input_require_grads()
    assert checkpointed.is_activation_checkpointing and not model.is_activation_checkpointing
    torch.manual_seed(1)
    plain_peft = get_peft_model(model, lora_config()).train()
    torch.manual_seed(1)
    checkpointed_peft = get_peft_model(checkpointed, lora_config()).train()
    inputs = {**image_inputs(BATCH_SIZE), "labels": torch.tensor([0, 2, 1])}

    def gradients(peft_model) -> tuple[dict[str, torch.Tensor], int]:
        layer_calls = []
        mlp = peft_model.get_base_model().perceiver.blocks[0].layers[0].mlp  # inside the checkpointed forward
        handle = mlp.register_forward_pre_hook(lambda module, args: layer_calls.append(1))
        peft_model(**inputs).loss.backward()
        handle.remove()
        lora = {name: p.grad for name, p in peft_model.named_parameters() if "lora_" in name}
        return lora, len(layer_calls)

    expected, plain_calls = gradients(plain_peft)
    actual, checkpointed_calls = gradients(checkpointed_peft)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the recomputation in the backward pass
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name, grad in actual.items():
        assert grad is not None and grad.abs().max() > 0, f"no gradient on {name}"
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-4 * expected[name].abs().max().item(), msg=name)


@pytest.mark.parametrize("case", CASES)
def test_get_input_embeddings_is_the_module_the_inputs_go_through(case):
    """`get_input_embeddings()` returns a module on every class, the one whose output the encoder reads: the token
    embedding of the sequence head, the position-feature embeddings elsewhere. `enable_input_require_grads()` (which
    PEFT calls under gradient checkpointing) hooks it, and the model's float leaf then gets a gradient through it."""
    model = tiny_model(case)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Module)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    calls = []  # after the hook of `enable_input_require_grads`
    embeddings.register_forward_hook(lambda module, args, output: calls.append(output.requires_grad))
    outputs = output_tensors(case, model(**CASES[case][3](BATCH_SIZE)))
    assert calls == [True]
    assert all(tensor.requires_grad for tensor in outputs.values())
