"""`lorsa-surgery tasks make|train|eval|extrapolate`: the multi-hop testbed (docs/multihop.md)."""

import json
from pathlib import Path

import click

from lorsa_surgery.cli.config import config_options, set_threads
from lorsa_surgery.multihop import tasks as multihop
from lorsa_surgery.multihop.config import PRESETS, TRAIN_LENGTH, TaskTrainConfig, preset

TASK = click.Choice(list(multihop.TASKS))


@click.group()
def tasks() -> None:
    """Number and letter multi-hop tasks: make data, train a GPT-J, evaluate it, test longer inputs."""


@tasks.command()
@click.argument("task", type=TASK)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--n", "n", default=1000, show_default=True, help="Examples.")
@click.option("--seed", default="0", show_default=True, help="Seed (any string).")
@click.option("--extra", default=0, show_default=True, help="Extra window tokens before the answer window.")
def make(task: str, out: Path, n: int, seed: str, extra: int) -> None:
    """Write N balanced, solver-checked examples of TASK to OUT as JSON lines."""
    multihop.save_examples(multihop.generate(task, n, seed=seed, extra=extra), out)
    click.echo(f"wrote {n} {task} examples ({TRAIN_LENGTH + extra} input tokens each) to {out}")


@tasks.command(context_settings={"max_content_width": 120})
@click.argument("task", type=TASK)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default="paper", show_default=True,
              help="paper: the paper's 12-layer recipe; small: 6 layers, learns in minutes on a CPU. Every other "
                   "option overrides one of its settings.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming from OUT_DIR's last checkpoint.")
@config_options(TaskTrainConfig, exclude=("task",), overrides=True)
def train(task: str, out_dir: Path, preset_name: str, threads: int | None, fresh: bool, **settings) -> None:
    """Train a GPT-J from scratch on TASK, writing checkpoints and history.json into OUT_DIR."""
    overrides = {k: v for k, v in settings.items() if v not in (None, ())}
    config = preset(preset_name, task=task, **overrides)
    set_threads(threads)
    from lorsa_surgery.multihop import train as training

    history = training.train(config, out_dir, resume=not fresh)
    last = history[-1]
    per_hop = "  ".join(f"{h} hops {a:.3f}" for h, a in last["per_hop"].items())
    click.echo(f"step {last['step']}: accuracy {last['accuracy']:.3f} ({per_hop}); checkpoints in {out_dir}")


def outside_model_options(f):
    """--task and --token-map: evaluate a causal LM trained outside the toolkit (no trainer.json)."""
    f = click.option("--token-map", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="JSON: each task symbol as the task writes it (a, dp, 12, c4, ab) -> the model's token id; "
                          "for models trained outside the toolkit.")(f)
    return click.option("--task", "task", type=TASK, help="The task of a model trained outside the toolkit.")(f)


@tasks.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Examples file from `tasks make`.")
@click.option("-n", "--n", "n", default=1024, show_default=True, help="Fresh examples when no --data.")
@click.option("--seed", default="eval", show_default=True)
@click.option("--extra", default=0, show_default=True, help="Extra window tokens (fresh examples only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@outside_model_options
def evaluate(checkpoint: Path, data: Path | None, n: int, seed: str, extra: int, as_json: bool, task: str | None,
             token_map: Path | None) -> None:
    """Accuracy of a checkpoint of `tasks train`, or of any causal LM folder with --task and --token-map, overall
    and per hop count."""
    from lorsa_surgery.multihop import train as training

    model, task, mapping = training.load_task_model(checkpoint, task, token_map)
    examples = multihop.load_examples(data) if data else multihop.generate(task, n, seed=seed, extra=extra)
    result = training.evaluate(model, task, examples, token_map=mapping)
    if as_json:
        click.echo(json.dumps({"task": task, "model": str(checkpoint), **result}, indent=2))
        return
    click.echo(f"{task} model {checkpoint}: accuracy {result['accuracy']:.3f} on {len(examples)} examples")
    for hops, acc in result["per_hop"].items():
        click.echo(f"  {hops} hops  {acc:.3f}")


@tasks.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--extras", default="0,1,2,4,8,16,32,64,128", show_default=True, help="Comma-separated extra window tokens.")
@click.option("-n", "--n", "n", default=512, show_default=True, help="Examples per length.")
@click.option("--seed", default="length", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for length.json and length.png.")
@outside_model_options
def extrapolate(checkpoints: tuple[Path, ...], extras: str, n: int, seed: str, out: Path | None, task: str | None,
                token_map: Path | None) -> None:
    """Accuracy of each checkpoint (or causal LM folder, with --task and --token-map) as extra window tokens
    lengthen the input."""
    from lorsa_surgery.multihop import train as training

    sweeps = {}
    for path in checkpoints:
        model, model_task, mapping = training.load_task_model(path, task, token_map)
        name = f"{model_task} ({path.name})"
        sweeps[name] = training.length_sweep(model, model_task, int_list(extras, "--extras"), n=n, seed=seed,
                                             token_map=mapping)
        click.echo(name)
        for length, result in sweeps[name].items():
            click.echo(f"  {length:5d} tokens  accuracy {result['accuracy']:.3f}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "length.json").write_text(json.dumps(sweeps, indent=2))
        training.plot_accuracy_vs_length(sweeps, out / "length.png")
        click.echo(f"wrote {out / 'length.json'} and {out / 'length.png'}")


def int_list(text: str, option: str) -> list[int]:
    """Comma-separated integers of a click option, or a usage error naming the option."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers.", param_hint=option) from None
