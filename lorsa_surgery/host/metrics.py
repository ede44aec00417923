"""How much behaviour a splice keeps: explained variance of each attention output, and the LM loss."""

from __future__ import annotations

import torch
from torch import nn

from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.hooks import hooks
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
