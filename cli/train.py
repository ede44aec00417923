"""`lorsa-surgery train`: train a Lorsa module for one attention layer of a model."""

import click

from lorsa_surgery.training import TrainConfig, train as run_training


@click.command()
@click.argument("model")
@click.option("--layer", type=int, required=True, help="Attention layer to reproduce.")
@click.option("--out", required=True, help="Run folder: the module, metrics, plot and checkpoints.")
@click.option("--expansion", type=float, default=None, help="Heads as a multiple of d_model (default 8).")
@click.option("--heads", "n_heads", type=int, default=None, help="Number of heads (instead of --expansion).")
@click.option("--qk-heads", "n_qk_heads", type=int, default=None, help="Query-key heads (default: the host's head count).")
@click.option("--k", "k", type=int, default=64, show_default=True, help="Heads that fire per token.")
@click.option("--tokens", type=int, required=True, help="Training tokens.")
@click.option("--text", "texts", multiple=True,
              help="Training text: .txt or .jsonl file (repeatable). None (and no --dataset or --sample-tokens): the "
                   "built-in offline corpus, the Python documentation.")
@click.option("--dataset", default=None, help="A datasets dataset, name or name:config (needs the datasets extra).")
@click.option("--sample-tokens", type=int, default=0, help="Also sample this many tokens of text from the model itself.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per step, over all processes.")
@click.option("--context", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak Adam learning rate.")
@click.option("--init", type=click.Choice(["qk", "attention", "random"]), default="qk", show_default=True,
              help="qk: copy Q/K from the host heads; attention: the exact host copy; random.")
@click.option("--k-anneal", type=float, default=0.0, help="Fraction of the run over which K falls from all heads to --k.")
@click.option("--eval-every", type=int, default=0, help="Evaluate every N steps (default: at the end).")
@click.option("--eval-tokens", type=int, default=8192, show_default=True, help="Held-out tokens.")
@click.option("--lm-loss-tokens", type=int, default=2048, show_default=True, help="Held-out tokens for the LM loss (0: skip).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--cache", "cache_dir", default=None, help="Folder for an activation cache reused across runs.")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Host model dtype.")
@click.option("--device-map", default=None, help="Place the host with Accelerate (auto, balanced, ...), as in transformers.")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...", help="Memory per device for the host, e.g. 0=20GiB,cpu=60GiB.")
@click.option("--offload-dir", default=None, help="Folder for host weights offloaded to disk.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads per process.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train(threads: int | None, **options) -> None:
    """Train a Lorsa module for attention layer --layer of MODEL (Hub id, folder or .gguf; "smollm2").

    Run data-parallel with `accelerate launch --num_processes N $(which lorsa-surgery) train ...`.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    lorsa = run_training(TrainConfig(**options))
    info = lorsa.training_info
    click.echo(
        f"Saved {options['out']}: {info['n_heads']} heads, K={info['k']}, {info['tokens']} tokens; held-out explained "
        f"variance {info['explained_variance']:.4f} (best linear map {info['linear_baseline_ev']:.4f})"
        + (f"; LM loss {info['lm_loss_original']:.4f} -> {info['lm_loss_spliced']:.4f}" if info["lm_loss_spliced"] else "")
        + f"; dead heads {info['dead_heads_fraction']:.1%}; {info['tokens_per_s']:.0f} tokens/s."
    )
