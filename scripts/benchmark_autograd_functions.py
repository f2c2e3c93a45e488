"""The fast paths' hand-written autograd Functions against what autograd and torch's fused kernels do with the same
operands, one row each, on the CPU in float32 (one thread, this process's CPU time, the minimum over repeats):

    python scripts/benchmark_autograd_functions.py > benchmarks/autograd-functions-cpu.md

- softmax backward: `RecomputedAttention`'s and `SharedQueryAttention`'s backward take the scores' gradient through
  autograd's softmax backward (`softmax_with_backward`), against torch's private `_softmax_backward_data` and the
  public formula `p * (g - sum(g * p))`;
- query-only attention: `RecomputedAttention` where only the query needs a gradient (the cross-attends to grid
  features of scenario A: 8 samples, 256 latents, 4096 inputs of 136 features), against torch's fused kernel and
  autograd's batched matmuls;
- shared-query cross-attend: `SharedQueryAttention` (the first cross-attend at 128 x 128, 4 samples, where the grid
  features are wider than the head), against materialised keys and values and torch's fused kernel;
- feed-forward: `RecomputedActivationMLP` (a latent layer of scenario A: 8 x 256 rows, 256 -> 1536) against the
  module under autograd.

Each row gives both times, their ratio (> 1: the Function is faster) and the bytes autograd keeps for backward.
"""

import time

import torch
from torch import nn

from perceiver_lite import PerceiverLiteConfig
from perceiver_lite import fast_perceiver_lite as fast
from perceiver_lite.modeling_perceiver_lite import PerceiverLiteAttention, PerceiverLiteFourierFeatures, PerceiverLiteMLP


def cpu_time(function, repeats: int = 7) -> float:
    """The least CPU time of `repeats` calls of `function`, after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return best


def saved_mib(function) -> float:
    """MiB of the tensors autograd keeps for the backward pass of `function()`."""
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
        function()
    return sum(total) / 2**20


def backward(function):
    """`function`'s output, then its backward pass with a gradient of ones."""

    def run():
        output = function()
        output.backward(torch.ones_like(output))

    return run


def row(name: str, ours, theirs, their_name: str, memory: bool = True):
    ours_time, their_time = cpu_time(ours[0]), cpu_time(theirs[0])
    kept = f"{saved_mib(ours[1]):.1f} / {saved_mib(theirs[1]):.1f}" if memory else ""
    print(f"| {name} | {their_name} | {ours_time * 1e3:.1f} | {their_time * 1e3:.1f} | {their_time / ours_time:.2f} | {kept} |")


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("| row | against | ours (ms) | against (ms) | x faster | kept for backward, MiB (ours / against) |")
    print("|---|---|---|---|---|---|")

    scores, grad = (torch.randn(8, 1, 256, 1024, generator=generator) for _ in range(2))
    autograd_softmax = lambda: fast.softmax_with_backward(scores, None)[1](grad)  # noqa: E731
    private = lambda: torch._softmax_backward_data(grad, scores.softmax(-1), -1, torch.float32)  # noqa: E731

    def formula():
        probabilities = scores.softmax(-1)
        return probabilities * (grad - (grad * probabilities).sum(-1, keepdim=True))

    row("softmax backward", (autograd_softmax, None), (private, None), "`_softmax_backward_data`", memory=False)
    row("softmax backward", (autograd_softmax, None), (formula, None), "public formula", memory=False)

    query = torch.randn(8, 1, 256, 136, generator=generator, requires_grad=True)
    features = torch.randn(8, 1, 4096, 136, generator=generator)
    recomputed = lambda: fast.RecomputedAttention.apply(query, features, features, None, 136**-0.5)  # noqa: E731
    sdpa = lambda: nn.functional.scaled_dot_product_attention(query, features, features, scale=136**-0.5)  # noqa: E731
    matmuls = lambda: ((query * 136**-0.5) @ features.transpose(-1, -2)).softmax(-1) @ features  # noqa: E731
    row("query-only attention", (backward(recomputed), recomputed), (backward(sdpa), sdpa), "fused kernel")
    row("query-only attention", (backward(recomputed), recomputed), (backward(matmuls), matmuls), "autograd matmuls")

    config = PerceiverLiteConfig(data_shape=[3, 128, 128], num_latent_tokens=256, dim=256, heads=8, cross_heads=1,
                                 resolution=128, layers_indice=[0], num_latent_transformers_in_layers=[1])  # fmt: skip
    config._attn_implementation = "sdpa"
    attention = PerceiverLiteAttention(config, "cross")
    positions = PerceiverLiteFourierFeatures(config)((128, 128))  # (M, F)
    data = torch.randn(4, 128 * 128, 3, generator=generator)  # (B, M, C)
    latents = torch.randn(256, 256, generator=generator, requires_grad=True)

    def shared_query():
        key, value = fast.project_inputs(attention, data, positions, (128, 128))
        return fast.shared_query_attention(attention, latents, key, fast.as_tensor(attention, value), None)

    def materialized():
        key, value = (fast.as_tensor(attention, p) for p in fast.project_inputs(attention, data, positions, (128, 128)))
        query = fast.split_heads(attention, attention.q_proj(latents[None])).expand(4, -1, -1, -1)  # (B, H, N, D)
        output = nn.functional.scaled_dot_product_attention(query, key, value)  # (B, H, N, D)
        return attention.o_proj(output.transpose(1, 2).flatten(2))

    row("shared-query cross-attend", (backward(shared_query), shared_query), (backward(materialized), materialized),
        "materialised keys, fused kernel")  # fmt: skip

    mlp = PerceiverLiteMLP(PerceiverLiteConfig(dim=256, ff_dim=1536, heads=8, data_shape=[3, 64, 64], resolution=64,
                                             gated_feed_forward=False))
    hidden_states = torch.randn(8, 256, 256, generator=generator, requires_grad=True)
    parameters = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    recomputed_mlp = lambda: fast.RecomputedActivationMLP.apply(mlp.activate, None, hidden_states, *parameters)  # noqa: E731
    module = lambda: mlp(hidden_states)  # noqa: E731
    row("feed-forward", (backward(recomputed_mlp), recomputed_mlp), (backward(module), module), "module")


if __name__ == "__main__":
    main()
