"""Training Lorsa modules for any layers of any supported model, from one CPU to many GPUs.

One config, one trainer. The host model runs once per batch, only up to the deepest chosen layer; hooks capture
what each chosen attention module receives and returns (HF coordinates; README, "Input space") and one Lorsa
module per layer learns to reproduce its layer's output, top-K sparse, with its own Adam optimiser.
`accelerate launch` runs the same code data-parallel (DDP). With `inputs="replaced"` the capture runs through the
modules as they train, so each layer learns on what the replaced layers below it hand on.

A run folder holds one folder per layer (`L3/`: the finished module, loadable with `Lorsa.from_pretrained`,
its training record, `metrics.jsonl` and `training.png`), `together.json` when it trained several layers (KL and
LM loss with all of them spliced at once) and `checkpoints/`, from which `resume=True` continues exactly where the
last checkpoint left off.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from safetensors import safe_open
from torch import nn

from lorsa_surgery.host import corpus

from lorsa_surgery.io import files

from lorsa_surgery.lorsa import formats
from lorsa_surgery.host.arch import exact_copy, from_host_subspaces, host_rotary
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.formats import fold_dataset_norms
from lorsa_surgery.lorsa.config import check_module_size
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.metrics import compare, explained_variance, lm_loss_sums
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.hooks import watch_attention
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.training import core
from lorsa_surgery.training.config import TrainConfig

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
TOGETHER_FILE = "together.json"
CHECKPOINTS = "checkpoints"
SAMPLED_CORPUS = "sampled_corpus.jsonl"


def layer_folder(out: str | Path, layer: int) -> Path:
    """Where a run keeps the module (and metrics, plot) for one layer."""
    return Path(out) / f"L{layer}"


# ---- text to token sequences -------------------------------------------------------------------------


def token_sequences(docs: list[str], tokenizer, context: int, pack: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, context] and padding mask [N, context]; each row starts with BOS.

    Packed, documents run end to end separated by EOS; unpacked, each document starts a row. The last
    row of a stream is right-padded rather than dropped.
    """
    start, sep, pad = corpus.special_ids(tokenizer)
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


@torch.no_grad()
def capture_layers(model: nn.Module, layers: list[int] | tuple[int, ...], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each layer, what its attention module receives (hidden_states) and returns (output[0]), [B, T, d]; the
    host runs once, up to the deepest of them."""
    with watch_attention(model, layers, stop=True) as calls:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {layer: (calls[layer].hidden_states, calls[layer].result) for layer in layers}


@torch.no_grad()
def capture_replaced(model: nn.Module, modules: dict[int, Lorsa], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each layer of `modules`, its attention input with every one of `modules` spliced in (replace mode), so
    each layer sees what the layers below it make of the text once replaced, and the original attention's output on
    that input, [B, T, d]; the host runs once, up to the deepest of them."""
    with splice(model, modules, mode="replace"), watch_attention(model, modules, stop=True) as calls:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {layer: (call.hidden_states, call.module.original(*call.args, **call.kwargs)[0]) for layer, call in calls.items()}


def capture(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer `layer`'s attention module receives (hidden_states) and returns (output[0]), [B, T, d]."""
    return capture_layers(model, [layer], input_ids, attention_mask)[layer]


class ActivationSource:
    """Attention inputs and outputs of some host layers for numbered token sequences, optionally cached on disk.

    The cache is a folder per (host, layer, token sequences) holding safetensors shards; each shard lists
    the sequence numbers it holds, so any run over the same text reuses whatever an earlier run captured,
    whatever its seed, batch size, number of processes or other layers.
    """

    def __init__(self, model: nn.Module, layers: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache_dir: str | Path | None = None, host: dict[str, Any] | None = None,
                 device: torch.device | None = None):
        self.model, self.layers = model, tuple(layers)
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.device = device or input_device(model)
        """Where batches go (the Lorsa modules' device); the host may be spread over others."""
        self.folders: dict[int, Path] = {}
        self.index: dict[int, dict[int, tuple[Path, int]]] = {layer: {} for layer in self.layers}
        if cache_dir is None:
            return
        digest = hashlib.sha256(input_ids.numpy().tobytes() + attention_mask.numpy().tobytes()).hexdigest()
        for layer in self.layers:
            key = {"host": host or {}, "layer": layer, "dtype": str(next(model.parameters()).dtype),
                   "sequences": digest, "shape": list(input_ids.shape)}
            name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            folder = self.folders[layer] = Path(cache_dir) / f"L{layer}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "key.json").exists():
                files.write_json(folder / "key.json", key)
            for shard in sorted(folder.glob("shard-*.safetensors")):
                with safe_open(str(shard), "pt") as f:
                    for row, seq in enumerate(f.get_tensor("sequence").tolist()):
                        self.index[layer].setdefault(seq, (shard, row))

    def get(self, sequences: list[int], replaced: dict[int, Lorsa] | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer: x, y [B, T, d] on `device`, with input_ids, attention_mask, position_ids and loss_mask [B, T].
        With `replaced` (a module for each layer, in host coordinates), captured afresh through them (see
        `capture_replaced`), never from the cache."""
        if replaced is not None:
            host = input_device(self.model)
            captured = capture_replaced(self.model, replaced, self.input_ids[sequences].to(host),
                                        self.attention_mask[sequences].to(host))
            return {layer: _batch(x.to(self.device), y.to(self.device), self.input_ids[sequences],
                                  self.attention_mask[sequences], self.model, layer) for layer, (x, y) in captured.items()}
        missing = sorted({s for layer in self.layers for s in sequences if s not in self.index[layer]})
        fresh: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        if missing:
            host = input_device(self.model)
            captured = capture_layers(self.model, self.layers, self.input_ids[missing].to(host),
                                      self.attention_mask[missing].to(host))
            for layer, (x, y) in captured.items():
                fresh[layer] = {s: (x[i], y[i]) for i, s in enumerate(missing)}
                new = [i for i, s in enumerate(missing) if s not in self.index[layer]]
                if layer in self.folders and new:
                    shard = self.folders[layer] / f"shard-{uuid.uuid4().hex}.safetensors"
                    files.write_safetensors(shard, {"sequence": torch.tensor([missing[i] for i in new]), "x": x[new], "y": y[new]})
                    self.index[layer].update({missing[i]: (shard, j) for j, i in enumerate(new)})
        batches = {}
        for layer in self.layers:
            xs, ys = [], []
            for s in sequences:
                if s in fresh.get(layer, {}):
                    x, y = fresh[layer][s]
                else:
                    shard, row = self.index[layer][s]
                    with safe_open(str(shard), "pt") as f:
                        x, y = f.get_slice("x")[row], f.get_slice("y")[row]
                xs.append(x.to(self.device))
                ys.append(y.to(self.device))
            batches[layer] = _batch(torch.stack(xs), torch.stack(ys), self.input_ids[sequences],
                                    self.attention_mask[sequences], self.model, layer)
        return batches


def _batch(x, y, input_ids, attention_mask, model, layer: int) -> dict[str, Any]:
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
        # The host's cos and sin where the module cannot compute them, at the positions the host ran at (rows are
        # right-padded, so they are the real tokens' positions).
        "rotary": host_rotary(model, layer, torch.arange(x.shape[1], device=device)[None]),
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


def lm_loss_change(model: nn.Module, lorsa: Lorsa, layer: int, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean next-token loss of the host on these tokens: (original, with `lorsa` spliced in at `layer`)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    original = lm_loss_sums(model, input_ids, attention_mask)
    with splice(model, {layer: lorsa}):
        spliced = lm_loss_sums(model, input_ids, attention_mask)
    return float(original[0] / original[1]), float(spliced[0] / spliced[1])


# ---- the trainer ---------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """What DDP wraps: the module's top-K forward and the summed squared error, plus the heads that fired."""

    def __init__(self, lorsa: Lorsa):
        super().__init__()
        self.lorsa = lorsa

    def forward(self, x, y, position_ids, attention_mask, loss_mask, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        # Lorsa.forward's top-K path, split open to see which heads fired (for dead-head tracking).
        z = self.lorsa.hidden_pre(x, position_ids, attention_mask, rotary=rotary)
        idx, vals = self.lorsa._topk(z)
        out = self.lorsa.decode_sparse(idx, vals)
        sse = (out.float() - y.float()).pow(2).sum(-1)
        # A head selected with activation zero (fewer than K heads positive at that token) has not fired.
        return (sse * loss_mask).sum(), idx[(vals > 0) & loss_mask[..., None]]


def _schedule(config: TrainConfig, steps: int) -> Callable[[int], float]:
    """The learning-rate factor by step: config.warmup and config.cooldown are fractions of the run (a run too short
    for either has none)."""
    return functools.partial(core.lr_factor, steps=steps, warmup=round(config.warmup * steps),
                             cooldown=round(config.cooldown * steps))


def _current_k(config: TrainConfig, n_heads: int, steps: int, step: int) -> int:
    anneal = round(config.k_anneal * steps)
    if step >= anneal:
        return config.k
    start = min(config.k_start or n_heads, n_heads)
    return math.ceil(start - (start - config.k) * step / anneal)


def planned_heads(config: TrainConfig, host_config) -> tuple[int, int]:
    """(QK heads, OV heads) the run will train, from the host's config alone, checked against K and the layer
    count: so a bad setting is reported before the host loads."""
    from lorsa_surgery.host.arch import _head_counts

    text = host_config.get_text_config(decoder=True)
    d, (H, _, hd) = text.hidden_size, _head_counts(host_config)
    config.layer_list(text.num_hidden_layers)
    exact = 2 * H * hd  # the size of the exact copy
    if config.init == "attention":
        n_qk, n_ov = config.n_qk_heads or H, config.n_heads or exact
        if config.expansion is not None:
            n_ov = round(d * config.expansion)
        if (n_qk, n_ov) != (H, exact):
            raise LorsaSurgeryError(f"init 'attention' copies the host layer exactly: it needs {exact} heads and {H} QK heads.")
    else:
        n_qk = config.n_qk_heads or H
        n_ov = config.n_heads or round(d * (config.expansion or 8))
    check_module_size(d, n_qk, hd, n_ov)
    if n_ov % n_qk:
        raise LorsaSurgeryError(f"The number of heads ({n_ov}) must be a multiple of the QK heads ({n_qk}).")
    if config.k > n_ov or (config.k_start or 0) > n_ov:
        raise LorsaSurgeryError(f"k ({config.k}) and k_start cannot exceed the number of heads ({n_ov}).")
    return n_qk, n_ov


def _scales(norms: dict[str, float], d: int) -> tuple[float, float]:
    """Factors that bring inputs and outputs to an average norm of sqrt(d_model), the coordinates trained in."""
    return math.sqrt(d) / norms["in"], math.sqrt(d) / norms["out"]


def _norms(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    keep = batch["loss_mask"]
    return {"in": float(batch["x"][keep].double().norm(dim=-1).mean()), "out": float(batch["y"][keep].double().norm(dim=-1).mean())}


@torch.no_grad()
def _build(config: TrainConfig, model: nn.Module, layer: int, host: dict[str, Any], first: dict[str, torch.Tensor],
           norms: dict[str, float]) -> Lorsa:
    """A new module for one host layer: sizes resolved, weights initialised as config.init says, in the scaled
    coordinates it trains in. `first` is the first global batch, which the host initialisation measures on."""
    n_qk, n_ov = planned_heads(config, model.config)
    mask = None if bool(first["attention_mask"].all()) else first["attention_mask"]
    if config.init == "host":
        source = from_host_subspaces(model, layer, n_qk, n_ov, first["x"], first["position_ids"], mask,
                                     first["loss_mask"], seed=config.seed)
    else:
        source = exact_copy(model, layer)
    d, H = source.cfg.d_model, source.cfg.n_qk_heads
    cfg = dataclasses.replace(
        source.cfg, n_qk_heads=n_qk, n_ov_heads=n_ov, act_fn="topk", top_k=config.k, use_decoder_bias=True,
        n_ctx=config.context, input_space="hf", host_model=host.get("id"),
        host_revision=host.get("revision") or host.get("sha256"), host_layer=layer,
    )
    torch.manual_seed(config.seed)  # per layer, so a layer's module does not depend on what trains beside it
    lorsa = Lorsa(cfg).to(first["x"].device)  # random weights, drawn for the scaled coordinates as the reference draws them
    scale_in, scale_out = _scales(norms, d)
    if config.init in ("host", "attention"):
        for name, value in source.state_dict().items():
            lorsa.get_parameter(name).copy_(value)
        fold_dataset_norms(lorsa, d / norms["in"], d / norms["out"])  # the inverse fold: into the scaled coordinates
    elif config.init == "qk":
        heads = torch.arange(n_qk) * H // n_qk  # contiguous blocks of copies when n_qk is a multiple of H
        for name in ("W_Q", "W_K", "b_Q", "b_K") + (("q_norm", "k_norm") if cfg.use_post_qk_ln else ()):
            lorsa.get_parameter(name).copy_(source.get_parameter(name)[heads])
        lorsa.W_Q.mul_(1 / scale_in)  # queries and keys of scaled inputs equal the host's
        lorsa.W_K.mul_(1 / scale_in)
    keep = first["loss_mask"]
    target = first["y"][keep].double() * scale_out
    if config.init == "host":
        # The heads top-K drops leave a mean behind: the bias takes what the kept heads miss on average.
        z = lorsa.hidden_pre(first["x"] * scale_in, first["position_ids"], mask, rotary=first["rotary"])
        idx, vals = lorsa._topk(z)
        lorsa.b_D.zero_()
        lorsa.b_D.copy_((target - lorsa.decode_sparse(idx, vals)[keep].double()).mean(0))
    elif config.init != "attention":
        lorsa.b_D.copy_(target.mean(0))
    return lorsa


_WATCHED = ("loss", "ev", "ood_ev", "lm_loss_spliced", "ood_lm_loss_spliced")
"""Figures of a metrics record that stay finite in a sound run; a module that makes them NaN or inf is not saved."""


def _diverged(layer: int, step: int, what: str) -> NoReturn:
    core.diverged(f"Training layer {layer}", step, what, "its module was not saved", "lower lr or keep grad_clip on")


class _LayerRun:
    """One layer's module and everything that trains it: optimiser, schedule, linear baseline, the clock of when each
    head last fired, metrics and its folder."""

    def __init__(self, trainer: "Trainer", layer: int, first: dict[str, torch.Tensor] | None,
                 resumed: tuple[dict[str, Any], dict[str, torch.Tensor]] | None):
        config, acc = trainer.config, trainer.acc
        self.layer, self.folder, self.main = layer, layer_folder(config.out, layer), acc.is_main_process
        self.norms = resumed[0]["norms"] if resumed else _norms(first)
        if resumed:  # the weights come from the checkpoint; the batch only fixes shapes and the device
            first = trainer.source.get(trainer.batch_sequences(0, everyone=True)[:1])[layer]
        self.lorsa = _build(config, trainer.model, layer, trainer.host, first, self.norms)
        d, n = self.lorsa.cfg.d_model, self.lorsa.cfg.n_ov_heads
        self.scale_in, self.scale_out = _scales(self.norms, d)
        self.baseline = LinearBaseline(d, device=acc.device)
        self.last_fired = torch.zeros(n, dtype=torch.long, device=acc.device)
        self.objective = acc.prepare_model(_Objective(self.lorsa))
        self.optimizer = torch.optim.Adam(self.lorsa.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config, trainer.steps))
        self.lorsa_s = 0.0
        self.window: list[torch.Tensor] = []
        self.metrics = core.MetricsLog(self.folder / METRICS_FILE, resume_at=trainer.start if resumed else None, write=self.main)
        if resumed:
            self._restore(*resumed)

    def step(self, trainer: "Trainer", batch: dict[str, torch.Tensor], n_global: torch.Tensor, step: int) -> None:
        config, P = trainer.config, trainer.acc.num_processes
        t0 = time.perf_counter()
        self.lorsa.cfg.top_k = _current_k(config, self.lorsa.cfg.n_ov_heads, trainer.steps, step)
        mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"]
        with torch.autocast(trainer.acc.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            sse, fired = self.objective(batch["x"] * self.scale_in, batch["y"] * self.scale_out, batch["position_ids"], mask,
                                        batch["loss_mask"], batch["rotary"])
        # DDP averages gradients over processes; scaling by P / global tokens makes that the global token mean.
        (sse * P / n_global).backward()
        self.grad_norm = core.clip_gradients(self.lorsa.parameters(), config.grad_clip)
        if not math.isfinite(self.grad_norm):  # a NaN or inf loss gives one too; stop before the update spreads it
            _diverged(self.layer, step + 1, f"gradient norm {self.grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lorsa_s += time.perf_counter() - t0
        keep = batch["loss_mask"]
        self.baseline.update(batch["x"][keep], batch["y"][keep])
        self.last_fired[fired.unique()] = (step + 1) * config.batch_size * config.context
        self.window.append(torch.cat([sse.detach().double()[None], _target_sums(batch["y"] * self.scale_out, keep)]))

    def train_record(self, trainer: "Trainer", done: int, tokens: int) -> dict[str, Any]:
        acc = trainer.acc
        sums = acc.reduce(torch.stack(self.window).sum(0), "sum")
        self.window = []
        fired = acc.gather(self.last_fired[None]).amax(0)
        return {"kind": "train", "step": done, "tokens": tokens, "loss": float(sums[0] / sums[1]), "ev": _ev_from_sums(sums),
                "lr": self.scheduler.get_last_lr()[0], "k": self.lorsa.cfg.top_k, "grad_norm": self.grad_norm,
                "dead_frac": _dead_fraction(fired, tokens, trainer.config.dead_window),
                "tokens_per_s": _rate(trainer.config, done, trainer.timing["train_s"])}

    def log(self, record: dict[str, Any]) -> None:
        bad = [k for k in _WATCHED if isinstance(record.get(k), float) and not math.isfinite(record[k])]
        if bad:
            _diverged(self.layer, record["step"], ", ".join(f"{k} {record[k]}" for k in bad))
        self.metrics.append(record)

    def checkpoint_tensors(self, acc) -> dict[str, torch.Tensor]:
        """Weights, Adam moments, when each head last fired and the baseline's sums, gathered from all processes
        (every process must call this)."""
        tensors = {f"lorsa.{k}": v for k, v in self.lorsa.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"adam.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
        tensors["last_fired"] = acc.gather(self.last_fired[None]).amax(0)
        tensors["baseline.xtx"] = acc.reduce(self.baseline.xtx.clone(), "sum")
        tensors["baseline.xty"] = acc.reduce(self.baseline.xty.clone(), "sum")
        return tensors

    def checkpoint_state(self) -> dict[str, Any]:
        return {"norms": self.norms, "scheduler": self.scheduler.state_dict(), "lorsa_s": self.lorsa_s,
                "param_groups": self.optimizer.state_dict()["param_groups"]}

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.lorsa.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("lorsa.")})
        adam = self.optimizer.state_dict()
        adam["state"] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                adam["state"].setdefault(int(index), {})[name] = value
        adam["param_groups"] = state["param_groups"]
        self.optimizer.load_state_dict(adam)
        self.scheduler.load_state_dict(state["scheduler"])
        self.lorsa_s = state["lorsa_s"]
        self.last_fired.copy_(tensors["last_fired"])
        if self.main:  # the accumulated sums live once, on the main process
            self.baseline.xtx.copy_(tensors["baseline.xtx"])
            self.baseline.xty.copy_(tensors["baseline.xty"])

    @torch.no_grad()
    def evaluate(self, trainer: "Trainer", step: int, tokens: int) -> dict[str, Any]:
        """Held-out explained variance on the training text and out of its domain, each beside the best linear map
        fitted on the training tokens, and the LM loss with the module spliced in."""
        acc, lorsa, d = trainer.acc, self.lorsa, self.lorsa.cfg.d_model
        global_baseline = LinearBaseline(d, device=acc.device)
        global_baseline.xtx = acc.reduce(self.baseline.xtx.clone(), "sum")
        global_baseline.xty = acc.reduce(self.baseline.xty.clone(), "sum")
        weights = global_baseline.solve()
        result: dict[str, Any] = {"kind": "eval", "step": step, "tokens": tokens}
        for prefix, batches in (("", trainer.eval_batches()), ("ood_", trainer.ood_batches())):
            sums = torch.zeros(3 + d, dtype=torch.float64, device=acc.device)
            linear = torch.zeros_like(sums)
            for both in batches:
                b = both[self.layer]
                mask = None if bool(b["attention_mask"].all()) else b["attention_mask"]
                # Explained variance does not depend on the scale: compare in the scaled coordinates trained in.
                pred = lorsa(b["x"] * self.scale_in, b["position_ids"], mask, rotary=b["rotary"])
                sums += _ev_sums(pred, b["y"] * self.scale_out, b["loss_mask"])
                linear += _ev_sums(global_baseline.predict(b["x"], weights), b["y"], b["loss_mask"])
            sums, linear = acc.reduce(sums, "sum"), acc.reduce(linear, "sum")
            result.update({f"{prefix}ev": _ev_from_sums(sums), f"{prefix}linear_ev": _ev_from_sums(linear),
                           f"{prefix}eval_tokens": int(sums[1])})
        folded = self.spliceable()
        for prefix, (ids, mask, original) in trainer.lm_loss_texts().items():
            with splice(trainer.model, {self.layer: folded}):
                spliced = acc.reduce(lm_loss_sums(trainer.model, ids, mask).to(acc.device), "sum")
            result.update({f"{prefix}lm_loss_original": float(original[0] / original[1]),
                           f"{prefix}lm_loss_spliced": float(spliced[0] / spliced[1]), f"{prefix}lm_loss_tokens": int(spliced[1])})
        return result

    @torch.no_grad()
    def spliceable(self) -> Lorsa:
        """A copy of the module as trained so far, in the host's coordinates (it trains in scaled ones)."""
        folded = copy.deepcopy(self.lorsa)
        fold_dataset_norms(folded, self.norms["in"], self.norms["out"])
        return folded

    def plot(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in self.metrics.records if r["kind"] == "train"]
        evals = [r for r in self.metrics.records if r["kind"] == "eval"]
        fig = Figure(figsize=(11, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        loss, ev, dead = fig.subplots(1, 3)
        loss.plot([r["tokens"] for r in train], [r["loss"] for r in train])
        loss.set(xlabel="training tokens", ylabel="squared error per token (scaled)", yscale="log",
                 title=f"layer {self.layer}: training loss")
        ev.plot([r["tokens"] for r in train], [r["ev"] for r in train], alpha=0.5, label="training batch")
        ev.plot([r["tokens"] for r in evals], [r["ev"] for r in evals], "o-", label="held out")
        ev.plot([r["tokens"] for r in evals], [r["ood_ev"] for r in evals], "s-", label="held out, other domain")
        if evals:
            ev.axhline(evals[-1]["linear_ev"], ls="--", color="gray", label="best linear map (held out)")
            ev.axhline(evals[-1]["ood_linear_ev"], ls=":", color="gray", label="best linear map (other domain)")
        ev.set(xlabel="training tokens", ylabel="explained variance", title="explained variance")
        ev.legend(fontsize=7)
        dead.plot([r["tokens"] for r in train], [r["dead_frac"] for r in train])
        dead.set(xlabel="training tokens", ylabel="fraction of heads", title="dead heads", ylim=(0, 1))
        files.write_figure(self.folder / PLOT_FILE, fig)

    def finish(self, trainer: "Trainer") -> Lorsa:
        config, lorsa = trainer.config, self.lorsa
        lorsa.cfg.top_k = config.k
        with torch.no_grad():
            fold_dataset_norms(lorsa, self.norms["in"], self.norms["out"])
        final = next(r for r in reversed(self.metrics.records) if r["kind"] == "eval")
        last = next(r for r in reversed(self.metrics.records) if r["kind"] == "train")
        host, steps = trainer.host, trainer.steps
        lorsa.training_info = {
            "model": host.get("id"), "revision": host.get("revision") or host.get("sha256"), "layer": self.layer,
            "trained_with": list(config.layers), "tokens": steps * config.batch_size * config.context, "steps": steps,
            "k": config.k, "k_anneal": config.k_anneal, "lr": config.lr, "n_heads": lorsa.cfg.n_ov_heads,
            "n_qk_heads": lorsa.cfg.n_qk_heads, "batch_size": config.batch_size, "context": config.context,
            "init": config.init, "seed": config.seed, "processes": trainer.acc.num_processes,
            "explained_variance": final["ev"], "linear_baseline_ev": final["linear_ev"], "eval_tokens": final["eval_tokens"],
            "ood_explained_variance": final["ood_ev"], "ood_linear_baseline_ev": final["ood_linear_ev"],
            "ood_eval_tokens": final["ood_eval_tokens"],
            **{k: final.get(k) for k in ("lm_loss_original", "lm_loss_spliced", "ood_lm_loss_original", "ood_lm_loss_spliced")},
            "dead_heads_fraction": last["dead_frac"],
            "tokens_per_s": _rate(config, steps, trainer.timing["train_s"]),
            "lorsa_step_tokens_per_s": _rate(config, steps, self.lorsa_s), "device": trainer.acc.device.type,
        }
        if self.main:  # beside the layer's metrics, in the run folder claimed at the start
            formats.save_native(lorsa, self.folder)
        return lorsa


class Trainer:
    """One run: the host, its text as numbered sequences, and one `_LayerRun` per layer, all stepped from the same
    host pass. `Trainer(config).fit()` trains and saves every module; `train(config)` is the same in one call."""

    def __init__(self, config: TrainConfig, model: nn.Module | None = None, tokenizer=None):
        from accelerate import Accelerator

        from lorsa_surgery.host.models import base_record, load_config, load_model, public_record

        # Without CUDA, cpu=True is what lets a multi-process launch (torchrun) run DDP over gloo.
        self.acc = acc = Accelerator(cpu=not torch.cuda.is_available())
        if acc.num_processes > 1 and (config.device_map or config.max_memory):
            raise LorsaSurgeryError("A host placed with device_map or max_memory trains in one process; DDP copies the host to each.")
        if config.batch_size % acc.num_processes:
            raise LorsaSurgeryError(f"batch_size ({config.batch_size}) must be divisible by the number of processes "
                                    f"({acc.num_processes}).")
        self.out = Path(config.out)
        # Sizes and layers are checked from the host's config before anything is written or the host loads.
        host_config = model.config if model is not None else load_config(config.model, config.revision)
        planned_heads(config, host_config)
        n_layers = host_config.get_text_config(decoder=True).num_hidden_layers
        self.config = config = dataclasses.replace(config, layers=config.layer_list(n_layers))
        if acc.is_main_process:
            _prepare_folder(config, self.out)
        acc.wait_for_everyone()
        if model is None:
            model, tokenizer = load_model(config.model, revision=config.revision, dtype=config.dtype, device_map=config.device_map,
                                          max_memory=config.max_memory, offload_dir=config.offload_dir)
            if getattr(model, "hf_device_map", None) is None:  # a dispatched host stays where Accelerate put it
                model.to(acc.device)
        elif tokenizer is None:
            raise LorsaSurgeryError("Pass the tokenizer together with the model.")
        model.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        self.host = public_record(base_record(config.model, config.revision))  # never a local path: checkpoints are shared
        self.autocast = config.autocast and acc.device.type == "cuda"

        # Data: numbered sequences; a seeded random subset is held out, the rest is shuffled anew each epoch.
        ids, mask = token_sequences(_documents(config, model, tokenizer, self.out, acc), tokenizer, config.context, config.pack)
        self.eval_seqs, self.train_seqs = core.held_out_split(len(ids), config.eval_tokens, config.context, config.seed)
        self.source = ActivationSource(model, config.layers, ids, mask, config.cache_dir, self.host, device=acc.device)
        ood_docs = corpus.load_texts(list(config.ood_texts), jsonl_field=config.text_field) if config.ood_texts else corpus.prose()
        self.ood = ActivationSource(model, config.layers, *token_sequences(ood_docs, tokenizer, config.context, config.pack),
                                    config.cache_dir, self.host, device=acc.device)
        self.steps = core.steps_for(config.tokens, config.batch_size, config.context)
        self.timing = {"train_s": 0.0}
        self._eval_batches: dict[str, list[dict[int, dict[str, torch.Tensor]]]] = {}
        self._lm_loss: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

        resumed = self._latest() if config.resume else None
        self.start = resumed[0]["step"] if resumed else 0
        first = None if resumed else self.source.get(self.batch_sequences(0, everyone=True))
        self.runs = {
            layer: _LayerRun(self, layer, first and first[layer],
                             resumed and (resumed[0]["layers"][str(layer)], resumed[1][layer]))
            for layer in config.layers
        }
        if resumed:
            self.timing = resumed[0]["timing"]
            torch.set_rng_state(resumed[2]["rng.cpu"])
            if torch.cuda.is_available():
                torch.cuda.set_rng_state_all([resumed[2][f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])

    def batch_sequences(self, step: int, everyone: bool = False) -> list[int]:
        """The training sequences of a step: this process's share, or the whole global batch."""
        config, P, rank = self.config, self.acc.num_processes, self.acc.process_index
        local = config.batch_size // P
        first = step * config.batch_size + (0 if everyone else rank * local)
        picked = []
        for i in range(first, first + (config.batch_size if everyone else local)):
            epoch, j = divmod(i, len(self.train_seqs))
            perm = torch.randperm(len(self.train_seqs), generator=torch.Generator().manual_seed(config.seed + 1 + epoch))
            picked.append(self.train_seqs[perm[j]])
        return picked

    def eval_batches(self) -> list[dict[int, dict[str, torch.Tensor]]]:
        """This process's share of the held-out sequences, captured once."""
        return self._held_out("", self.source, self.eval_seqs)

    def ood_batches(self) -> list[dict[int, dict[str, torch.Tensor]]]:
        return self._held_out("ood", self.ood, list(range(len(self.ood.input_ids))))

    def _held_out(self, name: str, source: ActivationSource, seqs: list[int]) -> list[dict[int, dict[str, torch.Tensor]]]:
        if name not in self._eval_batches:
            mine = seqs[self.acc.process_index :: self.acc.num_processes]
            size = max(1, self.config.batch_size // self.acc.num_processes)
            self._eval_batches[name] = [source.get(mine[i : i + size]) for i in range(0, len(mine), size)]
        return self._eval_batches[name]

    def lm_loss_texts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per evaluation text ("" held-out training text, "ood_" the other domain): this process's token ids and
        mask, and the host's own loss sums on all of them (computed once)."""
        if self._lm_loss is None:
            self._lm_loss = {}
            if self.config.lm_loss_tokens:
                acc, n = self.acc, max(1, self.config.lm_loss_tokens // self.config.context)
                for prefix, source, seqs in (("", self.source, self.eval_seqs[:n]),
                                             ("ood_", self.ood, list(range(min(n, len(self.ood.input_ids)))))):
                    mine = seqs[acc.process_index :: acc.num_processes]
                    ids, mask = source.input_ids[mine], source.attention_mask[mine]
                    self._lm_loss[prefix] = (ids, mask, acc.reduce(lm_loss_sums(self.model, ids, mask).to(acc.device), "sum"))
        return self._lm_loss

    def fit(self, on_step: Callable[[int, dict[int, dict[str, Any]]], None] | None = None) -> dict[int, Lorsa]:
        """Train to the end (from the last checkpoint when resuming); the finished modules by layer, saved in
        `out/L{layer}`. `on_step(step, records)` runs on every process after each optimiser step (records: the
        metrics logged at that step, by layer); an exception raised there stops the run, which `resume=True`
        continues from the last checkpoint."""
        config, acc = self.config, self.acc
        few = len(config.layers) <= 4  # beyond that, per-layer figures overflow the bar: their mean and worst
        desc = f"train L{','.join(map(str, config.layers))}" if few else f"train {len(config.layers)} layers"
        bar = core.progress(desc, self.steps, self.start, acc.is_main_process)
        for step in range(self.start, self.steps):
            t0 = time.perf_counter()
            replaced = {layer: run.spliceable() for layer, run in self.runs.items()} if config.inputs == "replaced" else None
            batches = self.source.get(self.batch_sequences(step), replaced)
            n_global = acc.reduce(next(iter(batches.values()))["loss_mask"].sum().double(), "sum").clamp_min(1)
            for layer, run in self.runs.items():
                run.step(self, batches[layer], n_global, step)
            self.timing["train_s"] += time.perf_counter() - t0
            done = step + 1
            tokens = done * config.batch_size * config.context
            records: dict[int, dict[str, Any]] = {}
            if done % config.log_every == 0 or done == self.steps:
                for layer, run in self.runs.items():
                    records[layer] = run.train_record(self, done, tokens)
                    run.log(records[layer])
                evs, deads = [r["ev"] for r in records.values()], [r["dead_frac"] for r in records.values()]
                worst = min(records, key=lambda layer: records[layer]["ev"])
                bar.set_postfix(ev="/".join(f"{v:.3f}" for v in evs) if few else f"{sum(evs) / len(evs):.3f} (L{worst} {min(evs):.3f})",
                                dead="/".join(f"{v:.2f}" for v in deads) if few else f"{sum(deads) / len(deads):.2f}",
                                k=next(iter(records.values()))["k"], tok_s=f"{records[config.layers[0]]['tokens_per_s']:.0f}")
            bar.update(1)
            if (config.eval_every and done % config.eval_every == 0) or done == self.steps:
                for layer, run in self.runs.items():
                    result = run.evaluate(self, done, tokens)
                    run.log(result)
                    bar.write(f"step {done}, layer {layer}: held-out EV {result['ev']:.4f} (best linear map {result['linear_ev']:.4f}), "
                              f"other domain {result['ood_ev']:.4f} ({result['ood_linear_ev']:.4f})"
                              + (f", LM loss {result['lm_loss_original']:.4f} -> {result['lm_loss_spliced']:.4f}"
                                 if result.get("lm_loss_spliced") is not None else ""))
                    if acc.is_main_process:
                        run.plot()
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < self.steps:
                self._checkpoint(done)
            if on_step is not None:
                on_step(done, records)
        bar.close()
        modules = {layer: run.finish(self) for layer, run in self.runs.items()}
        if len(modules) > 1:
            self.together = self._together(modules)
        acc.wait_for_everyone()
        return modules

    def _together(self, modules: dict[int, Lorsa]) -> dict[str, Any]:
        """KL to the original and LM losses with every trained module spliced in at once (held-out training text and
        the other domain), written to `out/together.json`: what per-layer figures cannot show, how errors compound."""
        result: dict[str, Any] = {"layers": list(modules)}
        names = ("kl", "lm_loss_original", "lm_loss_spliced")
        for prefix, (ids, mask, _) in self.lm_loss_texts().items():
            mine = compare(self.model, ids, mask, candidate=lambda: splice(self.model, modules, mode="replace"))
            sums = self.acc.reduce(torch.tensor([mine[k] * mine["tokens"] for k in names] + [mine["tokens"]],
                                                dtype=torch.float64, device=self.acc.device), "sum")
            result.update({prefix + k: float(sums[i] / sums[-1]) for i, k in enumerate(names)})
            result[prefix + "tokens"] = int(sums[-1])
        if self.acc.is_main_process:
            files.write_json(self.out / TOGETHER_FILE, result)
        return result

    def _checkpoint(self, step: int) -> None:
        """Every layer's state at `step`, then the pointer to it: a run killed mid-checkpoint resumes from the last whole one."""
        tensors = {layer: run.checkpoint_tensors(self.acc) for layer, run in self.runs.items()}
        if self.acc.is_main_process:
            root = self.out / CHECKPOINTS
            folder = root / f"step_{step:07d}"
            with files.new_folder(folder, overwrite=True, kind="training-checkpoint") as staging:
                for layer, t in tensors.items():
                    files.write_safetensors(staging / f"L{layer}.safetensors", t)
                rng = {"rng.cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
                files.write_safetensors(staging / "rng.safetensors", rng)
                files.write_json(staging / "state.json", {"step": step, "timing": self.timing,
                                                          "layers": {str(l): r.checkpoint_state() for l, r in self.runs.items()}})
            files.write_json(root / "latest.json", {"step": step})
            for old in root.glob("*step_*"):  # earlier checkpoints, and what a killed checkpoint left half-written
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _latest(self) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        pointer = self.out / CHECKPOINTS / "latest.json"
        if not pointer.exists():
            return None
        step = files.read_json(pointer, expect=dict).get("step")
        if type(step) is not int or step < 0:
            raise LorsaSurgeryError(f"{pointer} does not name a checkpoint step; start the run afresh in another folder.")
        folder = self.out / CHECKPOINTS / f"step_{step:07d}"
        layers = {layer: files.read_safetensors(folder / f"L{layer}.safetensors") for layer in self.config.layers}
        return files.read_json(folder / "state.json", expect=dict), layers, files.read_safetensors(folder / "rng.safetensors")


def train(config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None,
          on_step: Callable[[int, dict[int, dict[str, Any]]], None] | None = None) -> dict[int, Lorsa]:
    """Train one Lorsa module per layer in `config.layers` of `config.model` and save each in `out/L{layer}`; the
    modules by layer, ready for `splice`.

    `model`, `tokenizer`: the host, already loaded (else loaded from config.model). Under `accelerate launch`
    every process runs this. See `Trainer.fit` for `on_step`.
    """
    return Trainer(config, model, tokenizer).fit(on_step)


def _rate(config: TrainConfig, steps: int, seconds: float) -> float:
    return steps * config.batch_size * config.context / max(seconds, 1e-9)


def _dead_fraction(last_fired: torch.Tensor, tokens: int, window: int) -> float:
    return float((last_fired <= max(0, tokens - window)).float().mean())


def _prepare_folder(config: TrainConfig, out: Path) -> None:
    """Refuse to mix runs: a folder with a run in it is only continued, with the same settings."""
    saved = out / CONFIG_FILE
    if saved.exists():
        if not config.resume:
            raise LorsaSurgeryError(f"{out} already holds a training run; resume it or choose another folder.")
        before = files.read_json(saved, expect=dict)
        changed = [name for name in core.changed_settings(before, config) if name != "resume"]
        if changed:
            raise LorsaSurgeryError(f"Cannot resume {out} with different settings: {', '.join(changed)}.")
    files.claim(out, kind="training-run")
    files.write_json(saved, config.to_dict())
