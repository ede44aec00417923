"""Training Lorsa modules for any layer of any supported model, from one CPU to many GPUs.

One config, one trainer. The host model runs only up to the chosen layer; hooks capture what its attention
module receives and returns (HF coordinates; README, "Input space") and the module learns to reproduce the output,
top-K sparse, with Adam. `accelerate launch` runs the same code data-parallel (DDP).

A run folder holds the finished module (native format, loadable with `Lorsa.from_pretrained`), its
training record, `metrics.jsonl`, `training.png` and `checkpoints/`, from which `resume=True` continues
exactly where the last checkpoint left off.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lorsa_surgery import corpus, files
from lorsa_surgery.arch import arch_for
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.formats import fold_dataset_norms
from lorsa_surgery.lorsa import Lorsa
from lorsa_surgery.metrics import explained_variance
from lorsa_surgery.placement import input_device
from lorsa_surgery.splicing import splice

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
CHECKPOINTS = "checkpoints"
SAMPLED_CORPUS = "sampled_corpus.jsonl"


@dataclass
class TrainConfig:
    """What to train and how. Sizes left as None follow the host layer."""

    model: str
    """Host model: Hub id, local folder, .gguf file, or "smollm2" (the embedded default)."""
    layer: int
    """Index of the attention layer to reproduce."""
    out: str
    """Run folder: the finished module, metrics, plot and checkpoints go here."""
    revision: str | None = None
    """Hub revision of the host model."""
    n_heads: int | None = None
    """OV heads (dictionary size). Give this or `expansion`; None with neither means expansion 8
    (init "attention": twice the host's head count times head width, as `Lorsa.from_attention` builds)."""
    expansion: float | None = None
    """OV heads as a multiple of d_model."""
    n_qk_heads: int | None = None
    """Query-key heads, each shared by n_heads / n_qk_heads OV heads; None means the host's head count."""
    k: int = 64
    """Heads that fire per token (top-K)."""
    k_start: int | None = None
    """K at the first step when annealing; None means all heads."""
    k_anneal: float = 0.0
    """Fraction of the steps over which K falls linearly from k_start to k (0: no annealing)."""
    tokens: int = 1_000_000
    """Training tokens (rounded up to whole steps of batch_size x context)."""
    batch_size: int = 8
    """Sequences per optimiser step across all processes (the global batch)."""
    context: int = 256
    """Tokens per sequence, the first being the BOS token."""
    pack: bool = True
    """Pack documents end to end (separated by EOS); False starts every document in a new, padded sequence."""
    texts: tuple[str, ...] = ()
    """Training text: .txt files (one document each) and .jsonl files (one document per line). With no texts,
    dataset or sample_tokens, the built-in offline corpus (`lorsa_surgery.corpus.python_documentation`)."""
    text_field: str = "text"
    """Field holding the text in .jsonl lines and dataset rows."""
    dataset: str | None = None
    """A `datasets` dataset ("name" or "name:config", Hub id or local folder); needs the datasets extra."""
    dataset_split: str = "train"
    """Split of `dataset` to read."""
    sample_tokens: int = 0
    """Also sample this many tokens of text from the host model itself (offline, any model)."""
    eval_tokens: int = 8192
    """Held-out tokens (never trained on) for explained variance and the linear baseline."""
    lm_loss_tokens: int = 2048
    """Held-out tokens on which the LM loss is measured with and without the module spliced in (0: skip)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    init: Literal["qk", "attention", "random"] = "qk"
    """qk: copy W_Q/W_K from the host heads, random rank-1 OV heads; attention: start from the exact
    host copy (`Lorsa.from_attention`, which fixes the head counts); random: all weights random."""
    lr: float = 2e-4
    """Peak Adam learning rate."""
    warmup: float = 0.05
    """Fraction of the steps for the linear learning-rate warm-up."""
    cooldown: float = 0.2
    """Fraction of the steps at the end for the linear decay to zero."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    dead_window: int = 250_000
    """A head is dead if it has not fired in this many recent training tokens."""
    log_every: int = 10
    """Write a metrics line and refresh the progress bar every this many steps."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (0: never)."""
    cache_dir: str | None = None
    """Keep captured activations here as safetensors shards and reuse them across runs (float32: about
    4.6 KB per token for d_model 576)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Host model dtype."""
    device_map: str | None = None
    """Place the host with Accelerate, as in transformers ("auto", "balanced", ...; a host bigger than one device);
    None: the whole host on the training device."""
    max_memory: str | None = None
    """Memory per device for the host's placement, e.g. "0=20GiB,cpu=60GiB" (implies device_map "auto")."""
    offload_dir: str | None = None
    """Folder for host weights offloaded to disk."""
    autocast: bool = True
    """bf16 autocast for the Lorsa forward on GPU (never on CPU)."""
    seed: int = 0
    """Seeds the weights, the held-out split and the order of the training data."""
    resume: bool = False
    """Continue from the last checkpoint in `out` (a fresh start when there is none)."""

    def __post_init__(self) -> None:
        self.texts = tuple(str(t) for t in self.texts)
        if self.n_heads is not None and self.expansion is not None:
            raise LorsaSurgeryError("Give either n_heads or expansion, not both.")
        positive = ["k", "tokens", "batch_size", "context", "eval_tokens", "log_every", "dead_window"]
        positive += [n for n in ("n_heads", "n_qk_heads", "k_start") if getattr(self, n) is not None]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LorsaSurgeryError(f"{name} must be a positive integer, got {value!r}.")
        if self.expansion is not None and self.expansion <= 0:
            raise LorsaSurgeryError(f"expansion must be positive, got {self.expansion}.")
        for name in ("layer", "sample_tokens", "lm_loss_tokens", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise LorsaSurgeryError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.context < 2:
            raise LorsaSurgeryError(f"context must be at least 2 (BOS plus one token), got {self.context}.")
        if self.eval_tokens < self.context:
            raise LorsaSurgeryError(f"eval_tokens ({self.eval_tokens}) must cover at least one sequence of {self.context}.")
        for name in ("k_anneal", "warmup", "cooldown"):
            if not 0 <= getattr(self, name) <= 1:
                raise LorsaSurgeryError(f"{name} must be a fraction between 0 and 1, got {getattr(self, name)}.")
        if self.warmup + self.cooldown > 1:
            raise LorsaSurgeryError("warmup and cooldown together must not exceed the whole run.")
        if self.lr <= 0 or self.grad_clip < 0:
            raise LorsaSurgeryError("lr must be positive and grad_clip not negative.")
        if self.init not in ("qk", "attention", "random"):
            raise LorsaSurgeryError(f"init must be qk, attention or random, got {self.init!r}.")
        if self.max_memory is not None:
            from lorsa_surgery.placement import parse_max_memory

            parse_max_memory(self.max_memory)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LorsaSurgeryError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["texts"] = list(self.texts)
        return d


# ---- text to token sequences -------------------------------------------------------------------------


def _special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, separator, pad) token ids: BOS opens every sequence, EOS separates packed documents."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise LorsaSurgeryError("The tokenizer has neither a BOS nor an EOS token to open sequences with.")
    start = bos if bos is not None else eos
    sep = eos if eos is not None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    return start, sep, pad


def token_sequences(docs: list[str], tokenizer, context: int, pack: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, context] and padding mask [N, context]; each row starts with BOS.

    Packed, documents run end to end separated by EOS; unpacked, each document starts a row. The last
    row of a stream is right-padded rather than dropped.
    """
    start, sep, pad = _special_ids(tokenizer)
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    streams = [[t for doc in encoded for t in (*doc, sep)]] if pack else [doc for doc in encoded if doc]
    rows, width = [], context - 1
    for stream in streams:
        rows += [stream[i : i + width] for i in range(0, len(stream), width)]
    if not rows:
        raise LorsaSurgeryError("The training text is empty.")
    ids = torch.full((len(rows), context), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), context, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 0], ids[i, 1 : len(row) + 1] = start, torch.tensor(row)
        mask[i, : len(row) + 1] = 1
    return ids, mask


def _documents(config: TrainConfig, model, tokenizer, out: Path, accelerator) -> list[str]:
    docs = corpus.load_texts(list(config.texts), jsonl_field=config.text_field) if config.texts else []
    if config.dataset:
        wanted = 6 * (config.tokens + config.eval_tokens)  # characters; about 4-5 per token in English
        docs += corpus.load_dataset_texts(config.dataset, wanted, split=config.dataset_split, field=config.text_field)
    if config.sample_tokens:
        path = out / SAMPLED_CORPUS
        # Sampling is slow and random: do it once (main process first) and reuse the file on resume.
        with accelerator.main_process_first():
            if not path.exists():
                sampled = corpus.sample_from_model(model, tokenizer, config.sample_tokens, seed=config.seed)
                files.write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in sampled))
        docs += corpus.load_texts([path])
    if not docs:
        accelerator.print(f"No training text given: training on the built-in offline corpus, {corpus.BUILTIN_CORPUS}.")
        docs = corpus.python_documentation()
    return docs


# ---- activations ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the output hook so the host model does not run the layers after the chosen one."""


@torch.no_grad()
def capture(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer `layer`'s attention module receives (hidden_states) and returns (output[0]), [B, T, d]."""
    arch = arch_for(model)
    layers = arch.layer_list(model)
    if not 0 <= layer < len(layers):
        raise LorsaSurgeryError(f"Layer {layer} is out of range: the model has {len(layers)} layers.")
    attention = getattr(layers[layer], arch.attention)
    seen: dict[str, torch.Tensor] = {}

    def before(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def after(module, args, kwargs, output):
        seen["y"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handles = [
        attention.register_forward_pre_hook(before, with_kwargs=True),
        attention.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen["x"], seen["y"]


class ActivationSource:
    """Attention inputs and outputs of one host layer for numbered token sequences, optionally cached on disk.

    The cache is a folder per (host, layer, token sequences) holding safetensors shards; each shard lists
    the sequence numbers it holds, so any run over the same text reuses whatever an earlier run captured,
    whatever its seed, batch size or number of processes.
    """

    def __init__(self, model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache_dir: str | Path | None = None, host: dict[str, Any] | None = None,
                 device: torch.device | None = None):
        self.model, self.layer = model, layer
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.device = device or input_device(model)
        """Where batches go (the Lorsa module's device); the host may be spread over others."""
        self.folder: Path | None = None
        self.index: dict[int, tuple[Path, int]] = {}
        if cache_dir is not None:
            digest = hashlib.sha256(input_ids.numpy().tobytes() + attention_mask.numpy().tobytes())
            key = {"host": host or {}, "layer": layer, "dtype": str(next(model.parameters()).dtype),
                   "sequences": digest.hexdigest(), "shape": list(input_ids.shape)}
            name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            self.folder = Path(cache_dir) / f"L{layer}-{name}"
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "key.json").exists():
                files.write_json(self.folder / "key.json", key)
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                with safe_open(str(shard), "pt") as f:
                    for row, seq in enumerate(f.get_tensor("sequence").tolist()):
                        self.index.setdefault(seq, (shard, row))

    def get(self, sequences: list[int]) -> dict[str, torch.Tensor]:
        """x, y [B, T, d] on `device`, with input_ids, attention_mask, position_ids and loss_mask [B, T]."""
        missing = [s for s in sequences if s not in self.index]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            host = input_device(self.model)
            x, y = capture(self.model, self.layer, self.input_ids[missing].to(host), self.attention_mask[missing].to(host))
            fresh = {s: (x[i], y[i]) for i, s in enumerate(missing)}
            if self.folder is not None:
                shard = self.folder / f"shard-{uuid.uuid4().hex}.safetensors"
                files.write_safetensors(shard, {"sequence": torch.tensor(missing), "x": x, "y": y})
                self.index.update({s: (shard, i) for i, s in enumerate(missing)})
        xs, ys = [], []
        for s in sequences:
            if s in fresh:
                x, y = fresh[s]
            else:
                shard, row = self.index[s]
                with safe_open(str(shard), "pt") as f:
                    x, y = f.get_slice("x")[row], f.get_slice("y")[row]
            xs.append(x.to(self.device))
            ys.append(y.to(self.device))
        return _batch(torch.stack(xs), torch.stack(ys), self.input_ids[sequences], self.attention_mask[sequences], self.model)


def _batch(x, y, input_ids, attention_mask, model) -> dict[str, torch.Tensor]:
    bos = getattr(model.config, "bos_token_id", None)
    device = x.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    loss_mask = attention_mask.bool()
    loss_mask[:, 0] = False  # the BOS every sequence opens with: an attention sink, not text
    if isinstance(bos, int):
        loss_mask &= input_ids != bos
    return {
        "x": x, "y": y, "input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
    }


# ---- evaluation helpers ----------------------------------------------------------------------------------


def _target_sums(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, sum of |target|^2, sum of target (d values)] over the masked tokens, float64."""
    target = target.reshape(-1, target.shape[-1]).double()
    if mask is not None:
        target = target[mask.reshape(-1).bool()]
    n = torch.tensor([float(len(target))], dtype=torch.float64, device=target.device)
    return torch.cat([n, target.pow(2).sum()[None], target.sum(0)])


def _ev_sums(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[squared error, tokens, sum of |target|^2, sum of target]: `metrics.explained_variance` in a form that
    adds up across batches and processes."""
    error = (pred.double() - target.double()).pow(2).sum(-1)
    if mask is not None:
        error = error[mask.bool()]
    return torch.cat([error.sum()[None], _target_sums(target, mask)])


def _ev_from_sums(sums: torch.Tensor) -> float:
    sse, n, sq, total = sums[0], sums[1], sums[2], sums[3:]
    variance = sq - total.pow(2).sum() / n.clamp_min(1)
    return float(1 - sse / variance) if variance > 0 else float("nan")


class LinearBaseline:
    """The best least-squares affine map from the attention input to its output, token by token.

    Fitted from streamed tokens through the normal equations (float64), so it costs no memory to fit on a
    whole training run. Attention mixes tokens; this map cannot, which makes it the baseline to beat.
    """

    def __init__(self, d_in: int, d_out: int | None = None, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(d_in + 1, d_out or d_in, dtype=torch.float64, device=device)

    @staticmethod
    def _augment(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).double()
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens: inputs x [N, d_in], outputs y [N, d_out]."""
        xa = self._augment(x)
        self.xtx += xa.T @ xa
        self.xty += xa.T @ y.reshape(-1, y.shape[-1]).double()

    def solve(self) -> torch.Tensor:
        """The map [d_in + 1, d_out] (last row: bias); a whisper of ridge keeps it defined on too few tokens."""
        ridge = 1e-9 * self.xtx.diagonal().mean().clamp_min(1e-30)
        eye = torch.eye(len(self.xtx), dtype=self.xtx.dtype, device=self.xtx.device)
        return torch.linalg.solve(self.xtx + ridge * eye, self.xty)

    def predict(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.solve() if weights is None else weights
        return (self._augment(x) @ weights).reshape(*x.shape[:-1], weights.shape[1])


def linear_baseline_ev(x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor | None = None,
                       eval_y: torch.Tensor | None = None) -> float:
    """Explained variance of the best linear map from x to y [N, d], fitted on (x, y) and scored on the eval
    tokens (or in-sample when none are given, which is the best any linear map can do on them)."""
    baseline = LinearBaseline(x.shape[-1], y.shape[-1], x.device)
    baseline.update(x, y)
    eval_x, eval_y = (x, y) if eval_x is None else (eval_x, eval_y)
    return explained_variance(baseline.predict(eval_x), eval_y)


@torch.no_grad()
def _lm_loss_sums(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """[summed next-token loss, predicted tokens] over real (unpadded) targets."""
    device = input_device(model)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(input_ids), batch_size):
        ids, mask = input_ids[i : i + batch_size].to(device), attention_mask[i : i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        total += torch.tensor([nll[keep].double().sum().item(), keep.sum().item()], dtype=torch.float64)
    return total


def lm_loss_change(model: nn.Module, lorsa: Lorsa, layer: int, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean next-token loss of the host on these tokens: (original, with `lorsa` spliced in at `layer`)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    original = _lm_loss_sums(model, input_ids, attention_mask)
    with splice(model, {layer: lorsa}):
        spliced = _lm_loss_sums(model, input_ids, attention_mask)
    return float(original[0] / original[1]), float(spliced[0] / spliced[1])


# ---- the trainer ---------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """What DDP wraps: the module's top-K forward and the summed squared error, plus the heads that fired."""

    def __init__(self, lorsa: Lorsa):
        super().__init__()
        self.lorsa = lorsa

    def forward(self, x, y, position_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
        # Lorsa.forward's top-K path, split open to see which heads fired (for dead-head tracking).
        z = self.lorsa.hidden_pre(x, position_ids, attention_mask)
        idx, vals = self.lorsa._topk(z)
        out = self.lorsa.decode_sparse(idx, vals)
        sse = (out.float() - y.float()).pow(2).sum(-1)
        # A head selected with activation zero (fewer than K heads positive at that token) has not fired.
        return (sse * loss_mask).sum(), idx[(vals > 0) & loss_mask[..., None]]


def _schedule(config: TrainConfig, steps: int) -> Callable[[int], float]:
    warm, cool = round(config.warmup * steps), round(config.cooldown * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cool and step >= steps - cool:  # a run too short for a cool-down has none (and no division by zero)
            return max(0.0, (steps - step) / cool)
        return 1.0

    return factor


def _current_k(config: TrainConfig, n_heads: int, steps: int, step: int) -> int:
    anneal = round(config.k_anneal * steps)
    if step >= anneal:
        return config.k
    start = min(config.k_start or n_heads, n_heads)
    return math.ceil(start - (start - config.k) * step / anneal)


def planned_heads(config: TrainConfig, host_config) -> tuple[int, int]:
    """(QK heads, OV heads) the run will train, from the host's config alone, checked against K: so a bad size is
    reported before the host loads."""
    from lorsa_surgery.arch import _head_counts

    text = host_config.get_text_config(decoder=True)
    d, (H, _, hd) = text.hidden_size, _head_counts(host_config)
    exact = 2 * H * hd  # the size of `Lorsa.from_attention`'s copy
    if config.init == "attention":
        n_qk, n_ov = config.n_qk_heads or H, config.n_heads or exact
        if config.expansion is not None:
            n_ov = round(d * config.expansion)
        if (n_qk, n_ov) != (H, exact):
            raise LorsaSurgeryError(f"init 'attention' copies the host layer exactly: it needs {exact} heads and {H} QK heads.")
    else:
        n_qk = config.n_qk_heads or H
        n_ov = config.n_heads or round(d * (config.expansion or 8))
    if n_ov % n_qk:
        raise LorsaSurgeryError(f"The number of heads ({n_ov}) must be a multiple of the QK heads ({n_qk}).")
    if config.k > n_ov or (config.k_start or 0) > n_ov:
        raise LorsaSurgeryError(f"k ({config.k}) and k_start cannot exceed the number of heads ({n_ov}).")
    return n_qk, n_ov


def _build(config: TrainConfig, model: nn.Module, host: dict[str, Any], norms: dict[str, float]) -> Lorsa:
    """A new module for the host layer: sizes resolved, weights initialised as config.init says, in the scaled
    coordinates it trains in (inputs and outputs of average norm sqrt(d_model); `norms` are the raw averages)."""
    source = Lorsa.from_attention(model, config.layer)
    n_qk, n_ov = planned_heads(config, model.config)
    d, H = source.cfg.d_model, source.cfg.n_qk_heads
    cfg = dataclasses.replace(
        source.cfg, n_qk_heads=n_qk, n_ov_heads=n_ov, act_fn="topk", top_k=config.k, use_decoder_bias=True,
        n_ctx=config.context, input_space="hf", host_model=host.get("id"),
        host_revision=host.get("revision") or host.get("sha256"), host_layer=config.layer,
    )
    torch.manual_seed(config.seed)
    lorsa = Lorsa(cfg)  # random weights, drawn for the scaled coordinates as the reference draws them
    with torch.no_grad():
        if config.init == "attention":
            for name, value in source.state_dict().items():
                lorsa.get_parameter(name).copy_(value)
            fold_dataset_norms(lorsa, d / norms["in"], d / norms["out"])  # the inverse fold
        elif config.init == "qk":
            heads = torch.arange(n_qk) * H // n_qk  # contiguous blocks of copies when n_qk is a multiple of H
            for name in ("W_Q", "W_K", "b_Q", "b_K") + (("q_norm", "k_norm") if cfg.use_post_qk_ln else ()):
                lorsa.get_parameter(name).copy_(source.get_parameter(name)[heads])
            lorsa.W_Q.mul_(norms["in"] / math.sqrt(d))  # queries and keys of scaled inputs equal the host's
            lorsa.W_K.mul_(norms["in"] / math.sqrt(d))
    return lorsa


def _state_tensors(lorsa: Lorsa, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"lorsa.{k}": v for k, v in lorsa.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"adam.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {**tensors, **extra}


class _RunFolder:
    """The files of a run: metrics log, plot and checkpoints (written by the main process only)."""

    def __init__(self, out: Path, main: bool):
        self.out, self.main = out, main
        self.history: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(self, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        folder = self.out / CHECKPOINTS / f"step_{step:07d}"
        files.write_safetensors(folder / "state.safetensors", tensors)
        files.write_json(folder / "state.json", state)
        # The pointer is written last: a run killed mid-checkpoint resumes from the previous one.
        files.write_json(self.out / CHECKPOINTS / "latest.json", {"step": step})
        for old in (self.out / CHECKPOINTS).glob("step_*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        pointer = self.out / CHECKPOINTS / "latest.json"
        if not pointer.exists():
            return None
        folder = self.out / CHECKPOINTS / f"step_{files.read_json(pointer)['step']:07d}"
        return files.read_json(folder / "state.json"), load_file(str(folder / "state.safetensors"))

    def plot(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in self.history if r["kind"] == "train"]
        evals = [r for r in self.history if r["kind"] == "eval"]
        fig = Figure(figsize=(11, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        loss, ev, dead = fig.subplots(1, 3)
        loss.plot([r["tokens"] for r in train], [r["loss"] for r in train])
        loss.set(xlabel="training tokens", ylabel="squared error per token (scaled)", yscale="log", title="training loss")
        ev.plot([r["tokens"] for r in train], [r["ev"] for r in train], alpha=0.5, label="training batch")
        ev.plot([r["tokens"] for r in evals], [r["ev"] for r in evals], "o-", label="held out")
        if evals:
            ev.axhline(evals[-1]["linear_ev"], ls="--", color="gray", label="best linear map (held out)")
        ev.set(xlabel="training tokens", ylabel="explained variance", title="explained variance")
        ev.legend(fontsize=8)
        dead.plot([r["tokens"] for r in train], [r["dead_frac"] for r in train])
        dead.set(xlabel="training tokens", ylabel="fraction of heads", title="dead heads", ylim=(0, 1))
        files.write_figure(self.out / PLOT_FILE, fig)


def train(config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> Lorsa:
    """Train a Lorsa module for `config.layer` of `config.model` and save it in `config.out`.

    `model`, `tokenizer`: the host, already loaded (else loaded from config.model). `on_step(step, record)`
    is called on every process after each optimiser step; an exception raised there stops the run, which
    `resume=True` continues from the last checkpoint. Under `accelerate launch` every process runs this.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from lorsa_surgery.models import base_record, load_config, load_model, public_record

    # Without CUDA, cpu=True is what lets a multi-process launch (torchrun) run DDP over gloo.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes > 1 and (config.device_map or config.max_memory):
        raise LorsaSurgeryError("A host placed with device_map or max_memory trains in one process; DDP copies the host to each.")
    out = Path(config.out)
    # Sizes are checked from the host's config before anything is written or the host loads.
    planned_heads(config, model.config if model is not None else load_config(config.model, config.revision))
    if acc.is_main_process:
        _prepare_folder(config, out)
    acc.wait_for_everyone()

    if model is None:
        model, tokenizer = load_model(config.model, revision=config.revision, dtype=config.dtype, device_map=config.device_map,
                                      max_memory=config.max_memory, offload_dir=config.offload_dir)
        if getattr(model, "hf_device_map", None) is None:  # a dispatched host stays where Accelerate put it
            model.to(acc.device)
    elif tokenizer is None:
        raise LorsaSurgeryError("Pass the tokenizer together with the model.")
    host = public_record(base_record(config.model, config.revision))  # never a local path: checkpoints are shared
    model.requires_grad_(False)
    run = _RunFolder(out, acc.is_main_process)

    # Data: numbered sequences; a seeded random subset is held out, the rest is shuffled anew each epoch.
    ids, mask = token_sequences(_documents(config, model, tokenizer, out, acc), tokenizer, config.context, config.pack)
    n_eval = max(1, config.eval_tokens // config.context)
    if len(ids) <= n_eval:
        raise LorsaSurgeryError(f"The text gives {len(ids)} sequences of {config.context} tokens; need more than the {n_eval} held out.")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config.seed))
    eval_seqs, train_seqs = order[:n_eval].sort().values.tolist(), order[n_eval:].tolist()
    source = ActivationSource(model, config.layer, ids, mask, config.cache_dir, host, device=acc.device)
    P, rank = acc.num_processes, acc.process_index
    if config.batch_size % P:
        raise LorsaSurgeryError(f"batch_size ({config.batch_size}) must be divisible by the number of processes ({P}).")
    local = config.batch_size // P
    steps = math.ceil(config.tokens / (config.batch_size * config.context))

    def batch_sequences(step: int) -> list[int]:
        picked = []
        for i in range(step * config.batch_size + rank * local, step * config.batch_size + (rank + 1) * local):
            epoch, j = divmod(i, len(train_seqs))
            perm = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(config.seed + 1 + epoch))
            picked.append(train_seqs[perm[j]])
        return picked

    resumed = run.latest() if config.resume else None
    if resumed is None:
        # Train on inputs and outputs scaled to an average norm of sqrt(d_model), as the reference does, so one
        # learning rate suits every model and layer; the scales are folded into the weights at the end.
        first = source.get(batch_sequences(0))
        x, y = first["x"][first["loss_mask"]].double(), first["y"][first["loss_mask"]].double()
        sums = acc.reduce(torch.cat([x.norm(dim=-1).sum()[None], y.norm(dim=-1).sum()[None], y.sum(0),
                                     torch.tensor([float(len(x))], dtype=torch.float64, device=x.device)]), "sum")
        n = sums[-1].clamp_min(1)
        norms = {"in": float(sums[0] / n), "out": float(sums[1] / n)}
    else:
        norms = resumed[0]["norms"]
    lorsa = _build(config, model, host, norms).to(acc.device)
    n_heads, d = lorsa.cfg.n_ov_heads, lorsa.cfg.d_model
    scale_in, scale_out = math.sqrt(d) / norms["in"], math.sqrt(d) / norms["out"]
    baseline = LinearBaseline(d, device=acc.device)
    last_fired = torch.zeros(n_heads, dtype=torch.long, device=acc.device)
    objective = acc.prepare_model(_Objective(lorsa))
    optimizer = torch.optim.Adam(lorsa.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps))
    timing = {"train_s": 0.0, "lorsa_s": 0.0}

    start = 0
    if resumed is not None:
        state, tensors = resumed
        start = state["step"]
        lorsa.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("lorsa.")})
        adam = optimizer.state_dict()
        adam["state"] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                adam["state"].setdefault(int(index), {})[name] = value
        adam["param_groups"] = state["param_groups"]
        optimizer.load_state_dict(adam)
        scheduler.load_state_dict(state["scheduler"])
        last_fired.copy_(tensors["last_fired"])
        if acc.is_main_process:  # the accumulated sums live once, on the main process
            baseline.xtx.copy_(tensors["baseline.xtx"])
            baseline.xty.copy_(tensors["baseline.xty"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        timing = state["timing"]
        run.history = [r for r in _read_metrics(out) if r["step"] <= start]
        if acc.is_main_process:
            files.write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in run.history))
    else:
        if acc.is_main_process:
            (out / METRICS_FILE).unlink(missing_ok=True)
        if config.init != "attention":
            with torch.no_grad():
                lorsa.b_D.copy_(sums[2:-1] / n * scale_out)  # output bias = mean target

    evaluator = _Evaluator(config, acc, model, lorsa, source, eval_seqs, baseline, norms)
    use_autocast = config.autocast and acc.device.type == "cuda"
    bar = tqdm(total=steps, initial=start, disable=not acc.is_main_process, desc=f"train L{config.layer}", dynamic_ncols=True)
    window: list[torch.Tensor] = []
    for step in range(start, steps):
        t0 = time.perf_counter()
        lorsa.cfg.top_k = _current_k(config, n_heads, steps, step)
        batch = source.get(batch_sequences(step))
        n_global = acc.reduce(batch["loss_mask"].sum().double(), "sum").clamp_min(1)
        t1 = time.perf_counter()
        mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"]
        with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=use_autocast):
            sse, fired = objective(batch["x"] * scale_in, batch["y"] * scale_out, batch["position_ids"], mask,
                                   batch["loss_mask"])
        # DDP averages gradients over processes; scaling by P / global tokens makes that the global token mean.
        (sse * P / n_global).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(lorsa.parameters(), config.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        done = step + 1
        tokens = done * config.batch_size * config.context
        keep = batch["loss_mask"]
        baseline.update(batch["x"][keep], batch["y"][keep])
        last_fired[fired.unique()] = tokens
        window.append(torch.cat([sse.detach().double()[None], _target_sums(batch["y"] * scale_out, keep)]))
        timing["train_s"] += time.perf_counter() - t0
        timing["lorsa_s"] += t2 - t1
        record: dict[str, Any] = {"kind": "train", "step": done, "tokens": tokens}
        if done % config.log_every == 0 or done == steps:
            sums = acc.reduce(torch.stack(window).sum(0), "sum")
            window = []
            fired_all = acc.gather(last_fired[None]).amax(0)
            record.update(
                loss=float(sums[0] / sums[1]), ev=_ev_from_sums(sums), lr=scheduler.get_last_lr()[0],
                k=lorsa.cfg.top_k, grad_norm=float(grad_norm), dead_frac=_dead_fraction(fired_all, tokens, config.dead_window),
                tokens_per_s=_rate(config, done, timing["train_s"]),
            )
            run.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3g}", ev=f"{record['ev']:.3f}", k=record["k"],
                            dead=f"{record['dead_frac']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (config.eval_every and done % config.eval_every == 0) or done == steps:
            result = evaluator(done, tokens)
            run.log(result)
            bar.write(f"step {done}: held-out EV {result['ev']:.4f} (best linear map {result['linear_ev']:.4f})"
                      + (f", LM loss {result['lm_loss_original']:.4f} -> {result['lm_loss_spliced']:.4f}"
                         if result.get("lm_loss_spliced") is not None else ""))
            if acc.is_main_process:
                run.plot()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
            fired_all = acc.gather(last_fired[None]).amax(0)
            xtx, xty = acc.reduce(baseline.xtx.clone(), "sum"), acc.reduce(baseline.xty.clone(), "sum")
            if acc.is_main_process:
                state = {"step": done, "timing": timing, "norms": norms, "scheduler": scheduler.state_dict(),
                         "param_groups": optimizer.state_dict()["param_groups"]}
                extra = {"last_fired": fired_all, "baseline.xtx": xtx, "baseline.xty": xty}
                run.checkpoint(done, state, _state_tensors(lorsa, optimizer, extra))
            acc.wait_for_everyone()
        if on_step is not None:
            on_step(done, record)
    bar.close()

    lorsa.cfg.top_k = config.k
    with torch.no_grad():
        fold_dataset_norms(lorsa, norms["in"], norms["out"])
    final = next(r for r in reversed(run.history) if r["kind"] == "eval")
    last = next(r for r in reversed(run.history) if r["kind"] == "train" and "loss" in r)
    lorsa.training_info = {
        "model": host.get("id"), "revision": host.get("revision") or host.get("sha256"), "layer": config.layer,
        "tokens": steps * config.batch_size * config.context, "steps": steps, "k": config.k, "lr": config.lr,
        "n_heads": n_heads, "n_qk_heads": lorsa.cfg.n_qk_heads, "batch_size": config.batch_size,
        "context": config.context, "init": config.init, "seed": config.seed, "processes": P,
        "explained_variance": final["ev"], "linear_baseline_ev": final["linear_ev"],
        "lm_loss_original": final.get("lm_loss_original"), "lm_loss_spliced": final.get("lm_loss_spliced"),
        "eval_tokens": final["eval_tokens"], "dead_heads_fraction": last["dead_frac"],
        "tokens_per_s": _rate(config, steps, timing["train_s"]), "lorsa_step_tokens_per_s": _rate(config, steps, timing["lorsa_s"]),
        "device": acc.device.type,
    }
    if acc.is_main_process:
        lorsa.save_pretrained(out)
    acc.wait_for_everyone()
    return lorsa


def _rate(config: TrainConfig, steps: int, seconds: float) -> float:
    return steps * config.batch_size * config.context / max(seconds, 1e-9)


def _dead_fraction(last_fired: torch.Tensor, tokens: int, window: int) -> float:
    return float((last_fired <= max(0, tokens - window)).float().mean())


def _read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prepare_folder(config: TrainConfig, out: Path) -> None:
    """Refuse to mix runs: a folder with a run in it is only continued, with the same settings."""
    saved = out / CONFIG_FILE
    if saved.exists():
        if not config.resume:
            raise LorsaSurgeryError(f"{out} already holds a training run; resume it or choose another folder.")
        before = files.read_json(saved)
        changed = sorted(k for k, v in config.to_dict().items() if k != "resume" and before.get(k) != v)
        if changed:
            raise LorsaSurgeryError(f"Cannot resume {out} with different settings: {', '.join(changed)}.")
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(saved, config.to_dict())


class _Evaluator:
    """Held-out explained variance, the linear baseline and the LM loss with and without the module."""

    def __init__(self, config, acc, model, lorsa, source, eval_seqs, baseline, norms):
        self.config, self.acc, self.model, self.lorsa, self.source = config, acc, model, lorsa, source
        self.baseline, self.norms = baseline, norms
        # Each process scores its share of the held-out sequences; sums are reduced across processes.
        self.mine = eval_seqs[acc.process_index :: acc.num_processes]
        n_lm = config.lm_loss_tokens // config.context
        self.lm_mine = eval_seqs[:n_lm][acc.process_index :: acc.num_processes]
        self.batches: list[dict[str, torch.Tensor]] | None = None
        self.lm_original: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, step: int, tokens: int) -> dict[str, Any]:
        acc, lorsa, d = self.acc, self.lorsa, self.lorsa.cfg.d_model
        if self.batches is None:
            size = max(1, self.config.batch_size // acc.num_processes)
            self.batches = [self.source.get(self.mine[i : i + size]) for i in range(0, len(self.mine), size)]
        xtx = acc.reduce(self.baseline.xtx.clone(), "sum")
        xty = acc.reduce(self.baseline.xty.clone(), "sum")
        global_baseline = LinearBaseline(d, device=xtx.device)
        global_baseline.xtx, global_baseline.xty = xtx, xty
        weights = global_baseline.solve()
        sums = torch.zeros(3 + d, dtype=torch.float64, device=acc.device)
        linear = torch.zeros_like(sums)
        for b in self.batches:
            mask = None if bool(b["attention_mask"].all()) else b["attention_mask"]
            # Explained variance does not depend on the scale: compare in the scaled coordinates trained in.
            pred = lorsa(b["x"] * math.sqrt(d) / self.norms["in"], b["position_ids"], mask)
            sums += _ev_sums(pred, b["y"] * math.sqrt(d) / self.norms["out"], b["loss_mask"])
            linear += _ev_sums(global_baseline.predict(b["x"], weights), b["y"], b["loss_mask"])
        sums, linear = acc.reduce(sums, "sum"), acc.reduce(linear, "sum")
        result: dict[str, Any] = {"kind": "eval", "step": step, "tokens": tokens, "ev": _ev_from_sums(sums),
                                  "linear_ev": _ev_from_sums(linear), "eval_tokens": int(sums[1])}
        if self.config.lm_loss_tokens:
            ids, mask = self.source.input_ids[self.lm_mine], self.source.attention_mask[self.lm_mine]
            if self.lm_original is None:
                self.lm_original = acc.reduce(_lm_loss_sums(self.model, ids, mask).to(acc.device), "sum")
            folded = copy.deepcopy(lorsa)
            fold_dataset_norms(folded, self.norms["in"], self.norms["out"])
            with splice(self.model, {self.config.layer: folded}):
                spliced = acc.reduce(_lm_loss_sums(self.model, ids, mask).to(acc.device), "sum")
            result.update(lm_loss_original=float(self.lm_original[0] / self.lm_original[1]),
                          lm_loss_spliced=float(spliced[0] / spliced[1]), lm_loss_tokens=int(spliced[1]))
        return result
