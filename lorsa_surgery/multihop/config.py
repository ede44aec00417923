"""The settings of a multi-hop GPT-J run (`TaskTrainConfig`) and its named presets, each field checked as it is set.

They import no torch, so `lorsa-surgery tasks train`, whose options are generated from them, answers --help and
refuses a bad value before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.config import MAX_CONTEXT, MAX_INDEX, MAX_MATRIX, check_number
from lorsa_surgery.multihop.tasks import MAX_HOPS, PRE_TARGET, TASKS, WINDOW, check_hops

TRAIN_LENGTH = WINDOW + PRE_TARGET + 1
"""Input tokens per training prompt (the answer is predicted at the last one)."""


@dataclass
class TaskTrainConfig:
    """How to train a GPT-J on a multi-hop task. The defaults are the paper's settings (docs/multihop.md)."""

    task: str = "letter"
    """"number" or "letter"."""
    n_layer: int = 12
    """Decoder layers."""
    n_head: int = 1
    """Attention heads per layer."""
    n_embd: int = 128
    """Model width; the head width is n_embd // n_head and all of it rotates (full rotary)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights and residual branches."""
    n_positions: int = 1024
    """Longest input the model accepts (length tests go well past the 17 training tokens)."""
    rotary_base: float = 10000.0
    """RoPE base: plane i of a head of width d turns rotary_base ** (-2i/d) per token. GPT-J in transformers
    builds its table with 10000 and does not save it; another base is kept in config.json as rope_theta and set
    again by load_checkpoint, so load such models with it."""
    train_extra: int = 0
    """Each training step inserts a random number, 0 to train_extra, of extra window tokens before the answer
    window, so the target window sits at varying distances from the query; 0 trains on 17 tokens only."""
    hops: tuple[int, ...] = (1, 2, 3, 4)
    """Hop counts of the training prompts, drawn in equal shares; repeat one to weight it (1,2,3,4,4). The
    evaluation set always mixes 1 to 4 hops equally."""
    steps: int = 5000
    """Optimiser steps."""
    batch_size: int = 64
    """Prompts per step; every step draws fresh prompts."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    betas: tuple[float, float] = (0.95, 0.999)
    """AdamW betas."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 500
    """Linear warm-up to the peak rate; then it decays linearly to zero at `steps`."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    checkpoint_steps: tuple[int, ...] = (0, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000)
    """Steps after which a checkpoint is written (the last step always is)."""
    eval_every: int = 250
    """Evaluate per-hop accuracy every this many steps."""
    eval_examples: int = 1024
    """Size of the fixed evaluation set."""
    seed: int = 0
    """Seeds the initial weights, the training prompts and the evaluation set."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise LorsaSurgeryError(f"Unknown task {self.task!r:.60}; choose number or letter.")
        for name in ("betas", "hops", "checkpoint_steps"):
            if isinstance(getattr(self, name), (str, bytes)) or not hasattr(getattr(self, name), "__iter__"):
                raise LorsaSurgeryError(f"{name} must be a list of numbers, got {getattr(self, name)!r:.60}.")
        self.betas = tuple(check_number(b, "Each of betas", minimum=0, maximum=0.999999) for b in self.betas)
        if len(self.betas) != 2:
            raise LorsaSurgeryError(f"betas must be two numbers, got {len(self.betas)}.")
        self.hops = tuple(check_number(h, "Each hop count", integer=True, minimum=1, maximum=MAX_HOPS) for h in self.hops)
        self.checkpoint_steps = tuple(sorted({check_number(s, "Each checkpoint step", integer=True, minimum=0, maximum=MAX_INDEX)
                                              for s in self.checkpoint_steps}))
        # Bounded so that a typo is refused here, before a model is allocated or a run folder written.
        for name, most in (("n_layer", 1024), ("n_head", 1024), ("n_embd", 2**16), ("steps", MAX_INDEX), ("batch_size", 2**20),
                           ("eval_every", MAX_INDEX), ("eval_examples", 2**20), ("n_positions", MAX_CONTEXT)):
            check_number(getattr(self, name), name, integer=True, minimum=1, maximum=most)
        for name in ("train_extra", "warmup_steps"):
            check_number(getattr(self, name), name, integer=True, minimum=0, maximum=MAX_INDEX)
        check_number(self.seed, "seed", integer=True, minimum=0, maximum=2**32 - 1)
        if 12 * self.n_layer * self.n_embd**2 > MAX_MATRIX:
            raise LorsaSurgeryError(f"{self.n_layer} layers of width {self.n_embd} make a model of about "
                                    f"{12 * self.n_layer * self.n_embd**2:.3g} weights, more than the {MAX_MATRIX:.3g} allowed.")
        if self.n_embd % (2 * self.n_head):
            raise LorsaSurgeryError(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even width.")
        self.dropout = check_number(self.dropout, "dropout", minimum=0, maximum=0.999999)
        self.lr = check_number(self.lr, "lr", above=0)  # a finite but diverging rate is stopped by the training loop
        self.weight_decay = check_number(self.weight_decay, "weight_decay", minimum=0)
        self.grad_clip = check_number(self.grad_clip, "grad_clip", minimum=0)
        if self.n_positions < TRAIN_LENGTH + self.train_extra:
            raise LorsaSurgeryError(f"n_positions must be at least {TRAIN_LENGTH} plus train_extra, which must be non-negative.")
        self.rotary_base = check_number(self.rotary_base, "rotary_base", above=1)
        check_hops(self.hops)


PRESETS = {
    "paper": TaskTrainConfig(),
    # 6 layers, 10x the paper's learning rate, 2000 steps: learns either task in minutes on 2 CPU cores.
    "small": TaskTrainConfig(
        n_layer=6,
        steps=2000,
        lr=1e-3,
        warmup_steps=200,
        checkpoint_steps=(0, 100, 200, 300, 400, 600, 800, 1000, 1500, 2000),
        eval_every=100,
        eval_examples=512,
    ),
}
"""Named settings: "paper" (the paper's 12-layer recipe, docs/multihop.md) and "small" (a CPU-sized model for demos and tests)."""


def preset(name: str, **overrides) -> TaskTrainConfig:
    """A named preset with some fields overridden, e.g. preset("small", task="number", steps=500)."""
    if name not in PRESETS:
        raise LorsaSurgeryError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return replace(PRESETS[name], **overrides)
