"""PEFT with spliced models: LoRA adapters on them (made for the base model, or fresh), and healing.

An adapter made for the base model loads onto a spliced model as it would onto the base, except inside the attention
modules that Lorsa took over: in replace mode those never run, so their targets are skipped and reported; in exact
mode the original attention still runs, so they stay on it. Saving a patched model saves its adapter beside the
Lorsa modules, and `load_patched` puts both back.

Healing fine-tunes a spliced model until its next-token distribution comes back to the original's. The loss is the
KL divergence from the original model to the spliced one over text; the original is the same model with its
attention modules put back and its adapters switched off, so no second copy is held. What trains is the Lorsa
modules, end to end through their top-K (K, the heads and the catalog stay), and/or LoRA adapters on the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lorsa_surgery.host import corpus

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.config import MAX_CONTEXT, MAX_INDEX, check_number
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.splicing import Splice

ADAPTER_FOLDER = "adapter"
"""Where a patched-model folder keeps its LoRA adapter (PEFT's adapter_config.json and adapter_model.safetensors)."""
_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterReport:
    """Where an adapter's LoRA layers went on a spliced model, by the base model's module names."""

    applied: list[str]
    """Modules that carry the adapter and run."""
    skipped: list[str]
    """Modules inside attention that Lorsa replaces (replace mode): they never run, so they get no adapter."""


# ---- names ----------------------------------------------------------------------------------------------------


def _sites(handle: Splice) -> list[str]:
    """The module-name prefix of each spliced attention, e.g. "model.layers.3.self_attn."."""
    return [f"{handle.arch.layers}.{layer}.{handle.arch.attention}." for layer in handle.layers]


def _spliced_name(handle: Splice, name: str) -> str | None:
    """The spliced model's name of a base-model module, or None when it does not run (replaced attention)."""
    for prefix in _sites(handle):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith("original."):  # already in the spliced model's naming (a saved patched model)
                return name if handle.mode == "exact" else None
            return None if handle.mode == "replace" else f"{prefix}original.{rest}"
    return name


def _base_name(handle: Splice, name: str) -> str:
    for prefix in _sites(handle):
        if name.startswith(prefix + "original."):
            return prefix + name[len(prefix) + len("original."):]
    return name


def _linear_names(handle: Splice) -> list[str]:
    """Every linear layer of the host by its base-model name, except the output embedding."""
    from transformers.pytorch_utils import Conv1D

    output = handle.model.get_output_embeddings()
    return [_base_name(handle, name) for name, module in handle.model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output]


# ---- adapters -------------------------------------------------------------------------------------------------


def _inject(handle: Splice, config, state: dict[str, torch.Tensor] | None, base_targets: list[str]) -> AdapterReport:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if handle.adapter is not None:
        raise LorsaSurgeryError("This splice already carries a LoRA adapter; one at a time.")
    mapped = {name: _spliced_name(handle, name) for name in base_targets}
    applied = sorted(base for base, spliced in mapped.items() if spliced is not None)
    skipped = sorted(base for base, spliced in mapped.items() if spliced is None)
    if not applied:
        raise LorsaSurgeryError("None of the adapter's target modules runs in this spliced model.")
    config.target_modules = sorted(mapped[name] for name in applied)
    inject_adapter_in_model(config, handle.model, adapter_name="default")
    if state is not None:
        renamed = {}
        for key, value in state.items():
            module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
            spliced = _spliced_name(handle, module)
            if spliced is not None:
                renamed[f"{spliced}.lora_{rest}"] = value
        result = set_peft_model_state_dict(handle.model, renamed, adapter_name="default")
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise LorsaSurgeryError(f"The adapter's weights do not fit its config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}).")
    handle.attach("adapter", config, lambda: _remove_lora_layers(handle))
    return AdapterReport(applied, skipped)


def add_lora(handle: Splice, rank: int = 8, alpha: float | None = None, targets: list[str] | None = None,
             dropout: float = 0.0) -> AdapterReport:
    """Fresh LoRA adapters (they start at zero: the model's output is unchanged) on `targets` (base-model module
    names or name endings such as "q_proj"; default every linear layer but the output embedding)."""
    from peft import LoraConfig

    if rank <= 0:
        raise LorsaSurgeryError(f"LoRA rank must be positive, got {rank}.")
    every = _linear_names(handle)
    chosen = every if targets is None else [n for n in every if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise LorsaSurgeryError(f"No linear layer matches the LoRA targets {targets}.")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=chosen)
    return _inject(handle, config, None, chosen)


def load_adapter(handle: Splice, source: str | Path, revision: str | None = None) -> AdapterReport:
    """A PEFT LoRA adapter (a folder or Hub repo with adapter_config.json and adapter_model.safetensors) made for the
    base model, or saved with a patched model, onto this splice. Returns where its layers went."""
    from peft import LoraConfig

    from lorsa_surgery.io.hub import pull

    folder = pull(source, revision=revision)
    raw = files.read_json(folder / "adapter_config.json")
    if raw.get("peft_type") != "LORA":
        raise LorsaSurgeryError(f"{source} is a {raw.get('peft_type')} adapter; lorsa-surgery loads LoRA adapters.")
    if not (folder / _WEIGHTS).is_file():
        raise LorsaSurgeryError(f"{source} has no {_WEIGHTS} (safetensors only).")
    config = LoraConfig.from_pretrained(str(folder))
    state = files.read_safetensors(folder / _WEIGHTS)
    modules = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in state})
    return _inject(handle, config, state, [_base_name(handle, m) for m in modules])


def save_adapter(handle: Splice, folder: str | Path) -> None:
    """Write the splice's adapter as PEFT writes one (config and safetensors), in the spliced model's naming."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle.adapter.save_pretrained(str(folder))
    files.write_safetensors(folder / _WEIGHTS, get_peft_model_state_dict(handle.model, adapter_name="default"))


def remove_adapter(handle: Splice) -> None:
    """Take the adapter's layers out, putting back the layers they wrap."""
    handle.detach("adapter")


def _remove_lora_layers(handle: Splice) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(handle.model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(handle.model.get_submodule(parent), child, module.get_base_layer())
    handle.model.__dict__.pop("peft_config", None)  # where PEFT's injection notes the adapter's config


@contextlib.contextmanager
def original_model(handle: Splice) -> Iterator[nn.Module]:
    """Within it, the model is the original: its attention modules back in place and LoRA layers switched off."""
    from peft.tuners.lora import LoraLayer

    lora = [m for m in handle.model.modules() if isinstance(m, LoraLayer)]
    for m in lora:
        m.enable_adapters(False)
    try:
        with handle.original() as model:
            yield model
    finally:
        for m in lora:
            m.enable_adapters(True)


# ---- healing ----------------------------------------------------------------------------------------------------


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
    texts: tuple[str, ...] = ()
    """Text files (.txt, .jsonl); none: the built-in offline corpus (`corpus.python_documentation`)."""
    warmup: float = 0.1
    """Fraction of the steps for the linear warm-up; the rest decays linearly to zero."""
    seed: int = 0
    """Seeds the held-out split and the order of the training sequences."""
    log_every: int = 5
    """Log a line (and refresh the progress bar) every this many steps."""

    def __post_init__(self) -> None:
        self.texts = tuple(str(t) for t in self.texts)
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


def _kl_and_losses(handle: Splice, ids: torch.Tensor, mask: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch: [KL(original || spliced) summed over predicted tokens] (with grad if asked), and the detached
    [summed loss original, summed loss spliced, predicted tokens]."""
    model = handle.model
    with torch.no_grad(), original_model(handle):
        teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    with torch.set_grad_enabled(grad):
        student = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    kl = (teacher.exp() * (teacher - student)).sum(-1)[keep].sum()
    targets = ids[:, 1:][keep]
    losses = torch.stack([-teacher[keep].gather(-1, targets[:, None]).sum(), -student.detach()[keep].gather(-1, targets[:, None]).sum(),
                          keep.sum().to(teacher)])
    return kl, losses.detach().double()


def evaluate(handle: Splice, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """KL divergence from the original to the spliced model (nats per token) and both LM losses on these sequences."""
    device = input_device(handle.model)
    kl, sums = 0.0, torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(ids), batch_size):
        batch_kl, batch_sums = _kl_and_losses(handle, ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device), grad=False)
        kl += float(batch_kl)
        sums += batch_sums.cpu()
    n = float(sums[2])
    return {"kl": kl / n, "lm_loss_original": float(sums[0]) / n, "lm_loss_spliced": float(sums[1]) / n,
            "lm_loss_gap": float(sums[1] - sums[0]) / n, "tokens": int(n)}


def _sync_sources(handle: Splice) -> None:
    """Carry what the running modules learned back to the modules as given (those in processed coordinates run
    as a mapped copy), so saving the splice saves the healed weights."""
    layers = handle.arch.layer_list(handle.model)
    for layer, site in handle.sites.items():
        if site.source is site.lorsa:
            continue
        gain, bias = handle.arch.norm_gain(getattr(layers[layer], handle.arch.input_norm))
        back = site.lorsa.in_input_space(site.source.cfg.input_space, gain, bias)
        with torch.no_grad():
            for name, value in back.state_dict().items():
                site.source.state_dict()[name].copy_(value)


def heal(handle: Splice, tokenizer, config: HealConfig, log: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the splice towards the original model's next-token distribution; returns the held-out KL and LM
    losses before and after, with what trained. `log` gets a JSON line per logged step."""
    from tqdm.auto import tqdm

    from lorsa_surgery.training.trainer import token_sequences

    if handle.mode == "exact":
        raise LorsaSurgeryError("In exact mode the spliced model already gives the original's outputs; heal a replace-mode splice.")
    if handle.interventions is not None:
        raise LorsaSurgeryError("Detach the interventions before healing: they would be trained around.")
    if not config.train_lorsa and not config.lora_rank and handle.adapter is None:
        raise LorsaSurgeryError("Nothing to train: give lora_rank > 0 or train_lorsa.")
    docs = corpus.load_texts(list(config.texts)) if config.texts else corpus.python_documentation()
    ids, mask = token_sequences(docs, tokenizer, config.context)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config.seed))
    n_eval = max(1, config.eval_tokens // config.context)
    if len(ids) <= n_eval:
        raise LorsaSurgeryError(f"The text gives {len(ids)} sequences of {config.context} tokens; need more than {n_eval}.")
    held_out, train_rows = order[:n_eval], order[n_eval:]
    model = handle.model
    model.requires_grad_(False)
    before = evaluate(handle, ids[held_out], mask[held_out])
    adapter = None
    if handle.adapter is None and config.lora_rank:
        # Layers below the first splice see the original activations; adapters there would only lengthen backward.
        prefix = handle.arch.layers + "."
        downstream = [n for n in _linear_names(handle)
                      if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= min(handle.layers)]
        adapter = add_lora(handle, config.lora_rank, targets=downstream)
    groups = []
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    if lora:
        groups.append({"params": lora, "lr": config.lr})
    if config.train_lorsa:
        lorsa = [p for site in handle.sites.values() for p in site.lorsa.parameters()]
        for p in lorsa:
            p.requires_grad_(True)
        groups.append({"params": lorsa, "lr": config.lorsa_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = math.ceil(config.tokens / (config.batch_size * config.context))
    warm = max(1, round(config.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    device = input_device(model)
    records = []
    bar = tqdm(range(steps), desc="heal", disable=not progress, dynamic_ncols=True)
    start, window = time.perf_counter(), []
    for step in bar:
        rows = train_rows[[(step * config.batch_size + i) % len(train_rows) for i in range(config.batch_size)]]
        kl, sums = _kl_and_losses(handle, ids[rows].to(device), mask[rows].to(device), grad=True)
        if not kl.isfinite():  # a diverged step would spread NaN into every adapter and module, and then be saved
            raise LorsaSurgeryError(f"Healing diverged at step {step + 1} (KL {kl.item()}); nothing was saved. Lower lr or lorsa_lr.")
        (kl / sums[2].clamp_min(1).to(kl)).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(kl.item() / float(sums[2]))
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "tokens": (step + 1) * config.batch_size * config.context,
                      "kl": sum(window) / len(window), "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - start}
            window = []
            records.append(record)
            bar.set_postfix(kl=f"{record['kl']:.4f}")
            if log is not None:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    bar.close()
    model.requires_grad_(False)
    _sync_sources(handle)
    after = evaluate(handle, ids[held_out], mask[held_out])
    return {
        "before": before, "after": after, "steps": steps, "tokens": steps * config.batch_size * config.context,
        "trained": (["lora"] if lora else []) + (["lorsa"] if config.train_lorsa else []),
        "lora_rank": handle.adapter.r if handle.adapter is not None else 0,
        "adapter_targets": None if adapter is None else len(adapter.applied),
        "text": ", ".join(Path(t).name for t in config.texts) or corpus.BUILTIN_CORPUS,
        "config": asdict(config),
    }
