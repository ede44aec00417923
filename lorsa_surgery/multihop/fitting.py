"""Lorsa modules fitted to the attention layers of a multi-hop task model (docs/multihop.md).

`lorsa_surgery.training.trainer.train` reads text through a tokenizer; the task models have none, so a module is
fitted here directly on the attention input and output of one layer, captured on task prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.host.metrics import explained_variance
from lorsa_surgery.lorsa.config import LorsaConfig
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.multihop.tasks import TaskTokenizer, generate
from lorsa_surgery.training.trainer import capture


def task_prompts(task: str, n: int, seed: int | str, extra: int = 0) -> torch.Tensor:
    """Input ids [n, 17 + extra] of n examples of `task` (`tasks.generate`, balanced over hop count, answer and
    answer slot), in the toolkit's own vocabulary."""
    ids, _ = TaskTokenizer(task).encode_examples(generate(task, n, seed=seed, extra=extra))
    return ids


def fit_lorsa(
    model: nn.Module, task: str, layer: int, *, n_qk_heads: int = 4, n_ov_heads: int | None = None, top_k: int = 16,
    steps: int = 1000, prompts: int = 8192, held_out: int = 512, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
) -> tuple[Lorsa, float]:
    """A top-K Lorsa module for `layer` of a task model, fitted by squared error to the attention output on `prompts`
    task prompts with Adam (`steps` batches of `batch_size` prompts, the rate decaying linearly over the last third);
    queries and keys start at random, the output bias at the mean output. `n_ov_heads` defaults to twice the model's
    width, each QK head of the head width. Returns the module and its explained variance on `held_out` other prompts."""
    x, y = capture(model, layer, task_prompts(task, prompts, "lorsa"))
    held_x, held_y = capture(model, layer, task_prompts(task, held_out, "lorsa-eval"))
    d = model.config.n_embd
    cfg = LorsaConfig(d_model=d, n_qk_heads=n_qk_heads, d_qk_head=d // model.config.n_head, n_ov_heads=n_ov_heads or 2 * d,
                      top_k=top_k, host_layer=layer, **arch_for(model).rotary(model.config, layer))
    torch.manual_seed(seed)
    lorsa = Lorsa(cfg)
    with torch.no_grad():
        lorsa.b_D.copy_(y.mean((0, 1)))
    optimizer = torch.optim.Adam(lorsa.parameters(), lr=lr)
    for step in range(steps):
        batch = torch.randint(0, len(x), (batch_size,))
        loss = (lorsa(x[batch]) - y[batch]).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, 3 * (steps - step) / steps)
    with torch.no_grad():
        return lorsa, explained_variance(lorsa(held_x), held_y)
