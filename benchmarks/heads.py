"""Head analysis on the shipped SmolLM2 layer-3 module: one scan for every view, against a scan per head; and a
command's start with the de-quantised host cached, against de-quantising it again.

    python benchmarks/heads.py [--tokens 16384]

Rows, each a ratio of two timings taken in this run:
1. pages for 3 heads: one scan of all 1152 heads then 3 pages, against `analysis.dashboard` per head (a corpus
   scan for each, what `heads dashboard` did before the scan store);
2. pages for all 1152 heads: one scan then every page and the index, against the per-head path for 3 heads
   scaled to 1152 (each head costs the same: one scan of the same corpus);
3. `lorsa-surgery generate PATCHED` (8 new tokens) in a fresh process: with the de-quantised host in the cache
   (every run after the first), against an empty cache (de-quantising the GGUF file again, as every command did).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.analysis.pages import dashboard
from lorsa_surgery.analysis.pages import write_site
from lorsa_surgery.analysis.scan import corpus_windows, scan

HEADS = [1, 2, 360]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="Corpus tokens scanned (built-in corpus).")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = ls.load_model("smollm2")
    handle = ls.splice(model, {3: ls.module_for(model, 3, "default")})
    windows = corpus_windows(tok, max_tokens=args.tokens)
    with tempfile.TemporaryDirectory() as out:
        per_head = timed(lambda: [dashboard(handle, tok, f"L3.H{h}", [w for _, _, w in windows], Path(out) / f"{h}.html",
                                            progress=False) for h in HEADS])
        store = {}
        scan_s = timed(lambda: store.setdefault("s", scan(handle, windows, 3, progress=False)))
        three = scan_s + timed(lambda: write_site([store["s"]], tok, Path(out) / "three", heads=[f"L3.H{h}" for h in HEADS]))
        every = scan_s + timed(lambda: write_site([store["s"]], tok, Path(out) / "all"))
        ls.save_patched(handle, Path(out) / "patched")
        command = [sys.executable, "-c", "from lorsa_surgery.cli import main; main()", "generate", str(Path(out) / "patched"),
                   "--prompt", "The lighthouse", "--max-new-tokens", "8"]
        with tempfile.TemporaryDirectory() as cold_cache:
            cold = timed(lambda: subprocess.run(command, env={**os.environ, "LORSA_SURGERY_CACHE": cold_cache}, check=True,
                                                capture_output=True))
            warm = timed(lambda: subprocess.run(command, env={**os.environ, "LORSA_SURGERY_CACHE": cold_cache}, check=True,
                                                capture_output=True))
    n = store["s"].heads.numel()
    rows = [
        ("pages for 3 heads", three, per_head),
        (f"pages for all {n} heads + index", every, per_head * n / len(HEADS)),
        ("generate on a patched model", warm, cold),
    ]
    print(f"{args.tokens} corpus tokens; scan of {n} heads {scan_s:.1f} s")
    print(f"{'task':<34} {'now s':>8} {'before s':>9} {'now / before':>13}")
    for name, now, before in rows:
        print(f"{name:<34} {now:>8.1f} {before:>9.1f} {now / before:>13.3f}")


if __name__ == "__main__":
    main()
