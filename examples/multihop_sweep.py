"""The recipe sweep of docs/multihop.md: which training factor decides how far the letter task extrapolates.

Each run is the `small` preset (6 layers, lr 1e-3, 2000 steps) with one setting changed; each is trained,
then tested at 17, 273, 850 and 1024 input tokens (512 prompts per length). Runs are resumable and skipped
once measured, so two shells can share the list:

    python examples/multihop_sweep.py --out out/sweep --runs small,lr1e-4 --threads 1
    python examples/multihop_sweep.py --out out/sweep --table      # the markdown table of every measured run
    python examples/multihop_sweep.py --fast --out out/fast-sweep  # two runs of a few steps (for tests)
"""

import argparse
from pathlib import Path

import torch

from lorsa_surgery.io import files
from lorsa_surgery.multihop import train as training

RUNS = {
    "small": {},
    "lr1e-4": {"lr": 1e-4},
    "paper-schedule": {"lr": 1e-4, "warmup_steps": 500, "steps": 5000, "checkpoint_steps": (1000, 2000, 3000, 4000, 5000)},
    "warmup0": {"warmup_steps": 0},
    "warmup500": {"warmup_steps": 500},
    "dropout0": {"dropout": 0.0},
    "dropout0.3": {"dropout": 0.3},
    "wd0.1": {"weight_decay": 0.1},
    "base500": {"rotary_base": 500.0},
    "base1e6": {"rotary_base": 1e6},
    "extra0-8": {"train_extra": 8},
    "extra0-32": {"train_extra": 32},
    "hops3-4": {"hops": (3, 4)},
    "seed1": {"seed": 1},
    "seed2": {"seed": 2},
    "12-layers": {"n_layer": 12},
    "number": {"task": "number"},
}
"""Run name -> the settings it changes on the `small` letter-task preset."""
EXTRAS = [0, 256, 833, 1007]
"""Extra window tokens of the length tests: 17, 273, 850 and 1024 input tokens."""


def measure(name: str, out: Path, fast: bool) -> dict:
    """Train run `name` into out/name (resuming) and test it at each length; cached in out/name/lengths.json."""
    result_path = out / name / "lengths.json"
    if result_path.is_file():
        return files.read_json(result_path)
    settings = {"task": "letter", **RUNS[name]}
    if fast:
        settings.update(steps=20, n_layer=1, checkpoint_steps=(20,), eval_every=10, eval_examples=64)
    config = training.preset("small", **settings)
    history = training.train(config, out / name)
    model, _ = training.load_checkpoint(sorted((out / name).glob("step_*"))[-1])
    extras = EXTRAS[:2] if fast else EXTRAS
    lengths = training.length_sweep(model, config.task, extras, n=32 if fast else 512)
    result = {"settings": RUNS[name], "accuracy": history[-1]["accuracy"],
              "by_length": {length: r["accuracy"] for length, r in lengths.items()}}
    files.write_json(result_path, result)
    return result


def table(out: Path) -> str:
    """Markdown: one row per measured run, in RUNS order, accuracy at each tested length."""
    rows = {name: files.read_json(out / name / "lengths.json") for name in RUNS if (out / name / "lengths.json").is_file()}
    lengths = sorted({int(length) for r in rows.values() for length in r["by_length"]})
    lines = ["| run | changed setting | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for name, r in rows.items():
        changed = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "checkpoint_steps") or "none (the small preset)"
        cells = [f"{r['by_length'][str(n)]:.3f}" if str(n) in r["by_length"] else "-" for n in lengths]
        lines.append(f"| {name} | {changed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/sweep"))
    parser.add_argument("--runs", default=",".join(RUNS), help="Comma-separated run names, from: " + ", ".join(RUNS))
    parser.add_argument("--table", action="store_true", help="Only print the table of the runs measured so far.")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--fast", action="store_true", help="Two runs of a 1-layer model for 20 steps (for tests).")
    args = parser.parse_args()
    names = ["small", "lr1e-4"] if args.fast else [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table:
        for name in names:
            result = measure(name, args.out, args.fast)
            print(f"{name}: " + ", ".join(f"{n} tokens {a:.3f}" for n, a in result["by_length"].items()), flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
