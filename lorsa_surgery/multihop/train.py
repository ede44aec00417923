"""Train a GPT-J from scratch on a multi-hop task, evaluate it per hop and on longer inputs, and plot.

A run writes checkpoints `step_000500/` (a Hugging Face model folder plus `trainer.json` and the AdamW
moments in `optimizer.safetensors`) at fixed steps and `history.json` (loss and per-hop accuracy); rerunning
into the same folder resumes from the last checkpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import GPTJConfig, GPTJForCausalLM

from lorsa_surgery.io import files

from lorsa_surgery.multihop import positional
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.io.files import write_json
from lorsa_surgery.lorsa.config import MAX_CONTEXT, MAX_INDEX, MAX_MATRIX, check_number
from lorsa_surgery.multihop.tasks import (MAX_HOPS, PRE_TARGET, TASKS, WINDOW, Example, TaskTokenizer, check_hops,
                                          generate)

TRAIN_LENGTH = WINDOW + PRE_TARGET + 1
"""Input tokens per training prompt (the answer is predicted at the last one)."""


@dataclass
class TrainConfig:
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
    "paper": TrainConfig(),
    # 6 layers, 10x the paper's learning rate, 2000 steps: learns either task in minutes on 2 CPU cores.
    "small": TrainConfig(
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


def preset(name: str, **overrides) -> TrainConfig:
    """A named preset with some fields overridden, e.g. preset("small", task="number", steps=500)."""
    if name not in PRESETS:
        raise LorsaSurgeryError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return replace(PRESETS[name], **overrides)


def build_model(config: TrainConfig) -> GPTJForCausalLM:
    """A freshly initialised GPT-J for `config` (eager attention, so attention weights can be read)."""
    torch.manual_seed(config.seed)
    gptj = GPTJConfig(
        vocab_size=len(TaskTokenizer(config.task)),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        rotary_dim=config.n_embd // config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        rope_theta=config.rotary_base,
    )
    gptj._attn_implementation = "eager"
    return _use_rotary_base(GPTJForCausalLM(gptj))


@torch.no_grad()
def _use_rotary_base(model: GPTJForCausalLM) -> GPTJForCausalLM:
    """Rebuild GPT-J's rotary tables (hard-wired to base 10000, never saved) from config.rope_theta."""
    base = float(getattr(model.config, "rope_theta", 10000.0))
    if base == 10000.0:
        return model
    for module in model.modules():
        table = getattr(module, "embed_positions", None)
        if isinstance(table, torch.Tensor):
            half = table.shape[-1] // 2
            angles = torch.arange(table.shape[0], dtype=torch.float64)[:, None] / base ** (torch.arange(half, dtype=torch.float64) / half)
            table.copy_(torch.cat((angles.sin(), angles.cos()), -1))
    return model


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


@torch.no_grad()
def evaluate(model: nn.Module, task: str, examples: list[Example], batch_size: int = 256,
             token_map: dict[str, int] | None = None) -> dict:
    """Accuracy of the answer predicted at the query (argmax over the model's whole vocabulary), overall and per hop
    count: {"accuracy", "per_hop"}. `token_map` gives the ids of a model trained outside the toolkit."""
    if not examples:
        raise LorsaSurgeryError("No examples to evaluate.")
    longest = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if longest and max(len(e.tokens) for e in examples) > longest:
        raise LorsaSurgeryError(f"The model accepts at most {longest} tokens.")
    ids, answers = TaskTokenizer(task, token_map).encode_examples(examples)
    was_training = model.training
    model.eval()
    correct = torch.cat(
        [
            model(ids[i : i + batch_size], use_cache=False).logits[:, -1].argmax(-1) == answers[i : i + batch_size]
            for i in range(0, len(ids), batch_size)
        ]
    )
    model.train(was_training)
    hops = torch.tensor([e.hops for e in examples])
    per_hop = {h: correct[hops == h].float().mean().item() for h in range(1, MAX_HOPS + 1) if (hops == h).any()}
    return {"accuracy": correct.float().mean().item(), "per_hop": per_hop}


def length_sweep(
    model: nn.Module, task: str, extras: list[int], n: int = 512, seed: int | str = "length", progress: bool = True,
    token_map: dict[str, int] | None = None,
) -> dict[int, dict]:
    """Accuracy with `extra` window tokens inserted before the answer window, keyed by input length."""
    out = {}
    for extra in tqdm(extras, desc=f"{task} length sweep", disable=not progress):
        examples = generate(task, n, seed=seed, extra=extra)
        out[TRAIN_LENGTH + extra] = evaluate(model, task, examples, batch_size=max(8, 8192 // (TRAIN_LENGTH + extra)),
                                             token_map=token_map)
    return out


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("step_*") if (p / "trainer.json").is_file())


def _save_checkpoint(out_dir: Path, model, optimizer, config: TrainConfig, step: int) -> Path:
    final = out_dir / f"step_{step:06d}"
    with files.new_folder(final, overwrite=True, kind="multihop-checkpoint") as tmp:
        model.save_pretrained(tmp)
        names = {p: n for n, p in model.named_parameters()}
        moments = {}
        for p, state in optimizer.state.items():
            moments[f"exp_avg/{names[p]}"] = state["exp_avg"].contiguous()
            moments[f"exp_avg_sq/{names[p]}"] = state["exp_avg_sq"].contiguous()
        save_file(moments, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "trainer.json", {"task": config.task, "step": step, "config": asdict(config)})
    return final


def load_task_model(path: str | Path, task: str | None = None, token_map: str | Path | dict | None = None
                    ) -> tuple[nn.Module, str, dict[str, int] | None]:
    """(model in eval mode, task, token map) of a multi-hop model: a checkpoint of `train` (its trainer.json names
    the task; no map), or any causal LM folder trained elsewhere, with `task` and `token_map` (a dict or a JSON file
    mapping each task symbol as the task writes it, `a`, `dp`, `12`, `c4`, `ab`, to the model's token id)."""
    path = Path(path)
    if (path / "trainer.json").is_file() and token_map is None:
        model, record = load_checkpoint(path)
        if task not in (None, record["task"]):
            raise LorsaSurgeryError(f"{path} was trained on the {record['task']} task, not {task}.")
        return model, record["task"], None
    if task is None or token_map is None:
        raise LorsaSurgeryError(f"{path} has no trainer.json: name its task and its token map (--task, --token-map).")
    if not isinstance(token_map, dict):
        token_map = files.read_json(token_map)
    TaskTokenizer(task, token_map)  # checks the map before the model loads
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    too_big = [t for t, i in token_map.items() if not 0 <= int(i) < model.config.vocab_size]
    if too_big:
        raise LorsaSurgeryError(f"The token map names ids outside the model's vocabulary of {model.config.vocab_size}, "
                                f"e.g. {too_big[0]!r}: {token_map[too_big[0]]}.")
    return model.eval(), task, {t: int(i) for t, i in token_map.items()}


def load_checkpoint(path: str | Path) -> tuple[GPTJForCausalLM, dict]:
    """The model of a checkpoint folder (eval mode) and its trainer record {"task", "step", "config"}."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise LorsaSurgeryError(f"{path} is not a multi-hop checkpoint (no trainer.json).")
    record = files.read_json(path / "trainer.json")
    model = GPTJForCausalLM.from_pretrained(path, attn_implementation="eager")
    return _use_rotary_base(model).eval(), record


def train(config: TrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> list[dict]:
    """Train (or resume) a run in `out_dir`; returns the history of evaluations.

    Loss is cross-entropy on the answer token only; each history record holds the step, the mean training
    loss since the previous record and the per-hop accuracy on the fixed evaluation set.
    """
    out_dir = files.claim(out_dir, kind="multihop-run")
    tok = TaskTokenizer(config.task)
    done = _checkpoints(out_dir) if resume else []
    start, history = 0, []
    if done:
        record = files.read_json(done[-1] / "trainer.json", expect=dict)
        if TrainConfig(**record["config"]) != config:
            raise LorsaSurgeryError(f"{out_dir} holds a run with other settings; use another folder or resume=False.")
        start = record["step"]
    model = load_checkpoint(done[-1])[0] if done else build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if done:
        moments = files.read_safetensors(done[-1] / "optimizer.safetensors")
        for name, p in model.named_parameters():
            if f"exp_avg/{name}" in moments:
                optimizer.state[p] = {
                    "step": torch.tensor(float(start)),
                    "exp_avg": moments[f"exp_avg/{name}"],
                    "exp_avg_sq": moments[f"exp_avg_sq/{name}"],
                }
        if (out_dir / "history.json").is_file():
            history = [
                {**h, "per_hop": {int(k): v for k, v in h["per_hop"].items()}}
                for h in files.read_json(out_dir / "history.json")
                if h["step"] <= start
            ]
    elif 0 in config.checkpoint_steps:
        _save_checkpoint(out_dir, model, optimizer, config, 0)
    eval_set = generate(config.task, config.eval_examples, seed=f"eval-{config.seed}")
    if start == 0:
        history = [{"step": 0, "loss": None, **evaluate(model, config.task, eval_set)}]
    model.train()
    losses = []
    bar = tqdm(range(start, config.steps), desc=f"train {config.task}", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        extra = random.Random(f"extra-{config.seed}-{step}").randint(0, config.train_extra) if config.train_extra else 0
        batch = generate(config.task, config.batch_size, seed=f"train-{config.seed}-{step}", extra=extra, hops=config.hops)
        ids, answers = tok.encode_examples(batch)
        loss = F.cross_entropy(model(ids, use_cache=False).logits[:, -1], answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf))
        if not math.isfinite(norm):  # a NaN or inf loss gives one too; stop before the update spreads it
            _diverged(step + 1, f"gradient norm {norm}")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        optimizer.step()
        losses.append(loss.item())
        done_steps = step + 1
        if done_steps % config.eval_every == 0 or done_steps == config.steps:
            result = evaluate(model, config.task, eval_set)
            history.append({"step": done_steps, "loss": sum(losses) / len(losses), **result})
            losses = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{result['accuracy']:.3f}")
            write_json(out_dir / "history.json", history)
        if done_steps in config.checkpoint_steps or done_steps == config.steps:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the last update overflowed
                _diverged(done_steps, "weights NaN or infinite")
            _save_checkpoint(out_dir, model, optimizer, config, done_steps)
    write_json(out_dir / "history.json", history)
    return history


def _diverged(step: int, what: str) -> NoReturn:
    raise LorsaSurgeryError(f"Training diverged at step {step} ({what}), so no checkpoint was saved for it; lower lr or "
                            "keep grad_clip on.")


def checkpoint_scores(
    out_dir: str | Path, n_prompts: int = 64, seed: int | str = "scores", gamma: float = 0.1, progress: bool = True
) -> list[dict]:
    """Positional/symbolic scores of every head at every checkpoint of a run, on fresh prompts of its task.

    One record per checkpoint: {"step", "positional" [L][H], "symbolic" [L][H], "entropy" [L][H], "labels"}.
    """
    records = []
    for path in tqdm(_checkpoints(Path(out_dir)), desc="scores over training", disable=not progress):
        model, record = load_checkpoint(path)
        ids, _ = TaskTokenizer(record["task"]).encode_examples(generate(record["task"], n_prompts, seed=seed))
        scores = positional.head_scores(model, ids, progress=False)
        records.append({"step": record["step"], **scores.to_dict(gamma)})
    return records


# ---- plots --------------------------------------------------------------------------------------


def plot_scores_over_training(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Mean positional and symbolic score of each layer's heads against the training step."""
    steps = [r["step"] for r in records]
    pos = torch.tensor([r["positional"] for r in records]).mean(-1)  # [checkpoints, layers]
    sym = torch.tensor([r["symbolic"] for r in records]).mean(-1)
    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2, sharey=True)
    colors = colormaps["viridis"](torch.linspace(0, 1, pos.shape[1]).tolist())
    for layer in range(pos.shape[1]):
        axes[0].plot(steps, pos[:, layer], color=colors[layer], label=f"L{layer}")
        axes[1].plot(steps, sym[:, layer], color=colors[layer], label=f"L{layer}")
    axes[0].set(title="positional score", xlabel="step", ylim=(-0.05, 1.05))
    axes[1].set(title="symbolic score", xlabel="step")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return files.write_figure(path, fig)


def plot_pure_heads(records: list[dict], history: list[dict], path: str | Path, title: str = "") -> Path:
    """Counts of positional, symbolic and mixed heads at each checkpoint, with task accuracy."""
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(6.5, 4), layout="tight")
    ax = fig.subplots()
    for kind, color in (("positional", "tab:blue"), ("symbolic", "tab:orange"), ("mixed", "tab:gray")):
        counts = [sum(label == kind for row in r["labels"] for label in row) for r in records]
        ax.plot(steps, counts, marker="o", color=color, label=f"{kind} heads")
    ax.set(xlabel="step", ylabel="heads")
    acc = ax.twinx()
    acc.plot([h["step"] for h in history], [h["accuracy"] for h in history], color="black", ls="--", label="accuracy")
    acc.set(ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(loc="center left", fontsize=8)
    ax.set_title(title)
    return files.write_figure(path, fig)


def plot_accuracy_vs_length(
    sweeps: dict[str, dict[int, dict]], path: str | Path, train_length: int | None = TRAIN_LENGTH,
    xlabel: str = "input tokens", title: str = "",
) -> Path:
    """Accuracy against input length, one line per model; the training length is marked when given."""
    fig = Figure(figsize=(6.5, 4), layout="tight")
    ax = fig.subplots()
    for name, sweep in sweeps.items():
        lengths = sorted(sweep)
        ax.plot(lengths, [sweep[n]["accuracy"] for n in lengths], marker="o", ms=3, label=name)
    if train_length:
        ax.axvline(train_length, color="gray", ls=":", label="training length")
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.02), xscale="log", title=title)
    ax.legend(fontsize=8)
    return files.write_figure(path, fig)
