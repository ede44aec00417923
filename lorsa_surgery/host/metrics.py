"""How much behaviour a splice keeps: explained variance of each attention output, the LM loss, the KL divergence
from the original, and the floor it is measured against (attention layers mean-ablated)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Mapping

import torch
from torch import nn

from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.hooks import hooks, watch_attention
from lorsa_surgery.host.splicing import splice


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - squared error / total variance of the target, over rows [N, d] (tokens)."""
    pred, target = pred.double().reshape(-1, target.shape[-1]), target.double().reshape(-1, target.shape[-1])
    total = (target - target.mean(0)).pow(2).sum()
    return float(1 - (pred - target).pow(2).sum() / total)


def document_windows(tokenizer, texts: list[str], max_length: int):
    """(document index, first token's offset in it, token ids [T]) of windows of up to max_length, cut from each
    document's start, so no window straddles two documents and the first of each starts where its text does."""
    for doc, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for start in range(0, len(ids) - 1, max_length):
            window = ids[start : start + max_length]
            if len(window) > 1:
                yield doc, start, window


def token_windows(tokenizer, texts: list[str], max_length: int):
    """Token windows of up to max_length from the texts, one [1, T] tensor each (see `document_windows`)."""
    for _, _, window in document_windows(tokenizer, texts, max_length):
        yield window[None]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM loss of every prediction [B, T-1]: next-token cross-entropy (float32) and whether it counts, which is
    when the token and the one predicting it are both real (neither is padding, left or right)."""
    losses = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(logits.device),
                                         reduction="none")
    if attention_mask is None:
        return losses, torch.ones_like(losses, dtype=torch.bool)
    mask = attention_mask.to(logits.device)
    return losses, (mask[:, 1:] * mask[:, :-1]).bool()


def kl_and_loss_sums(reference: torch.Tensor, candidate: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """From two runs' logits [B, T, V] on the same tokens: KL(reference || candidate) summed over the predicted tokens
    (differentiable in `candidate`), and [summed loss of reference, of candidate, predicted tokens] (float64, detached)."""
    loss_reference, keep = next_token_loss(reference, input_ids, attention_mask)
    loss_candidate, _ = next_token_loss(candidate.detach(), input_ids, attention_mask)
    p, q = reference[:, :-1].float().log_softmax(-1), candidate[:, :-1].float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)[keep].sum()
    return kl, torch.stack([loss_reference[keep].sum(), loss_candidate[keep].sum(), keep.sum().to(loss_reference)]).double()


@torch.no_grad()
def compare(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            reference: Callable[[], ContextManager] = contextlib.nullcontext,
            candidate: Callable[[], ContextManager] = contextlib.nullcontext, batch_size: int = 4) -> dict[str, float]:
    """KL divergence (nats per predicted token) from the model run inside `reference()` to the model run inside
    `candidate()`, both LM losses and the tokens, on these sequences [N, T]; e.g. the plain model against
    `lambda: splice(model, modules)` or `lambda: mean_ablated(model, means)`."""
    device = input_device(model)
    kl, sums = 0.0, torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[i : i + batch_size].to(device)
        logits = []
        for context in (reference, candidate):
            with context():
                logits.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        batch_kl, batch_sums = kl_and_loss_sums(*logits, ids, mask)
        kl += float(batch_kl)
        sums += batch_sums.cpu()
    n = float(sums[2])
    return {"kl": kl / n, "lm_loss_original": float(sums[0]) / n, "lm_loss_spliced": float(sums[1]) / n,
            "lm_loss_gap": float(sums[1] - sums[0]) / n, "tokens": int(n)}


@torch.no_grad()
def attention_means(model: nn.Module, layers: list[int], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Each layer's mean attention output [d_model] over the real tokens of these sequences: what mean ablation
    writes (`mean_ablated`)."""
    device = input_device(model)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size].to(device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[i : i + batch_size].to(device)
        with watch_attention(model, layers) as calls:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for layer in layers:
            out = calls[layer].result.double()
            sums[layer] = sums.get(layer, 0) + (out * mask[..., None].to(out)).sum((0, 1)).cpu()
        count += int(mask.sum())
    return {layer: (total / max(count, 1)).float() for layer, total in sums.items()}


@contextlib.contextmanager
def mean_ablated(model: nn.Module, means: Mapping[int, torch.Tensor]) -> Iterator[nn.Module]:
    """Within it, the attention module of each layer in `means` outputs that mean at every position (its input is
    ignored): the floor a replacement of those layers is measured against."""
    arch = arch_for(model)
    blocks = arch.layer_list(model)

    def constant(mean: torch.Tensor):
        def hook(module, args, kwargs, output):
            first = output[0] if isinstance(output, tuple) else output
            replaced = mean.to(first).expand_as(first).clone()
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook

    handles = [getattr(blocks[layer], arch.attention).register_forward_hook(constant(mean), with_kwargs=True)
               for layer, mean in means.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def loss_recovered(original: float, replaced: float, floor: float) -> float:
    """Share of what the replaced layers contribute to the loss that the replacement keeps:
    (floor - replaced) / (floor - original), with the floor the loss with those layers mean-ablated."""
    return (floor - replaced) / (floor - original)


@torch.no_grad()
def lm_loss_sums(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 2) -> torch.Tensor:
    """[summed next-token loss, predicted tokens] (float64, on the CPU) of the model on these sequences [N, T]."""
    device = input_device(model)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[i : i + batch_size].to(device)
        losses, keep = next_token_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        total += torch.tensor([losses[keep].double().sum().item(), keep.sum().item()], dtype=torch.float64)
    return total


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: list[str], max_length: int = 256) -> tuple[float, int]:
    """Mean next-token cross-entropy over the texts and the number of predicted tokens."""
    total = torch.zeros(2, dtype=torch.float64)
    for ids in token_windows(tokenizer, texts, max_length):
        total += lm_loss_sums(model, ids)
    return float(total[0] / total[1]), int(total[1])


@torch.no_grad()
def splice_report(
    model: nn.Module, tokenizer, modules: dict[int, Lorsa], texts: list[str], max_length: int = 256
) -> dict:
    """Per-layer explained variance of the attention output, and the LM loss with and without the splice.

    Explained variance compares each module's reconstruction with the original layer output on the
    unspliced model's own activations (other layers untouched), so layers are judged one at a time.
    """
    recon: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    target: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    with splice(model, modules, mode="exact") as handle:
        def keep(into: dict[int, list[torch.Tensor]]):
            return lambda x, ctx: into[ctx.layer].append(x.reshape(-1, x.shape[-1]))

        # Reading hook_out and hook_original leaves the exact-mode output the original's, bit for bit.
        with hooks(handle, {"hook_out": keep(recon), "hook_original": keep(target)}):
            original_loss, n_tokens = lm_loss(model, tokenizer, texts, max_length)
    with splice(model, modules, mode="replace"):
        spliced_loss, _ = lm_loss(model, tokenizer, texts, max_length)
    return {
        "tokens": n_tokens,
        "layers": {
            layer: {"explained_variance": explained_variance(torch.cat(recon[layer]), torch.cat(target[layer]))}
            for layer in sorted(modules)
        },
        "lm_loss": {"original": original_loss, "spliced": spliced_loss, "delta": spliced_loss - original_loss},
    }
