"""`lorsa-surgery heal`: fine-tune a patched model back towards its base model's predictions."""

import os
from pathlib import Path

import click

from lorsa_surgery.io import files
from lorsa_surgery.cli.loading import overwrite_option, placement_options
from lorsa_surgery.training.healing import HealConfig, heal as run_heal
from lorsa_surgery.io.hub import pull
from lorsa_surgery.publishing.patched import load_patched, read_root, save_patched

LOG = "heal.jsonl"


@click.command()
@click.argument("patched")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the healed patched model.")
@click.option("--tokens", type=int, default=HealConfig.tokens, show_default=True, help="Training tokens.")
@click.option("--lora-rank", type=int, default=HealConfig.lora_rank, show_default=True,
              help="Rank of LoRA adapters on every linear layer that runs (0: none).")
@click.option("--train-lorsa/--no-train-lorsa", default=HealConfig.train_lorsa, show_default=True,
              help="Also train the Lorsa modules end to end (K and heads stay).")
@click.option("--lr", type=float, default=HealConfig.lr, show_default=True, help="Peak learning rate of the LoRA adapters.")
@click.option("--lorsa-lr", type=float, default=HealConfig.lorsa_lr, show_default=True, help="Peak learning rate of the Lorsa modules.")
@click.option("--batch-size", type=int, default=HealConfig.batch_size, show_default=True)
@click.option("--context", type=int, default=HealConfig.context, show_default=True, help="Tokens per sequence.")
@click.option("--eval-tokens", type=int, default=HealConfig.eval_tokens, show_default=True, help="Held-out tokens.")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text (.txt or .jsonl); none: the built-in offline corpus, the Python documentation.")
@click.option("--seed", type=int, default=HealConfig.seed, show_default=True)
@click.option("--revision", default=None, help="Hub revision of PATCHED.")
@click.option("--base", default=None, help="Base model override (Hub id, folder or .gguf).")
@overwrite_option
@placement_options
def heal(patched, out, revision, base, overwrite, placement, **options) -> None:
    """Heal PATCHED (a patched-model folder or Hub repo): train its Lorsa modules and/or LoRA adapters so that its
    next-token distribution comes back to the base model's (KL divergence), and save it to --out."""
    config = HealConfig(**options)  # checked before the model loads
    files.check_out(out, overwrite=overwrite)
    folder = pull(patched, revision=revision)
    metrics = read_root(folder).get("metrics") or {}
    model, tokenizer, handle = load_patched(folder, base=base, **placement)
    log = out.with_name(f"{out.name}.{LOG}")  # beside --out while it runs: the folder is written whole at the end
    log.unlink(missing_ok=True)
    report = run_heal(handle, tokenizer, config, log=log)
    after = report["after"]
    # Layer figures measured before healing no longer describe the modules; the held-out losses after healing do.
    metrics = {
        "tokens": after["tokens"], "text_source": f"held-out {report['text']}", "datasets": metrics.get("datasets"),
        "lm_loss": {"original": after["lm_loss_original"], "spliced": after["lm_loss_spliced"], "delta": after["lm_loss_gap"]},
        "healing": report,
    }
    save_patched(handle, out, metrics=metrics, overwrite=overwrite)
    os.replace(log, out / LOG)
    click.echo(f"{'held out':<8} {'KL to original':>15} {'LM loss gap':>12}")
    for name in ("before", "after"):
        row = report[name]
        click.echo(f"{name:<8} {row['kl']:>15.4f} {row['lm_loss_gap']:>+12.4f}")
    click.echo(f"Healed patched model written to {out} (log: {out / LOG})")
