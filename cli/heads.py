"""`lorsa-surgery heads ...`: the `heads` command group, and `heads classify` (positional vs symbolic heads).

Other modules add their subcommands with `@heads.command()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lorsa_surgery.cli.loading import load_host, parse_layer_specs, placement_options
from lorsa_surgery.cli.tasks import int_list, outside_model_options
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.multihop import tasks as multihop

if TYPE_CHECKING:
    from lorsa_surgery.multihop.positional import HeadScores


@click.group()
def heads() -> None:
    """Look at heads: classify, detect families, causal checks, top activations, z-patterns, labels."""


@heads.command()
@click.argument("model")
@click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH",
              help="Also classify the QK heads of this Lorsa module (folder, Hub id or 'from-attention'). Repeatable.")
@click.option("--layers", help="Comma-separated MHSA layers [default: all; with --lorsa, the Lorsa layers].")
@click.option("--prompts", "prompt_kind", type=click.Choice(["task", "match", "count"]),
              help="Multi-hop task prompts [default for `tasks train` checkpoints] or the natural-language probe "
                   "(match: find the paired word [default for other models]; count: count back k words).")
@click.option("--items", default=8, show_default=True, help="Words (count) or word pairs (match) per probe prompt.")
@click.option("-n", "--n", "n", default=32, show_default=True, help="Prompts to average over.")
@click.option("--block", default=1, show_default=True, help="Swap contiguous blocks of this many tokens (long prompts).")
@click.option("--skip", default=0, show_default=True, help="Never swap the first SKIP tokens (1: keep an attention sink in place).")
@click.option("--gamma", default=0.1, show_default=True, help="Tolerance of the classification.")
@click.option("--tau", default=1e-4, show_default=True, help="Temperature of the swap weights.")
@click.option("--seed", default=0, show_default=True)
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--allow-pickle", is_flag=True, help="Allow paper-era final.pth pickles (trusted sources only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the (s_pos, s_sym) scatter as PNG.")
@outside_model_options
@placement_options
def classify(model, lorsa_specs, layers, prompt_kind, items, n, block, skip, gamma, tau, seed, revision, allow_pickle,
             as_json, plot, task, token_map, placement) -> None:
    """Positional/symbolic scores and class of every head of MODEL (a Hub id, folder, .gguf, 'smollm2', a
    checkpoint of `tasks train`, or a multi-hop model trained elsewhere with --task and --token-map), at the last
    token of each prompt."""
    from lorsa_surgery.multihop import positional
    from lorsa_surgery.multihop import train as training
    from lorsa_surgery.publishing.patched import module_for

    specs = parse_layer_specs(lorsa_specs, model, revision)
    mapping = None
    if (Path(model) / "trainer.json").is_file() or token_map:
        host, task, mapping = training.load_task_model(model, task, token_map)
        tokenizer = None
        modules = {layer: module_for(host, layer, spec, allow_pickle=allow_pickle) for layer, spec in specs.items()}
    else:
        if task:
            raise LorsaSurgeryError("--task goes with --token-map (or a checkpoint of `tasks train`, which names its task).")
        host, tokenizer, modules = load_host(model, specs, revision, allow_pickle, placement)
    prompt_kind = prompt_kind or ("task" if task else "match")
    if prompt_kind == "task":
        if not task:
            raise LorsaSurgeryError("--prompts task needs a checkpoint written by `lorsa-surgery tasks train`.")
        ids, _ = multihop.TaskTokenizer(task, mapping).encode_examples(multihop.generate(task, n, seed=seed))
        source = f"{n} {task}-task prompts"
    else:
        if tokenizer is None:
            raise LorsaSurgeryError("Multi-hop task models have no natural-language tokenizer; use --prompts task.")
        ids = positional.probe_input_ids(tokenizer, positional.probe_prompts(prompt_kind, items, n=n, seed=seed))
        source = f"{n} {prompt_kind}-probe prompts with {items} items"

    mhsa_layers = int_list(layers, "--layers") if layers else (sorted(modules) or None)
    mhsa = positional.head_scores(host, ids, layers=mhsa_layers, block=block, skip=skip, tau=tau)
    lorsa = positional.head_scores(host, ids, lorsa=modules, block=block, skip=skip, tau=tau) if modules else None

    if as_json:
        out = {"prompts": source, "mhsa": mhsa.to_dict(gamma)}
        if lorsa:
            out["lorsa"] = {**lorsa.to_dict(gamma), "group_size": [modules[layer].cfg.group_size for layer in lorsa.layers]}
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"scores at the last token, averaged over {source} (gamma {gamma})")
        _table(mhsa, gamma, lambda layer, h: f"L{layer}.A{h}")  # A: attention (MHSA) heads; H names Lorsa heads
        if lorsa:
            def name(layer, h):
                g = modules[layer].cfg.group_size
                return f"L{layer}.QK{h} (heads {h * g}-{(h + 1) * g - 1})"

            click.echo("Lorsa QK heads (their OV heads inherit the class):")
            _table(lorsa, gamma, name)
    if plot:
        positional.plot_scores(mhsa, plot, title=f"{model}: {source}", gamma=gamma)


def _table(scores: HeadScores, gamma: float, name) -> None:
    labels = scores.labels(gamma)
    borderline = scores.borderline(gamma) if scores.prompts > 1 else None
    click.echo(f"  {'head':<28} {'s_pos':>6} {'+-':>5} {'s_sym':>6} {'+-':>5} {'entropy':>8}  class"
               + ("  (+-: spread over prompts; borderline: the class moves within two standard errors)" if borderline else ""))
    for row, layer in enumerate(scores.layers):
        for h in range(scores.positional.shape[1]):
            click.echo(
                f"  {name(layer, h):<28} {scores.positional[row, h]:6.3f} {scores.positional_spread[row, h]:5.3f} "
                f"{scores.symbolic[row, h]:6.3f} {scores.symbolic_spread[row, h]:5.3f} {scores.entropy[row, h]:8.3f}  "
                f"{labels[row][h]}" + (" (borderline)" if borderline and borderline[row][h] else "")
            )
