"""Where each head family lives across depth: `heads detect` over every layer of a complete replacement of SmolLM2.

Runs `lorsa-surgery heads detect smollm2 --lorsa all=MODULES --write-catalog --json` (so the modules' catalogs name
the heads it finds: `L18:induction`), then tables, per layer, how many heads each family counts and the share of
heads whose output direction draws on more than one MHSA head (main MHSA head's share under 0.9, `ls.provenance`).

    python examples/families_across_depth.py --modules runs/complete/healed --out runs/families   # about 10 min
    python examples/families_across_depth.py --modules runs/complete-fast/healed --out runs/families-fast --layers 0,1

Writes detect.json (every score) and families.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FAMILIES = ("previous_token", "duplicate_token", "induction", "attention_sink", "successor", "name_mover",
            "arithmetic", "thematic_anchor")
MULTI = 0.9  # main MHSA head's share under which a head draws on more than one


def detect(modules: Path, layers: list[int] | None, prompts: int, out: Path) -> dict:
    """The CLI's JSON for every layer (or the chosen ones), catalogs written into the modules' folders."""
    cli = Path(sys.executable).parent / "lorsa-surgery"
    specs = ["--lorsa", f"all={modules}"] if layers is None else \
        [arg for layer in layers for arg in ("--lorsa", f"{layer}={modules}/layer_{layer}")]
    result = subprocess.run([str(cli), "heads", "detect", "smollm2", *specs, "--write-catalog", "--json",
                             "-n", str(prompts)], check=True, capture_output=True, text=True)
    (out / "detect.json").write_text(result.stdout)
    return json.loads(result.stdout)


def table(report: dict) -> str:
    lines = ["| layer | " + " | ".join(f.replace("_", " ") for f in FAMILIES) + " | heads on more than one MHSA head |",
             "|---" * (len(FAMILIES) + 2) + "|"]
    totals = dict.fromkeys(FAMILIES, 0)
    for name, layer in sorted(report.items(), key=lambda item: int(item[0][1:])):
        counts = [len(layer[f]["members"]) for f in FAMILIES]
        for family, n in zip(FAMILIES, counts):
            totals[family] += n
        shares = layer["provenance"]["main_share"]
        multi = sum(s < MULTI for s in shares) / len(shares)
        lines.append(f"| {name[1:]} | " + " | ".join(map(str, counts)) + f" | {multi:.1%} |")
    lines.append("| all | " + " | ".join(str(totals[f]) for f in FAMILIES) + " | |")
    peaks = []
    for family in FAMILIES:
        ranked = sorted(report, key=lambda name: -len(report[name][family]["members"]))[:3]
        found = [f"{name[1:]} ({len(report[name][family]['members'])})" for name in ranked
                 if report[name][family]["members"]]
        peaks.append(f"- {family.replace('_', ' ')}: " + (", ".join(found) if found else "none found"))
    return "\n".join(lines + ["", "Layers holding the most heads of each family:", *peaks]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=Path, required=True, help="A patched model with a module for every layer.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", default=None, help="Comma-separated layers [default: all].")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts per detector probe.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    text = table(detect(args.modules, layers, args.prompts, args.out))
    (args.out / "families.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
