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
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lorsa_surgery.host import corpus

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.metrics import compare, kl_and_loss_sums
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.splicing import Splice
from lorsa_surgery.training import core
from lorsa_surgery.training.config import HealConfig

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


def _kl_and_losses(handle: Splice, ids: torch.Tensor, mask: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch: [KL(original || spliced) summed over predicted tokens] (with grad if asked), and the detached
    [summed loss original, summed loss spliced, predicted tokens]."""
    model = handle.model
    with torch.no_grad(), original_model(handle):
        teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with torch.set_grad_enabled(grad):
        student = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return kl_and_loss_sums(teacher, student, ids, mask)


def evaluate(handle: Splice, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """KL divergence from the original to the spliced model (nats per token) and both LM losses on these sequences."""
    return compare(handle.model, ids, mask, reference=lambda: original_model(handle), batch_size=batch_size)


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
    from lorsa_surgery.training.trainer import token_sequences

    if handle.mode == "exact":
        raise LorsaSurgeryError("In exact mode the spliced model already gives the original's outputs; heal a replace-mode splice.")
    if handle.interventions is not None:
        raise LorsaSurgeryError("Detach the interventions before healing: they would be trained around.")
    if not config.train_lorsa and not config.lora_rank and handle.adapter is None:
        raise LorsaSurgeryError("Nothing to train: give lora_rank > 0 or train_lorsa.")
    model = handle.model
    docs = corpus.load_texts(list(config.texts)) if config.texts else []
    if config.sampled_tokens:
        docs += corpus.sample_from_model(model, tokenizer, config.sampled_tokens, seed=config.seed)
    ids, mask = token_sequences(docs or corpus.python_documentation(), tokenizer, config.context)
    held_out, train_rows = core.held_out_split(len(ids), config.eval_tokens, config.context, config.seed)
    other = token_sequences(corpus.load_texts(list(config.ood_texts)) if config.ood_texts else corpus.prose(), tokenizer,
                            config.context)
    model.requires_grad_(False)
    before, ood_before = evaluate(handle, ids[held_out], mask[held_out]), evaluate(handle, *other)
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
    steps = core.steps_for(config.tokens, config.batch_size, config.context)
    warm = max(1, round(config.warmup * steps))  # the rest of the run decays to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(core.lr_factor, steps=steps, warmup=warm, cooldown=steps - warm))
    device = input_device(model)
    metrics = core.MetricsLog(log)
    bar = core.progress("heal", steps, enabled=progress)
    start, window = time.perf_counter(), []
    for step in range(steps):
        rows = [train_rows[(step * config.batch_size + i) % len(train_rows)] for i in range(config.batch_size)]
        kl, sums = _kl_and_losses(handle, ids[rows].to(device), mask[rows].to(device), grad=True)
        if not kl.isfinite():  # a diverged step would spread NaN into every adapter and module, and then be saved
            core.diverged("Healing", step + 1, f"KL {kl.item()}", "nothing was saved", "lower lr or lorsa_lr")
        (kl / sums[2].clamp_min(1).to(kl)).backward()
        core.clip_gradients([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(kl.item() / float(sums[2]))
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "tokens": (step + 1) * config.batch_size * config.context,
                      "kl": sum(window) / len(window), "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - start}
            window = []
            metrics.append(record)
            bar.set_postfix(kl=f"{record['kl']:.4f}")
        bar.update(1)
    bar.close()
    model.requires_grad_(False)
    _sync_sources(handle)
    after, ood_after = evaluate(handle, ids[held_out], mask[held_out]), evaluate(handle, *other)
    sources = [Path(t).name for t in config.texts] + ([f"{config.sampled_tokens} tokens sampled from the base model"]
                                                      if config.sampled_tokens else [])
    return {
        "before": before, "after": after, "ood_before": ood_before, "ood_after": ood_after,
        "ood_text": ", ".join(Path(t).name for t in config.ood_texts) or corpus.PROSE,
        "steps": steps, "tokens": steps * config.batch_size * config.context,
        "trained": (["lora"] if lora else []) + (["lorsa"] if config.train_lorsa else []),
        "lora_rank": handle.adapter.r if handle.adapter is not None else 0,
        "adapter_targets": None if adapter is None else len(adapter.applied),
        "text": ", ".join(sources) or corpus.BUILTIN_CORPUS,
        "config": asdict(config),
    }
