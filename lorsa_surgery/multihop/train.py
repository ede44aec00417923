"""Train a GPT-J from scratch on a multi-hop task, evaluate it per hop and on longer inputs, and plot.

A run writes checkpoints `step_000500/` (a Hugging Face model folder plus `trainer.json` and the AdamW
moments in `optimizer.safetensors`) at fixed steps and `history.json` (loss and per-hop accuracy); rerunning
into the same folder resumes from the last checkpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
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
from lorsa_surgery.multihop.config import PRESETS, TRAIN_LENGTH, TaskTrainConfig, preset  # noqa: F401 (read from here too)
from lorsa_surgery.multihop.tasks import MAX_HOPS, Example, TaskTokenizer, generate
from lorsa_surgery.training import core


def build_model(config: TaskTrainConfig) -> GPTJForCausalLM:
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


def _save_checkpoint(out_dir: Path, model, optimizer, config: TaskTrainConfig, step: int) -> Path:
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


def train(config: TaskTrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> list[dict]:
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
        changed = core.changed_settings(record["config"], config)
        if changed:
            raise LorsaSurgeryError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); use another folder "
                                    "or resume=False.")
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
    bar = core.progress(f"train {config.task}", config.steps, start, progress)
    for step in range(start, config.steps):
        extra = random.Random(f"extra-{config.seed}-{step}").randint(0, config.train_extra) if config.train_extra else 0
        batch = generate(config.task, config.batch_size, seed=f"train-{config.seed}-{step}", extra=extra, hops=config.hops)
        ids, answers = tok.encode_examples(batch)
        loss = F.cross_entropy(model(ids, use_cache=False).logits[:, -1], answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = core.clip_gradients(model.parameters(), config.grad_clip)
        if not math.isfinite(norm):  # stop before the update spreads the NaN or infinity
            _diverged(step + 1, f"gradient norm {norm}")
        decay = max(0, config.steps - config.warmup_steps)  # the whole run after the warm-up
        for group in optimizer.param_groups:
            group["lr"] = config.lr * core.lr_factor(step, config.steps, config.warmup_steps, decay)
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
        bar.update(1)
    bar.close()
    write_json(out_dir / "history.json", history)
    return history


def _diverged(step: int, what: str) -> NoReturn:
    core.diverged("Training", step, what, "no checkpoint was saved for it", "lower lr or keep grad_clip on")


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
