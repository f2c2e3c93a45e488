"""PerceiverLiteForCausalLM (Perceiver AR): the forward (latent logits, shifted loss, eager vs sdpa, left padding,
prefix dropout), causality, generation with the cache token for token equal to generation without it and to a loop of
full forwards on the last context window (greedy, sampling, beam search; prompts shorter than the latent window, inside
the context, longer than it; generations past the longest context), the ecosystem (Auto class, text-generation pipeline
with PerceiverTokenizer, trust_remote_code, Trainer with DataCollatorForLanguageModeling and gradient checkpointing, PEFT
LoRA, torch.export) and the input errors."""

import copy

import pytest
import torch
from conftest import PerceiverLiteModelTester, training_arguments
from datasets import Dataset
from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from test_hub import load_without_package
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    DynamicCache,
    PerceiverTokenizer,
    Trainer,
    pipeline,
)

from perceiver_lite import PerceiverLiteConfig, PerceiverLiteForCausalLM, PerceiverLiteModel
from perceiver_lite.modeling_perceiver_lite import (
    PerceiverLiteCausalLMCache,
    PerceiverLiteSlidingCausalLMCache,
    rotary_cos_sin,
)


CONTEXT = 12  # data_shape[1]: the longest context
LATENTS = 4  # num_latent_tokens: the latent window
VOCAB_SIZE = 262
# "repeated": block 1 runs twice and every block cross-attends (a cross-attention's cached context shared by two runs);
# widths differ (dim 24, embeddings 16): the latents and the LM head go through `latent_proj` / `lm_proj`.
# "paper": one cross-attention then latent self-attention, dim = embedding width (the LM head is the embedding).
CONFIGS = {
    "repeated": dict(dim=24, layers_indice=(0, 1, 1), num_latent_transformers_in_layers=(1, 1)),
    "paper": dict(dim=16, layers_indice=(0, 1), num_latent_transformers_in_layers=(0, 2), cross_attend_blocks=[0]),
}


def tiny_config(kind: str = "repeated", **overrides) -> PerceiverLiteConfig:
    """Embedding width 16, context 12, latent window 4; weights at `initializer_range=0.3`, so that the logits of a
    random model are far apart and greedy choices are not near-ties."""
    fields = {**CONFIGS[kind], "position_encoding_type": "rotary", "initializer_range": 0.3, **overrides}
    tester = PerceiverLiteModelTester(data_shape=(16, CONTEXT), num_latent_tokens=LATENTS, heads=2, cross_heads=2)
    return tester.get_config(**fields)


def tiny_model(kind: str = "repeated", dtype=torch.float64, **overrides) -> PerceiverLiteForCausalLM:
    return PerceiverLiteForCausalLM(tiny_config(kind, **overrides)).to(dtype).eval()


def random_ids(batch_size: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (batch_size, length))


def full_forward_loop(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards, each on the last `CONTEXT` tokens: what generation must equal."""
    sequence = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(sequence[:, -CONTEXT:]).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


def generate(model, prompt, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, **kwargs}
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("length", [3, LATENTS, CONTEXT])
def test_logits_cover_the_latent_positions_and_the_loss_is_shifted(kind, length):
    """Logits `(B, min(T, N), vocab)`; the loss is the cross-entropy of each latent position's logits against the next
    token, -100 not scored, the last latent position without a target."""
    model = tiny_model(kind)
    input_ids = random_ids(3, length)
    labels = input_ids.clone()
    labels[0, -2] = -100
    outputs = model(input_ids, labels=labels)
    latents = min(length, LATENTS)
    assert outputs.logits.shape == (3, latents, VOCAB_SIZE)
    targets = labels[:, -latents:][:, 1:]  # the next token of every latent position but the last
    expected = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(outputs.loss, expected.float())  # transformers computes the loss in float32


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("keep", [1, 3, LATENTS + 2])
def test_logits_to_keep_returns_the_last_positions_logits(kind, keep):
    """The last `keep` of the latent positions' logits (all of them where `keep` is larger), and the loss of those
    positions, as the full forward computes them, though the last layer runs its queries for those positions alone."""
    model = tiny_model(kind)
    input_ids = random_ids(2, CONTEXT)
    full = model(input_ids, labels=input_ids)
    kept = model(input_ids, labels=input_ids, logits_to_keep=keep)
    rows = min(keep, LATENTS)
    assert kept.logits.shape == (2, rows, VOCAB_SIZE)
    torch.testing.assert_close(kept.logits, full.logits[:, -rows:], rtol=1e-12, atol=1e-12)
    if rows == 1:
        assert torch.isnan(kept.loss)  # no next token in the input to score, as transformers' loss of one token
        return
    expected = torch.nn.functional.cross_entropy(
        full.logits[:, -rows:-1].reshape(-1, VOCAB_SIZE), input_ids[:, -rows + 1 :].reshape(-1)
    )
    torch.testing.assert_close(kept.loss, expected.float())


def test_generate_asks_for_the_last_logits_only():
    """`generate` passes `logits_to_keep=1` to models whose forward takes it: the prompt's forward returns one
    position's logits, and the tokens are those of full forwards."""
    model = tiny_model()
    assert model._supports_logits_to_keep()
    shapes = []
    model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    prompt = random_ids(1, 7)
    tokens = generate(model, prompt, max_new_tokens=8)
    assert shapes[0] == (1, 1, VOCAB_SIZE)
    assert torch.equal(tokens, full_forward_loop(model, prompt, 8))


@pytest.mark.parametrize("kind", CONFIGS)
def test_hidden_states_are_the_latents_before_and_after_every_layer(kind):
    """`output_hidden_states=True`: one entry before the first layer and one after every layer run (a repeated block's
    again), each `(B, min(T, N), dim)`, equal to an independent computation (`band_hidden_states`, a forward for
    `T <= N`); the last is the final norm's output, from which the logits come; `logits_to_keep` trims the logits
    only."""
    model = tiny_model(kind)
    input_ids = random_ids(2, LATENTS)
    outputs = model(input_ids, output_hidden_states=True)
    expected = band_hidden_states(model, input_ids)
    num_layers = sum(len(model.blocks[i].layers) + (model.blocks[i].cross_layer is not None)
                     for i in model.config.layers_indice)  # fmt: skip
    assert len(outputs.hidden_states) == len(expected) == num_layers + 1
    for states, reference in zip(outputs.hidden_states, expected):
        torch.testing.assert_close(states, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs.logits, lm_logits(model, outputs.hidden_states[-1]), rtol=1e-12, atol=1e-12)
    assert model(input_ids).hidden_states is None
    kept = model(input_ids, output_hidden_states=True, logits_to_keep=1)
    assert kept.logits.shape == (2, 1, VOCAB_SIZE)
    for states, reference in zip(kept.hidden_states, outputs.hidden_states):
        torch.testing.assert_close(states, reference, rtol=1e-12, atol=1e-12)
    config_default = tiny_model(kind, output_hidden_states=True)
    config_default.load_state_dict(model.state_dict())
    assert len(config_default(input_ids).hidden_states) == num_layers + 1


@pytest.mark.parametrize("kind", CONFIGS)
def test_hidden_states_through_the_cache_are_the_full_forwards(kind):
    """Token by token through the exact cache, from 2 tokens to 20 (the latent window fills, then the context): each
    step's hidden states of the new position equal those of a full forward on the last `CONTEXT` tokens; a step covers
    the new token while the latent window grows and the whole window once it is recomputed."""
    model = tiny_model(kind)
    ids = random_ids(2, 20)
    cache = PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        model(ids[:, :2], cache=cache, use_cache=True)
        for position in range(2, 20):
            step = model(ids[:, position : position + 1], cache=cache, use_cache=True, output_hidden_states=True)
            full = model(ids[:, max(0, position + 1 - CONTEXT) : position + 1], output_hidden_states=True)
            assert all(s.shape[1] == (1 if position < LATENTS else LATENTS) for s in step.hidden_states)
            for states, reference in zip(step.hidden_states, full.hidden_states, strict=True):
                torch.testing.assert_close(states[:, -1], reference[:, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", CONFIGS)
def test_attentions_are_the_causal_probabilities_of_every_layer(kind):
    """`output_attentions=True` (eager): one latent self-attention `(B, heads, N, N)` per self-attention layer run and
    one cross-attention `(B, cross_heads, N, T)` per cross-attend run, the last layer's for every latent though the
    logits are kept for one; each row a distribution over the keys at its query's position or before."""
    model = tiny_model(kind, attn_implementation="eager")
    input_ids = random_ids(2, CONTEXT)
    outputs = model(input_ids, output_attentions=True, logits_to_keep=1)
    runs = [model.blocks[i] for i in model.config.layers_indice]
    assert len(outputs.attentions) == sum(len(block.layers) for block in runs)
    assert len(outputs.cross_attentions) == sum(block.cross_layer is not None for block in runs)
    query_positions = torch.arange(CONTEXT - LATENTS, CONTEXT)[:, None]  # the latents' positions
    for probabilities, key_positions in [
        *((p, torch.arange(CONTEXT - LATENTS, CONTEXT)) for p in outputs.attentions),
        *((p, torch.arange(CONTEXT)) for p in outputs.cross_attentions),
    ]:
        assert probabilities.shape == (2, 2, LATENTS, len(key_positions))
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, LATENTS, dtype=torch.float64))
        assert (probabilities[..., key_positions[None] > query_positions] == 0).all()
        assert (probabilities[..., key_positions[None] <= query_positions] > 0).all()


def test_attentions_through_the_cache_are_the_full_forwards():
    """A cached step once the latent window is full: its latent self-attentions equal the full forward's (the stack
    runs for the whole window); its first cross-attend runs for the new token alone, as the full forward's last row."""
    model = tiny_model(attn_implementation="eager")
    ids = random_ids(2, 8)
    cache = PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        model(ids[:, :7], cache=cache, use_cache=True)
        step = model(ids[:, 7:], cache=cache, use_cache=True, output_attentions=True)
        full = model(ids, output_attentions=True)
    for cached, reference in zip(step.attentions, full.attentions, strict=True):
        torch.testing.assert_close(cached, reference, rtol=1e-10, atol=1e-10)
    assert step.cross_attentions[0].shape == (2, 2, 1, 8)
    torch.testing.assert_close(step.cross_attentions[0], full.cross_attentions[0][:, :, -1:], rtol=1e-10, atol=1e-10)
    for cached, reference in zip(step.cross_attentions[1:], full.cross_attentions[1:], strict=True):
        torch.testing.assert_close(cached, reference, rtol=1e-10, atol=1e-10)


def test_generate_returns_the_hidden_states_of_every_step():
    model = tiny_model()
    prompt = random_ids(2, 3)
    outputs = generate(model, prompt, max_new_tokens=6, output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(outputs.sequences, generate(model, prompt, max_new_tokens=6))
    assert len(outputs.hidden_states) == 6 and all(len(step) == 7 for step in outputs.hidden_states)
    last = model(outputs.sequences[:, -CONTEXT:-1], output_hidden_states=True).hidden_states
    torch.testing.assert_close(outputs.hidden_states[-1][-1][:, -1], last[-1][:, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", CONFIGS)
def test_inputs_embeds_are_the_token_embeddings(kind):
    """`inputs_embeds=embeddings(input_ids)` gives the forward of `input_ids` (logits, loss, hidden states), left
    padded too, and step by step through the cache (the first step embeddings, then ids, as `generate` passes them);
    the embeddings' gradient reaches them."""
    model = tiny_model(kind)
    ids = random_ids(2, CONTEXT)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    embeds = model.embeddings(ids).detach().requires_grad_(True)
    by_ids = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    by_embeds = model(inputs_embeds=embeds, attention_mask=mask, labels=ids, output_hidden_states=True)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss, rtol=1e-12, atol=1e-12)
    for states, reference in zip(by_embeds.hidden_states, by_ids.hidden_states, strict=True):
        torch.testing.assert_close(states, reference, rtol=1e-12, atol=1e-12)
    by_embeds.loss.backward()
    assert embeds.grad.abs().sum() > 0
    cache = PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        model(inputs_embeds=embeds[:, :5], cache=cache, use_cache=True)
        for position in range(5, CONTEXT):
            step = model(ids[:, position : position + 1], cache=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, model(ids[:, : position + 1]).logits[:, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prompt_length", [3, CONTEXT + 2])
def test_generate_from_inputs_embeds_continues_as_from_the_ids(prompt_length):
    """`generate(inputs_embeds=...)` returns the new tokens alone (as for transformers' models), those that
    `generate(input_ids)` appends, with a prompt inside the latent window and one longer than the context."""
    model = tiny_model()
    prompt = random_ids(2, prompt_length)
    tokens = generate(model, prompt, max_new_tokens=10)
    embeds = model.embeddings(prompt).detach()
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0
    )
    assert torch.equal(from_embeds, tokens[:, prompt_length:])


def test_peft_prompt_tuning_trains_the_virtual_tokens():
    """PEFT's prompt tuning passes `inputs_embeds` (its virtual tokens, then the tokens' embeddings): the forward is
    the model's over those embeddings, and a step trains the virtual tokens alone."""
    model = tiny_model(dtype=torch.float32).train()
    width = model.config.data_shape[0]  # PEFT's `token_dim`: the token embedding's width
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_layers=1, token_dim=width, num_attention_heads=2
    )
    peft_model = get_peft_model(model, config)
    ids = random_ids(2, 6)
    outputs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    embeds = torch.cat([peft_model.get_prompt(batch_size=2), model.embeddings(ids)], dim=1)  # (2, 9, 16)
    labels = torch.cat([torch.full((2, 3), -100), ids], dim=1)
    torch.testing.assert_close(outputs.logits, model(inputs_embeds=embeds, labels=labels).logits, rtol=0, atol=0)
    outputs.loss.backward()
    trained = [name for name, parameter in peft_model.named_parameters() if parameter.grad is not None]
    assert trained == ["prompt_encoder.default.embedding.weight"]

    # generation with the virtual tokens, as README shows it: the base model's `generate` from the embeddings
    model.eval()
    with torch.no_grad():
        virtual = peft_model.get_prompt(batch_size=2)  # (2, 3, 16)
        tokens = model.generate(
            inputs_embeds=torch.cat([virtual, model.embeddings(ids)], dim=1), attention_mask=torch.ones(2, 9),
            max_new_tokens=5, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        sequence = ids
        for _ in range(5):
            context = torch.cat([virtual, model.embeddings(sequence)], dim=1)[:, -CONTEXT:]
            next_token = model(inputs_embeds=context).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(tokens, sequence[:, ids.shape[1] :])


def test_peft_p_tuning_trains_its_prompt_encoder():
    """PEFT's p-tuning passes the prompt encoder's virtual tokens through `inputs_embeds`, as prompt tuning does: the
    forward is the model's over those embeddings, and a step trains the prompt encoder alone."""
    model = tiny_model(dtype=torch.float32).train()
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_layers=1, token_dim=model.config.data_shape[0],
        num_attention_heads=2, encoder_hidden_size=8,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    ids = random_ids(2, 6)
    outputs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    embeds = torch.cat([peft_model.get_prompt(batch_size=2), model.embeddings(ids)], dim=1)  # (2, 9, 16)
    torch.testing.assert_close(outputs.logits, model(inputs_embeds=embeds).logits, rtol=0, atol=0)
    outputs.loss.backward()
    trained = {name for name, parameter in peft_model.named_parameters() if parameter.grad is not None}
    assert trained and all(name.startswith("prompt_encoder.default.") for name in trained), trained


def test_lm_head_is_tied_to_the_token_embedding():
    for kind in CONFIGS:
        model = tiny_model(kind)
        assert model.lm_head.weight is model.embeddings.weight
        assert (model.lm_proj is None) == (model.config.dim == 16)
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.embeddings.weight


@pytest.mark.parametrize("kind", CONFIGS)
def test_eager_equals_sdpa(kind):
    model = tiny_model(kind)
    input_ids = random_ids(3, CONTEXT)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("pad", [2, CONTEXT - LATENTS + 2])  # padding in the prefix only; padding among the latents
def test_left_padding_gives_the_unpadded_logits(kind, pad):
    """A left-padded sample predicts as the same tokens unpadded (rotary positions: only their differences count)."""
    model = tiny_model(kind)
    tokens = random_ids(1, CONTEXT - pad)
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(tokens).logits
        batched = model(torch.cat([padded, random_ids(1, CONTEXT)]), attention_mask=torch.cat([mask, torch.ones_like(mask)]))
    valid = min(LATENTS, tokens.shape[1])
    torch.testing.assert_close(batched.logits[0, -valid:], alone[0, -valid:], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("position", [0, 5, CONTEXT - 1])
def test_changing_a_token_moves_no_logit_before_it(implementation, position):
    """Every position a latent (latent window = context): changing token t leaves the logits of positions < t
    bit-identical and changes those of t and after."""
    model = tiny_model(num_latent_tokens=CONTEXT)
    model.set_attn_implementation(implementation)
    input_ids = random_ids(2, CONTEXT)
    changed = input_ids.clone()
    changed[:, position] = (changed[:, position] + 1 - 3) % (VOCAB_SIZE - 3) + 3
    with torch.no_grad():
        before, after = model(input_ids).logits, model(changed).logits
    assert torch.equal(before[:, :position], after[:, :position])
    assert ((before[:, position:] - after[:, position:]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("kind", CONFIGS)
def test_latents_see_the_prefix_and_the_earlier_latents_only(kind):
    """Latent window 4 in a context of 12: a prefix token moves every logit; a token at latent position t moves the
    logits from t on and none before."""
    model = tiny_model(kind)
    input_ids = random_ids(2, CONTEXT)
    with torch.no_grad():
        reference = model(input_ids).logits  # positions 8..11
        for position in (3, CONTEXT - 2):
            changed = input_ids.clone()
            changed[:, position] = (changed[:, position] + 1 - 3) % (VOCAB_SIZE - 3) + 3
            logits = model(changed).logits
            first_moved = max(position - (CONTEXT - LATENTS), 0)
            assert torch.equal(logits[:, :first_moved], reference[:, :first_moved])
            assert ((logits[:, first_moved:] - reference[:, first_moved:]).abs().amax(-1) > 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------------
# Prefix dropout
# ---------------------------------------------------------------------------------------------------------------------


def test_prefix_dropout_drops_that_fraction_of_the_prefix_per_sample():
    """In training, each sample's dropped prefix positions (the same random draw) change nothing, a kept one does, and
    `int(prefix * prefix_dropout)` are dropped; in evaluation every prefix token counts."""
    model = tiny_model(prefix_dropout=0.5).train()
    input_ids = random_ids(2, CONTEXT)
    prefix = CONTEXT - LATENTS

    def train_logits(ids):
        torch.manual_seed(7)
        return model(ids).logits

    torch.manual_seed(7)
    kept = torch.rand(2, prefix).argsort(dim=1)[:, : prefix - prefix // 2]  # the draw of `_drop_prefix`
    dropped = [sorted(set(range(prefix)) - set(row.tolist())) for row in kept]
    assert all(len(row) == prefix // 2 for row in dropped)
    reference = train_logits(input_ids)
    changed = input_ids.clone()
    for sample, positions in enumerate(dropped):
        changed[sample, positions] = 5
    torch.testing.assert_close(train_logits(changed), reference, rtol=1e-12, atol=1e-12)
    changed[0, kept[0, 0]] = (changed[0, kept[0, 0]] + 1 - 3) % (VOCAB_SIZE - 3) + 3
    assert (train_logits(changed)[0] - reference[0]).abs().max() > 1e-6
    model.eval()
    with torch.no_grad():
        assert (model(changed).logits - model(input_ids).logits).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


# prompt lengths: shorter than the latent window, filling it, inside the context, longer than the context
PROMPT_LENGTHS = [2, LATENTS, 7, CONTEXT + 3]


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("prompt_length", PROMPT_LENGTHS)
def test_greedy_generation_with_cache_equals_without_and_full_forwards(kind, prompt_length):
    """float64, 20 new tokens (past the context of 12): with the cache, without it, and a loop of full forwards on the
    last 12 tokens give the same tokens."""
    model = tiny_model(kind)
    prompt = random_ids(2, prompt_length)
    with_cache = generate(model, prompt, use_cache=True)
    without_cache = generate(model, prompt, use_cache=False)
    expected = full_forward_loop(model, prompt, 20)
    assert with_cache.shape == (2, prompt_length + 20)
    assert torch.equal(with_cache, expected)
    assert torch.equal(without_cache, expected)


@pytest.mark.parametrize("prompt_length", [2, CONTEXT + 3])
def test_sampling_with_cache_equals_without(prompt_length):
    model = tiny_model()
    prompt = random_ids(2, prompt_length)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(generate(model, prompt, use_cache=use_cache, do_sample=True, top_k=0, temperature=1.5))
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], generate(model, prompt))  # it sampled: not the greedy tokens


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("prompt_length", [2, 7])
def test_beam_search_with_cache_equals_without(kind, prompt_length):
    """Beam search reorders the cache (context keys/values, latent states, token embeddings) by beam."""
    model = tiny_model(kind)
    prompt = random_ids(2, prompt_length)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=16)
    with_cache = generate(model, prompt, use_cache=True, **kwargs)
    assert with_cache.shape == (4, prompt_length + 16)
    assert torch.equal(with_cache, generate(model, prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("sliding", [False, True], ids=["exact-cache", "sliding-cache"])
def test_left_padded_batch_generates_as_each_prompt_alone(kind, sliding):
    model = tiny_model(kind)

    def cache():
        return {"cache": PerceiverLiteSlidingCausalLMCache(model.config)} if sliding else {}

    prompts = [random_ids(1, length) for length in (3, 9, 6)]
    width = max(prompt.shape[1] for prompt in prompts)
    padded = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0)) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    batched = model.generate(padded, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, **cache())
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt, max_new_tokens=16, **cache())
        assert torch.equal(batched[row, width:], alone[0, prompt.shape[1] :])


def test_cache_slides_with_the_windows():
    """The cache holds the context's keys/values of the last min(seen, 12) positions, the latents' only while the latent
    window grows, the last 4 token embeddings, and their first cross-attend's outputs while the context starts at the
    first token (then the first cross-attend runs for the new token alone); an empty transformers cache is replaced by
    it."""
    model = tiny_model()
    first_cross_attend_rows = []
    model.blocks[0].cross_layer.register_forward_pre_hook(lambda module, args: first_cross_attend_rows.append(args[0].shape[1]))
    ids = random_ids(2, 3)
    outputs = model(ids, cache=DynamicCache(), use_cache=True)
    cache = outputs.cache
    assert isinstance(cache, PerceiverLiteCausalLMCache) and cache.get_seq_length() == 3
    context_layers, latent_layers = cache.layers[:2], cache.layers[2:]
    assert len(latent_layers) == 3  # block 0's layer once, block 1's twice
    for seen in range(4, 20):
        assert all(layer.keys.shape[2] == min(seen - 1, CONTEXT) for layer in context_layers)
        assert all((layer.get_seq_length() == seen - 1) == (seen - 1 <= LATENTS) for layer in latent_layers)
        next_id = outputs.logits[:, -1:].argmax(-1)
        outputs = model(next_id, cache=cache, use_cache=True)
        assert outputs.logits.shape == (2, 1, VOCAB_SIZE)
        assert cache.get_seq_length() == seen and cache.token_embeddings.shape[1] == min(seen, LATENTS)
        if seen <= CONTEXT:
            assert first_cross_attend_rows[-1] == 1 and cache.cross_states.shape == (2, min(seen, LATENTS), 24)
        else:
            assert first_cross_attend_rows[-1] == LATENTS and cache.cross_states is None
    assert all(layer.get_seq_length() == 0 for layer in cache.layers[2:])


def test_past_key_values_is_the_cache_under_its_old_name():
    model = tiny_model()
    ids = random_ids(2, 6)
    cache = model(ids[:, :5], use_cache=True).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        step = model(ids[:, 5:], past_key_values=cache, use_cache=True)
    assert step.cache is cache and cache.get_seq_length() == 6
    torch.testing.assert_close(step.logits[:, -1], model(ids).logits[:, -1], rtol=1e-10, atol=1e-10)


def cache_state(cache) -> dict:
    """Everything a cache carries into the next forward."""
    layers = {f"layer {i}": (layer.keys, layer.values) for i, layer in enumerate(cache.layers) if layer.is_initialized}
    return {"seen": cache.seen_tokens, "embeddings": cache.token_embeddings, "cross": cache.cross_states, **layers}


def assert_same_state(cache, expected, may_drop: bool = False):
    """Every part equal. With `may_drop`, `cache` may lack the latents' keys and values and the first cross-attend's
    outputs that `expected` holds (the exact cache forgets them once past the windows, and recomputes them)."""
    state, expected_state = cache_state(cache), cache_state(expected)
    latent_parts = {f"layer {i}" for i in range(len(cache.context_blocks), len(cache.layers))}
    for name, expected_part in expected_state.items():
        if may_drop and (name in latent_parts or name == "cross") and state.get(name) is None:
            continue
        torch.testing.assert_close(state[name], expected_part, rtol=1e-12, atol=1e-12)
    assert state.keys() <= expected_state.keys()


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("cache_class", [PerceiverLiteCausalLMCache, PerceiverLiteSlidingCausalLMCache])
@pytest.mark.parametrize("prompt_length", [2, LATENTS - 1, 7, CONTEXT - 2, CONTEXT])
@pytest.mark.parametrize("remove", [0, 2, 5])
def test_crop_forgets_the_last_tokens(kind, cache_class, prompt_length, remove):
    """After `activate_past_recording()`, 5 tokens one at a time (an assistant's drafts), then `crop(-remove)`: the
    cache is the one that never saw the removed tokens (every part, across the latent window and the context), and
    the next steps' logits are that cache's (for the exact cache: a full forward's)."""
    model = tiny_model(kind)
    ids = random_ids(2, prompt_length + 11)
    recorded, expected = cache_class(model.config), cache_class(model.config)
    kept = prompt_length + 5 - remove

    def feed(cache, start, stop):
        with torch.no_grad():
            return [model(ids[:, p : p + 1], cache=cache, use_cache=True).logits[:, -1] for p in range(start, stop)]

    with torch.no_grad():
        model(ids[:, :prompt_length], cache=recorded, use_cache=True)
        model(ids[:, :prompt_length], cache=expected, use_cache=True)
    recorded.activate_past_recording()
    feed(recorded, prompt_length, prompt_length + 5)
    recorded.crop(-remove)
    feed(expected, prompt_length, kept)
    assert_same_state(recorded, expected, may_drop=cache_class is PerceiverLiteCausalLMCache)
    ids[:, kept:] = random_ids(2, ids.shape[1] - kept)  # other tokens than the removed ones come next
    for step, expected_step in zip(feed(recorded, kept, kept + 6), feed(expected, kept, kept + 6), strict=True):
        torch.testing.assert_close(step, expected_step, rtol=1e-10, atol=1e-10)
    if cache_class is PerceiverLiteCausalLMCache:
        with torch.no_grad():
            full = model(ids[:, max(0, kept + 6 - CONTEXT) : kept + 6]).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("remove", [3, 5])
def test_crop_of_a_several_token_forward_across_the_latent_window(remove):
    """One forward of 6 tokens from 2 seen (past the latent window of 4: the latents' keys and values are dropped, and
    the first cross-attend runs for the whole window), cropped back to 5 or 3 tokens: every next step is the full
    forward's, and where every position is a latent again the cache keeps their states again."""
    model = tiny_model()
    ids = random_ids(2, 12)
    cache = PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        model(ids[:, :2], cache=cache, use_cache=True)
        cache.activate_past_recording()
        model(ids[:, 2:8], cache=cache, use_cache=True)
        cache.crop(-remove)
        assert cache.get_seq_length() == 8 - remove and cache.cached_latents() == 0
        for position in range(8 - remove, 12):
            step = model(ids[:, position : position + 1], cache=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, model(ids[:, : position + 1]).logits[:, -1], rtol=1e-10, atol=1e-10)
            assert cache.cached_latents() == (LATENTS if position < LATENTS else 0)


def test_crop_errors():
    model = tiny_model()
    cache = PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 5), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"crop.*int <= 0.*3"):
        cache.crop(3)
    with pytest.raises(ValueError, match=r"crop\(-1\).*activate_past_recording.*\(0\)"):
        cache.crop(-1)
    cache.crop(0)  # nothing to remove: allowed
    cache.activate_past_recording()
    with torch.no_grad():
        model(random_ids(2, 2), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"crop\(-3\).*\(2\)"):
        cache.crop(-3)
    assert cache.get_seq_length() == 7


def test_assisted_decoding_is_refused_with_the_reason():
    """Drafts scored by one forward would not be token-by-token decoding's predictions once the latent window is full
    (a position's prediction depends on the window ending at it): refused, before any forward."""
    model = tiny_model("paper")
    ids = random_ids(1, LATENTS + 4)
    with torch.no_grad():  # the premise: position -2 of a forward is not the forward up to it
        assert not torch.allclose(model(ids).logits[:, -2], model(ids[:, :-1]).logits[:, -1])
    for kwargs in (dict(assistant_model=tiny_model("paper")), dict(prompt_lookup_num_tokens=3)):
        with pytest.raises(ValueError, match=r"does not verify drafted tokens.*latent window ending at it"):
            generate(model, ids, **kwargs)


def test_assistant_of_another_model_drafts_its_greedy_tokens(monkeypatch):
    """As the assistant of a GPT-2 with the same byte vocabulary: the main model's tokens are its own greedy ones, and
    every draft is this model's greedy continuation (a loop of full forwards) of the tokens accepted so far, through
    a cache that the rejected drafts were cropped from."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    torch.manual_seed(0)
    main = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    main = main.to(torch.float64).eval()
    assistant = tiny_model()
    assistant.generation_config.update(  # 3 drafts a round, whatever its confidence
        num_assistant_tokens=3, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0
    )
    drafts = []
    get_candidates = AssistedCandidateGenerator.get_candidates

    def recording(self, input_ids, **kwargs):
        candidates, logits = get_candidates(self, input_ids, **kwargs)
        drafts.append((input_ids, candidates))
        return candidates, logits

    monkeypatch.setattr(AssistedCandidateGenerator, "get_candidates", recording)
    prompt = random_ids(1, 3)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assisted = main.generate(prompt, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, main.generate(prompt, **kwargs))
    assert len(drafts) > 2 and drafts[-1][0].shape[1] > CONTEXT  # several rounds, past the assistant's context
    for accepted, candidates in drafts:
        steps = candidates.shape[1] - accepted.shape[1]
        assert steps == min(3, 3 + 24 - accepted.shape[1] - 1)
        assert torch.equal(candidates, full_forward_loop(assistant, accepted, steps))


# ---------------------------------------------------------------------------------------------------------------------
# The sliding cache (approximate)
# ---------------------------------------------------------------------------------------------------------------------


def band_hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The latents `(B, T, dim)` of every position of `ids` `(B, T)`, any `T`, before the first and after every layer
    (the last after the final norm), by the model's layers with every position a latent, computed once: the
    cross-attentions see the last `CONTEXT` positions, the latent self-attentions the last `LATENTS`, with rotary
    positions by index. What the sliding cache computes, written independently of it; for `T <= LATENTS`, what a
    forward computes."""
    positions = torch.arange(ids.shape[1])[None]  # (1, T)
    difference = positions[0, None, :] - positions[0, :, None]  # (T, T): key minus query position

    def band(width: int) -> torch.Tensor:
        return ((difference <= 0) & (difference > -width))[None, None]  # (1, 1, T, T)

    def rotary(attention):
        angles = rotary_cos_sin(positions, attention.head_dim, model.config.rope_theta, torch.float64)
        return angles, angles

    with torch.no_grad():
        context = model.embeddings(ids)  # (B, T, E)
        states = [context if model.latent_proj is None else model.latent_proj(context)]
        for block_index in model.config.layers_indice:
            block = model.blocks[block_index]
            if block.cross_layer is not None:
                cross = block.cross_layer
                states.append(cross(states[-1], context, band(CONTEXT), rotary(cross.cross_attention)))
            for layer in block.layers:
                states.append(layer(states[-1], None, band(LATENTS), rotary(layer.self_attention)))
        states[-1] = model.norm(states[-1])
        return states


def lm_logits(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """The LM head's logits of final (normed) latents."""
    with torch.no_grad():
        return model.lm_head(hidden_states if model.lm_proj is None else model.lm_proj(hidden_states))


def band_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits `(B, T, vocab)` of `band_hidden_states`' final latents."""
    return lm_logits(model, band_hidden_states(model, ids)[-1])


@pytest.mark.parametrize("kind", CONFIGS)
def test_sliding_cache_steps_equal_a_model_over_the_last_windows(kind):
    """From a prompt inside the latent window, token by token to 20 tokens (past the context of 12): the sliding
    cache's logits at every step are `band_logits`'; the exact cache's agree while the latent window grows, and not
    after (the approximation is real, and this test would see it missing)."""
    model = tiny_model(kind)
    ids = random_ids(2, 20)
    expected = band_logits(model, ids)
    sliding, exact = PerceiverLiteSlidingCausalLMCache(model.config), PerceiverLiteCausalLMCache(model.config)
    with torch.no_grad():
        logits = model(ids[:, :2], cache=sliding, use_cache=True).logits  # (2, 2, vocab)
        torch.testing.assert_close(logits, expected[:, :2], rtol=1e-10, atol=1e-10)
        model(ids[:, :2], cache=exact, use_cache=True)
        for position in range(2, 20):
            step = model(ids[:, position : position + 1], cache=sliding, use_cache=True).logits[:, 0]
            torch.testing.assert_close(step, expected[:, position], rtol=1e-10, atol=1e-10)
            exact_step = model(ids[:, position : position + 1], cache=exact, use_cache=True).logits[:, 0]
            assert torch.allclose(exact_step, step, rtol=1e-10, atol=1e-10) == (position < LATENTS)
    assert all(layer.get_seq_length() == LATENTS for layer in sliding.layers[len(sliding.context_blocks) :])


@pytest.mark.parametrize("prompt_length", [LATENTS + 3, CONTEXT])
def test_sliding_cache_first_forward_is_exact_for_any_prompt(prompt_length):
    """A prompt longer than the latent window: the first forward is the full forward, and its latents' keys and
    values (the last 4 positions) are what the cache keeps."""
    model = tiny_model()
    ids = random_ids(2, prompt_length)
    cache = PerceiverLiteSlidingCausalLMCache(model.config)
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    assert cache.cached_latents() == LATENTS and cache.cross_states is None


def test_generate_with_the_sliding_cache():
    """`generate(..., cache=PerceiverLiteSlidingCausalLMCache(config))`: greedy tokens past the context are those of
    `band_logits`, one position at a time; with a model without latent self-attention (nothing to go stale) they are
    the exact ones."""
    model = tiny_model()
    prompt = random_ids(2, 3)
    tokens = generate(model, prompt, cache=PerceiverLiteSlidingCausalLMCache(model.config))
    sequence = prompt
    for _ in range(20):
        sequence = torch.cat([sequence, band_logits(model, sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, sequence)
    assert not torch.equal(tokens, generate(model, prompt))  # the exact cache's tokens differ here

    cross_only = tiny_model("paper", layers_indice=(0,), num_latent_transformers_in_layers=(0,))
    tokens = generate(cross_only, prompt, cache=PerceiverLiteSlidingCausalLMCache(cross_only.config))
    assert torch.equal(tokens, full_forward_loop(cross_only, prompt, 20))


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


BAD_INPUTS = {
    "too long": (dict(input_ids=torch.full((2, CONTEXT + 1), 5)), ValueError, r"input_ids.*\[2, 13\].*13 tokens.*12"),
    "id out of range": (dict(input_ids=torch.full((2, 5), VOCAB_SIZE)), ValueError, r"input_ids.*\[0, vocab_size=262\)"),
    "right padding": (
        dict(input_ids=torch.full((2, 5), 5), attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])),
        ValueError,
        r"attention_mask.*left padding.*rows \[1\]",
    ),
    "mask shape": (dict(input_ids=torch.full((2, 5), 5), attention_mask=torch.ones(2, 4)), ValueError, r"attention_mask.*\[2, 5\].*\[2, 4\]"),
    "labels shape": (dict(input_ids=torch.full((2, 5), 5), labels=torch.full((2, 4), 5)), ValueError, r"labels.*\[2, 5\].*\[2, 4\]"),
    "float ids": (dict(input_ids=torch.ones(2, 5)), TypeError, r"input_ids.*integer"),
    "attentions under sdpa": (
        dict(input_ids=torch.full((2, 5), 5), output_attentions=True), ValueError, r"output_attentions=True needs the eager attention.*'sdpa'"
    ),
    "ids and embeddings": (
        dict(input_ids=torch.full((2, 5), 5), inputs_embeds=torch.zeros(2, 5, 16)), ValueError, r"exactly one of `input_ids` and `inputs_embeds`"
    ),
    "neither": (dict(attention_mask=torch.ones(2, 5)), ValueError, r"exactly one of `input_ids` and `inputs_embeds`"),
    "embeddings width": (
        dict(inputs_embeds=torch.zeros(2, 5, 24)), ValueError, r"inputs_embeds.*\[B, T, data_shape\[0\]=16\].*\[2, 5, 24\]"
    ),
    "embeddings rank": (dict(inputs_embeds=torch.zeros(2, 16)), ValueError, r"inputs_embeds"),
    "embeddings too long": (
        dict(inputs_embeds=torch.zeros(2, CONTEXT + 1, 16)), ValueError, r"inputs_embeds.*\[2, 13, 16\].*13 tokens.*12"
    ),
    "hidden states by index": (
        dict(input_ids=torch.full((2, 5), 5), output_hidden_states=2), TypeError, r"output_hidden_states.*True or False.*2"
    ),
    "logits_to_keep tensor": (
        dict(input_ids=torch.full((2, 5), 5), logits_to_keep=torch.tensor([4])), TypeError, r"logits_to_keep.*int >= 0"
    ),
    "logits_to_keep negative": (dict(input_ids=torch.full((2, 5), 5), logits_to_keep=-1), TypeError, r"logits_to_keep.*-1"),
    "misspelt argument": (
        dict(input_ids=torch.full((2, 5), 5), attenion_mask=torch.ones(2, 5)),
        TypeError,
        r"PerceiverLiteForCausalLM\.forward\(\) got unexpected keyword argument `attenion_mask` \(did you mean "
        r"`attention_mask`\?\); it takes input_ids, attention_mask, labels, cache",
    ),
    "position ids": (
        dict(input_ids=torch.full((2, 5), 5), position_ids=torch.arange(5)[None]),
        TypeError,
        r"`position_ids` \(positions come from the inputs' order\); it takes",
    ),
    "cache of another type": (
        dict(input_ids=torch.full((2, 5), 5), cache=[]), TypeError, r"`cache` must be a PerceiverLiteCausalLMCache.*list"
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_name_the_argument_before_compute(case, monkeypatch):
    kwargs, error, message = BAD_INPUTS[case]
    model = tiny_model()
    monkeypatch.setattr(model, "_latents", lambda *args: pytest.fail("computed before the check"))
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_a_filled_foreign_cache_is_refused():
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)
    with pytest.raises(TypeError, match=r"cache.*PerceiverLiteCausalLMCache.*DynamicCache.*3 tokens"):
        tiny_model()(torch.full((2, 1), 5), cache=cache, use_cache=True)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(position_encoding_type="fourier"), "position_encoding_type"),
        (dict(input_projection_dim=8), "input_projection_dim"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        PerceiverLiteForCausalLM(tiny_config(**{"position_encoding_type": "rotary", **overrides}))


def test_rotary_config_checks():
    with pytest.raises(ValueError, match="qk_channels.*odd"):
        tiny_config(head_dim=3, dim=24)
    with pytest.raises(ValueError, match="rope_theta"):
        tiny_config(rope_theta=0)
    with pytest.raises(ValueError, match="prefix_dropout"):
        tiny_config(prefix_dropout=1.0)
    with pytest.raises(ValueError, match="rotary.*PerceiverLiteForCausalLM"):
        PerceiverLiteModel(tiny_config())


# ---------------------------------------------------------------------------------------------------------------------
# Ecosystem
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A float32 model and PerceiverTokenizer (left padding) saved in one folder."""
    folder = tmp_path_factory.mktemp("causal_lm")
    torch.manual_seed(0)
    config = tiny_config("paper", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = PerceiverLiteForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer = PerceiverTokenizer(padding_side="left")
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def test_auto_model_for_causal_lm_loads_the_saved_model(saved_model):
    model, _, folder = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is PerceiverLiteForCausalLM
    assert loaded.lm_head.weight is loaded.embeddings.weight
    ids = random_ids(2, CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is PerceiverLiteForCausalLM


def test_text_generation_pipeline_from_the_saved_folder(saved_model):
    model, tokenizer, folder = saved_model
    generator = pipeline("text-generation", model=str(folder), tokenizer=str(folder))
    prompt, options = "Hello", dict(add_special_tokens=False, max_new_tokens=8, do_sample=False)  # bytes, no [CLS]/[SEP]
    result = generator(prompt, return_tensors=True, **options)[0]["generated_token_ids"]
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert list(result) == expected[0].tolist()
    assert generator(prompt, **options)[0]["generated_text"].startswith(prompt)
    batch = generator(["Hi", "A longer prompt"], batch_size=2, **options)  # padded on the left
    assert [len(result) for result in batch] == [1, 1]


def test_trust_remote_code_loads_without_the_package(saved_model, tmp_path):
    model, _, folder = saved_model
    ids = random_ids(3, CONTEXT)
    with torch.no_grad():
        expected = model(ids).logits
    reference = tmp_path / "reference.safetensors"
    save_file({"inputs": ids, "expected": expected}, reference, metadata={"output": "logits"})
    cases = [{"folder": str(folder), "auto_class": "AutoModelForCausalLM", "reference": str(reference)}]
    report = load_without_package(cases, tmp_path / "remote")
    assert report["package_importable_before"] is False and report["package_modules"] == []
    case = report["cases"][0]
    assert case["model_class"] == "PerceiverLiteForCausalLM"
    assert case["module"].startswith("transformers_modules.")
    assert case["max_abs_diff"] <= 1e-6 and case["resaved_max_abs_diff"] <= 1e-6
    assert case["resaved_auto_map"]["AutoModelForCausalLM"] == "modeling_perceiver_lite.PerceiverLiteForCausalLM"


def byte_dataset(tokenizer, num_samples: int = 12) -> Dataset:
    """Texts of different lengths (padded on the left by the collator), tokenized without special tokens."""
    texts = [("the quick brown fox " * 3)[i : i + 6 + i % 5] for i in range(num_samples)]
    return Dataset.from_dict(dict(tokenizer(texts, add_special_tokens=False)))


def test_trainer_with_language_modeling_collator_and_gradient_checkpointing(tmp_path):
    """Trainer with `DataCollatorForLanguageModeling(mlm=False)` (left padding, -100 on padding) trains with gradient
    checkpointing; checkpointing gives the gradients of a plain backward."""
    tokenizer = PerceiverTokenizer(padding_side="left")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    dataset = byte_dataset(tokenizer)
    model = PerceiverLiteForCausalLM(tiny_config(initializer_range=0.02)).train()
    batch = collator([dataset[i] for i in range(4)])
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["labels"] == -100).any()

    def gradients(checkpointing: bool):
        trial = copy.deepcopy(model)
        if checkpointing:
            trial.activation_checkpointing_enable()
        trial(**batch).loss.backward()
        return {name: parameter.grad for name, parameter in trial.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, msg=name)

    model.activation_checkpointing_enable()
    before = model.lm_head.weight.detach().clone()
    arguments = training_arguments(tmp_path, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 4 and torch.isfinite(torch.tensor(losses)).all()
    assert not torch.equal(model.lm_head.weight, before) and model.lm_head.weight is model.embeddings.weight


def test_lora_equals_merged_model():
    """PEFT LoRA on every projection: the adapted model equals its merged model (logits, and the gradient w.r.t. the
    token embedding), and the adapter changes the logits."""
    model = tiny_model(dtype=torch.float32)
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    ids = random_ids(3, CONTEXT)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits

    def logits_and_gradient(wrapped, inner):
        weight = inner.get_input_embeddings().weight
        weight.requires_grad_(True)
        logits = wrapped(input_ids=ids).logits
        logits.square().sum().backward()
        return logits.detach(), weight.grad

    lora_logits, lora_gradient = logits_and_gradient(peft_model, peft_model.get_base_model())
    merged_logits, merged_gradient = logits_and_gradient(merged, merged)
    assert (lora_logits - plain).abs().max() > 1e-3
    torch.testing.assert_close(lora_logits, merged_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_gradient, merged_gradient, rtol=1e-4, atol=1e-4 * merged_gradient.abs().max().item())


def test_torch_export_with_dynamic_batch():
    model = tiny_model(dtype=torch.float32)
    inputs = {"input_ids": random_ids(3, CONTEXT), "attention_mask": torch.ones(3, CONTEXT, dtype=torch.long)}
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (), inputs, dynamic_shapes={name: {0: batch} for name in inputs}).module()
    for batch_size in (2, 5):
        mask = torch.ones(batch_size, CONTEXT, dtype=torch.long)
        mask[1, :4] = 0
        inputs = {"input_ids": random_ids(batch_size, CONTEXT), "attention_mask": mask}
        with torch.no_grad():
            torch.testing.assert_close(exported(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
