"""`lorsa-surgery heal`: fine-tune a patched model back towards its base model's predictions; every training option
is a `HealConfig` field."""

import os
from pathlib import Path

import click

from lorsa_surgery.cli.config import config_options
from lorsa_surgery.cli.loading import overwrite_option, placement_options
from lorsa_surgery.training.config import HealConfig

LOG = "heal.jsonl"


@click.command(context_settings={"max_content_width": 120})
@click.argument("patched")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the healed patched model.")
@config_options(HealConfig)
@click.option("--revision", default=None, help="Hub revision of PATCHED.")
@click.option("--base", default=None, help="Base model override (Hub id, folder or .gguf).")
@overwrite_option
@placement_options
def heal(patched, out, revision, base, overwrite, placement, **options) -> None:
    """Heal PATCHED (a patched-model folder or Hub repo): train its Lorsa modules and/or LoRA adapters so that its
    next-token distribution comes back to the base model's (KL divergence), and save it to --out."""
    from lorsa_surgery.io import files
    from lorsa_surgery.io.hub import pull
    from lorsa_surgery.publishing.patched import load_patched, read_root, save_patched
    from lorsa_surgery.training.healing import heal as run_heal

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
    click.echo(f"{'held out':<22} {'KL to original':>15} {'LM loss gap':>12}")
    for text, prefix in (("training text", ""), ("other domains", "ood_")):
        for name in ("before", "after"):
            row = report[prefix + name]
            click.echo(f"{text + ', ' + name:<22} {row['kl']:>15.4f} {row['lm_loss_gap']:>+12.4f}")
    click.echo(f"Healed patched model written to {out} (log: {out / LOG})")
