"""`lorsa-surgery train`: train Lorsa modules for attention layers of a model; every option is a `TrainConfig` field."""

from pathlib import Path

import click

from lorsa_surgery.cli.config import config_options, set_threads
from lorsa_surgery.training.config import TrainConfig


@click.command(context_settings={"max_content_width": 120})
@config_options(TrainConfig, positional=("model",))
@click.option("--threads", type=int, default=None, help="torch CPU threads per process.")
def train(threads: int | None, **options) -> None:
    """Train one Lorsa module per --layer of MODEL (Hub id, folder or .gguf; "smollm2"), all from one host pass.

    --layers takes numbers, ranges and "all" (`--layers 0-5,12`, `--layers all`). The defaults are the measured best
    of docs/training.md: OV heads started from each host head's principal output directions (init host), lr 5e-4.
    Each module lands in OUT/L<layer>; a table of the layers ends the run. Run data-parallel with
    `accelerate launch --num_processes N $(which lorsa-surgery) train ...`.
    """
    config = TrainConfig(**options)  # checks every number before anything loads
    set_threads(threads)
    from lorsa_surgery.io import files
    from lorsa_surgery.training.trainer import TOGETHER_FILE, train as run_training

    modules = run_training(config)
    rows = [("layer", "heads", "K", "EV held out", "linear", "EV other domain", "linear", "LM loss (alone)", "dead", "tokens/s")]
    for layer, lorsa in modules.items():
        info = lorsa.training_info
        loss = f"{info['lm_loss_original']:.4f} -> {info['lm_loss_spliced']:.4f}" if info["lm_loss_spliced"] else "-"
        rows.append((f"L{layer}", str(info["n_heads"]), str(info["k"]), f"{info['explained_variance']:.4f}",
                     f"{info['linear_baseline_ev']:.4f}", f"{info['ood_explained_variance']:.4f}",
                     f"{info['ood_linear_baseline_ev']:.4f}", loss, f"{info['dead_heads_fraction']:.1%}",
                     f"{info['tokens_per_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    click.echo(f"Saved {len(modules)} module(s) in {config.out} (one folder per layer, L<layer>):")
    for row in rows:
        click.echo("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    path = Path(config.out) / TOGETHER_FILE
    together = files.read_json(path, expect=dict) if path.exists() else {}
    if "kl" in together:
        click.echo(f"All {len(modules)} layers spliced at once: LM loss {together['lm_loss_original']:.4f} -> "
                   f"{together['lm_loss_spliced']:.4f} (KL {together['kl']:.4f}) held out; other domain "
                   f"{together['ood_lm_loss_original']:.4f} -> {together['ood_lm_loss_spliced']:.4f} (KL {together['ood_kl']:.4f}).")

