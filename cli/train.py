"""`lorsa-surgery train`: train Lorsa modules for attention layers of a model; every option is a `TrainConfig` field."""

import click

from lorsa_surgery.cli.config import config_options, set_threads
from lorsa_surgery.training.config import TrainConfig


@click.command(context_settings={"max_content_width": 120})
@config_options(TrainConfig, positional=("model",))
@click.option("--threads", type=int, default=None, help="torch CPU threads per process.")
def train(threads: int | None, **options) -> None:
    """Train one Lorsa module per --layer of MODEL (Hub id, folder or .gguf; "smollm2"), all from one host pass.

    The defaults are the measured best of docs/training.md: OV heads started from each host head's principal
    output directions (init host), lr 5e-4. Each module lands in OUT/L<layer>. Run data-parallel with
    `accelerate launch --num_processes N $(which lorsa-surgery) train ...`.
    """
    config = TrainConfig(**options)  # checks every number before anything loads
    set_threads(threads)
    from lorsa_surgery.training.trainer import layer_folder, train as run_training

    for layer, lorsa in run_training(config).items():
        info = lorsa.training_info
        click.echo(
            f"Saved {layer_folder(config.out, layer)}: {info['n_heads']} heads, K={info['k']}, {info['tokens']} tokens; "
            f"held-out explained variance {info['explained_variance']:.4f} (best linear map {info['linear_baseline_ev']:.4f}), "
            f"other domain {info['ood_explained_variance']:.4f} ({info['ood_linear_baseline_ev']:.4f})"
            + (f"; LM loss {info['lm_loss_original']:.4f} -> {info['lm_loss_spliced']:.4f}" if info["lm_loss_spliced"] else "")
            + f"; dead heads {info['dead_heads_fraction']:.1%}; {info['tokens_per_s']:.0f} tokens/s."
        )
