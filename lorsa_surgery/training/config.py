"""The settings of Lorsa training (`TrainConfig`) and of healing (`HealConfig`), each field checked as it is set.

They import no torch, so a command line generated from them (`cli/config.py`) answers --help and refuses a bad value
before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.settings import DTYPE_NAMES, parse_max_memory
from lorsa_surgery.lorsa.config import MAX_CONTEXT, MAX_INDEX, check_number

INITS = ("host", "attention", "qk", "random")
MAX_EXPANSION = 1024.0
"""The largest expansion accepted: published modules use 8 to 64; beyond this a module outgrows any accelerator."""


@dataclass
class TrainConfig:
    """What to train and how. Sizes left as None follow the host layer; the defaults are the settings that gave
    the best held-out modules in the measurements of docs/training.md."""

    model: str
    """Host model: Hub id, local folder, .gguf file, or "smollm2" (the embedded default)."""
    layers: tuple[int, ...] | Literal["all"] = field(metadata={"flags": ("--layer", "--layers"), "spec": True})
    """Attention layers to reproduce, one module each, trained together from one host pass: numbers and ranges
    ("3", "0-5,12") or "all" (every attention layer of the host)."""
    out: str
    """Run folder: one folder per layer (L3/: module, metrics, plot) and the checkpoints."""
    revision: str | None = None
    """Hub revision of the host model."""
    n_heads: int | None = field(default=None, metadata={"flags": ("--heads",)})
    """OV heads (dictionary size). Give this or `expansion`; None with neither means expansion 8, except with
    init "attention" (the exact copy's size, twice the host's head count times head width)."""
    expansion: float | None = None
    """OV heads as a multiple of d_model."""
    n_qk_heads: int | None = field(default=None, metadata={"flags": ("--qk-heads",)})
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
    texts: tuple[str, ...] = field(default=(), metadata={"flags": ("--text",)})
    """Training text: .txt files (one document each) and .jsonl files (one document per line). With no texts,
    dataset or sample_tokens, the built-in offline corpus (`lorsa_surgery.host.corpus.python_documentation`)."""
    text_field: str = "text"
    """Field holding the text in .jsonl lines and dataset rows."""
    dataset: str | None = None
    """A `datasets` dataset ("name" or "name:config", Hub id or local folder); needs the datasets extra."""
    dataset_split: str = "train"
    """Split of `dataset` to read."""
    sample_tokens: int = 0
    """Also sample this many tokens of text from the host model itself (offline, any model)."""
    eval_tokens: int = 8192
    """Held-out tokens of the training text (never trained on) for explained variance and the linear baseline."""
    ood_texts: tuple[str, ...] = field(default=(), metadata={"flags": ("--ood-text",)})
    """Out-of-domain text for a second held-out evaluation (.txt or .jsonl); none: the built-in English prose
    sample (`lorsa_surgery.host.corpus.prose`, 14 documents far from the Python documentation)."""
    lm_loss_tokens: int = 2048
    """Held-out tokens on which the LM loss is measured with and without the module spliced in (0: skip)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    init: Literal["host", "attention", "qk", "random"] = "host"
    """host: Q/K copied from the host heads and OV heads along each head's principal output directions, any
    size (`arch.from_host_subspaces`); attention: the exact host copy made sparse (fixes the head counts);
    qk: Q/K copied, random OV heads; random: all weights random."""
    lr: float = 5e-4
    """Peak Adam learning rate (with init host, 5e-4 beat 2e-4, 1e-3 and 3e-3; docs/training.md)."""
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
    cache_dir: str | None = field(default=None, metadata={"flags": ("--cache",)})
    """Keep captured activations here as safetensors shards and reuse them across runs (float32: about
    4.6 KB per token and layer for d_model 576)."""
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
    inputs: Literal["original", "replaced"] = "original"
    """What each layer learns from. original: the host's own activations. replaced: the inputs the layer meets once
    every trained layer below it is replaced by its module (as trained so far), the target being the original
    attention on those inputs, so a complete replacement learns to work on its own errors. Needs no activation cache."""

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        self.texts, self.ood_texts = tuple(str(t) for t in self.texts), tuple(str(t) for t in self.ood_texts)
        if self.n_heads is not None and self.expansion is not None:
            raise LorsaSurgeryError("Give either n_heads or expansion, not both.")
        # Sizes are bounded here so that a typo is refused before the host loads or anything is allocated.
        counts = ["k", "tokens", "batch_size", "eval_tokens", "log_every", "dead_window"]
        counts += [n for n in ("n_heads", "n_qk_heads", "k_start") if getattr(self, n) is not None]
        for name in counts:
            check_number(getattr(self, name), name, integer=True, minimum=1, maximum=MAX_INDEX)
        for name in ("sample_tokens", "lm_loss_tokens", "eval_every", "checkpoint_every"):
            check_number(getattr(self, name), name, integer=True, minimum=0, maximum=MAX_INDEX)
        check_number(self.seed, "seed", integer=True, minimum=0, maximum=2**32 - 1)
        check_number(self.context, "context (BOS plus at least one token)", integer=True, minimum=2, maximum=MAX_CONTEXT)
        if self.expansion is not None:
            self.expansion = check_number(self.expansion, "expansion", above=0, maximum=MAX_EXPANSION)
        if self.eval_tokens < self.context:
            raise LorsaSurgeryError(f"eval_tokens ({self.eval_tokens}) must cover at least one sequence of {self.context}.")
        for name in ("k_anneal", "warmup", "cooldown"):
            setattr(self, name, check_number(getattr(self, name), name, minimum=0, maximum=1))
        if self.warmup + self.cooldown > 1:
            raise LorsaSurgeryError("warmup and cooldown together must not exceed the whole run.")
        self.lr = check_number(self.lr, "lr", above=0)  # a finite but diverging rate is stopped by the training loop
        self.grad_clip = check_number(self.grad_clip, "grad_clip", minimum=0)
        for name in ("pack", "autocast", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise LorsaSurgeryError(f"{name} must be true or false, got {getattr(self, name)!r:.60}.")
        if self.inputs not in ("original", "replaced"):
            raise LorsaSurgeryError(f"inputs must be original or replaced, got {self.inputs!r:.60}.")
        if self.inputs == "replaced" and self.cache_dir is not None:
            raise LorsaSurgeryError("Inputs of replaced layers change as their modules train; drop the activation cache.")
        if self.init not in INITS:
            raise LorsaSurgeryError(f"init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)
        if self.dtype not in DTYPE_NAMES:
            raise LorsaSurgeryError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(layers=self.layers if self.layers == "all" else list(self.layers), texts=list(self.texts),
                 ood_texts=list(self.ood_texts))
        return d

    def layer_list(self, n_layers: int) -> tuple[int, ...]:
        """The layers to train in a host of `n_layers` layers ("all" resolved), checked against it."""
        if self.layers == "all":
            return tuple(range(n_layers))
        if max(self.layers) >= n_layers:
            raise LorsaSurgeryError(f"Layer {max(self.layers)} is out of range: the model has {n_layers} layers.")
        return self.layers


def parse_layers(spec: Any) -> tuple[int, ...] | Literal["all"]:
    """Layer indices from an int, "all", or numbers and ranges given as strings or a sequence ("0-5,12", [3, "7-9"])."""
    parts = [spec] if isinstance(spec, (int, str)) else list(spec)
    words = [w.strip() if isinstance(w, str) else w
             for p in parts for w in (p.split(",") if isinstance(p, str) else [p]) if not isinstance(w, str) or w.strip()]
    if words == ["all"]:
        return "all"
    layers: list[int] = []
    for word in words:
        span = re.fullmatch(r"(\d+)-(\d+)", word) if isinstance(word, str) else None
        if span:
            first, last = int(span[1]), int(span[2])
            if first > last or last > MAX_INDEX:
                raise LorsaSurgeryError(f"The layer range {word!r} runs backwards or past {MAX_INDEX}.")
            layers += range(first, last + 1)
        elif isinstance(word, str) and word.isdigit():
            layers.append(int(word))
        elif isinstance(word, int) and not isinstance(word, bool):
            layers.append(word)
        else:
            raise LorsaSurgeryError(f"layers are numbers, ranges such as 0-5, or all; got {word!r:.40}.")
    if not layers:
        raise LorsaSurgeryError("Name at least one layer to train.")
    if any(not 0 <= n <= MAX_INDEX for n in layers) or len(set(layers)) < len(layers):
        raise LorsaSurgeryError(f"layers must be distinct layer indices, got {layers!r:.80}.")
    return tuple(layers)


@dataclass
class HealConfig:
    """How to heal a spliced model."""

    tokens: int = 100_000
    """Training tokens (rounded up to whole steps of batch_size x context)."""
    lora_rank: int = 8
    """Rank of fresh LoRA adapters on every linear layer that runs, from the first spliced layer on (0: none). An
    adapter the splice already carries trains instead."""
    train_lorsa: bool = True
    """Train the Lorsa modules end to end through their top-K (K and the heads stay)."""
    lr: float = 3e-4
    """Peak AdamW learning rate of the LoRA adapters."""
    lorsa_lr: float = 3e-5
    """Peak AdamW learning rate of the Lorsa modules."""
    batch_size: int = 4
    """Sequences per step."""
    context: int = 128
    """Tokens per sequence."""
    eval_tokens: int = 4096
    """Held-out tokens (never trained on) for the KL and LM losses before and after."""
    texts: tuple[str, ...] = field(default=(), metadata={"flags": ("--text",), "files": True})
    """Training text (.txt, .jsonl); with neither texts nor sampled text, the built-in offline corpus, the Python
    documentation (`lorsa_surgery.host.corpus.python_documentation`)."""
    sample_tokens: int | None = None
    """Also train on this many tokens of text sampled from the base model itself (offline, any model). Unset: with no
    texts, as many as training and the held-out split read; with texts, none. Healed on sampled text, three spliced
    layers of SmolLM2 came closer to the original on prose of other domains (KL -11%) than healed on the
    documentation (-1%), and no further from it on the documentation (examples/heal_text_choice.py)."""
    ood_texts: tuple[str, ...] = field(default=(), metadata={"flags": ("--ood-text",), "files": True})
    """Text of other domains for a second held-out measurement before and after (.txt, .jsonl); none: the built-in
    English prose sample (`lorsa_surgery.host.corpus.prose`)."""
    warmup: float = 0.1
    """Fraction of the steps for the linear warm-up; the rest decays linearly to zero."""
    seed: int = 0
    """Seeds the held-out split and the order of the training sequences."""
    log_every: int = 5
    """Log a line (and refresh the progress bar) every this many steps."""

    def __post_init__(self) -> None:
        self.texts, self.ood_texts = tuple(str(t) for t in self.texts), tuple(str(t) for t in self.ood_texts)
        if self.sample_tokens is not None:
            check_number(self.sample_tokens, "sample_tokens", integer=True, minimum=0, maximum=MAX_INDEX)
        for name in ("tokens", "batch_size", "eval_tokens", "log_every"):
            check_number(getattr(self, name), name, integer=True, minimum=1, maximum=MAX_INDEX)
        check_number(self.context, "context", integer=True, minimum=2, maximum=MAX_CONTEXT)
        check_number(self.lora_rank, "lora_rank", integer=True, minimum=0)
        check_number(self.seed, "seed", integer=True, minimum=0, maximum=2**32 - 1)
        self.lr = check_number(self.lr, "lr", above=0)
        self.lorsa_lr = check_number(self.lorsa_lr, "lorsa_lr", above=0)
        self.warmup = check_number(self.warmup, "warmup", minimum=0, maximum=1)
        if self.warmup == 1:
            raise LorsaSurgeryError("warmup must be a fraction below 1: the rate decays after it.")
        if not isinstance(self.train_lorsa, bool):
            raise LorsaSurgeryError(f"train_lorsa must be true or false, got {self.train_lorsa!r:.60}.")

    @property
    def sampled_tokens(self) -> int:
        """Tokens of text to sample from the base model, the default resolved."""
        if self.sample_tokens is not None:
            return self.sample_tokens
        return 0 if self.texts else self.tokens + self.eval_tokens
