"""How much behaviour a splice keeps: explained variance of each attention output, and the LM loss."""

from __future__ import annotations

import torch
from torch import nn

from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.placement import input_device
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


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: list[str], max_length: int = 256) -> tuple[float, int]:
    """Mean next-token cross-entropy over the texts and the number of predicted tokens."""
    total, count = 0.0, 0
    device = input_device(model)
    for ids in token_windows(tokenizer, texts, max_length):
        ids = ids.to(device)
        logits = model(ids).logits[0, :-1].float()
        total += nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count, count


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
        removers = []
        try:
            for layer, site in handle.sites.items():
                # A head hook sees the activations the splice computes anyway; returning None leaves the output exact.
                site.hooks.append(lambda acts, ctx, layer=layer, lorsa=site.lorsa: recon[layer].append(lorsa.decode(acts)[0]))

                def capture_output(module, args, output, layer=layer, post_norm=site.post_norm):
                    out = output[0] if isinstance(output, tuple) else output
                    target[layer].append((post_norm(out) if post_norm is not None else out)[0])

                # On the original attention, which stays in the model after the splice: removed on every path.
                removers.append(site.original.register_forward_hook(capture_output))
            original_loss, n_tokens = lm_loss(model, tokenizer, texts, max_length)
        finally:
            for r in removers:
                r.remove()
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
