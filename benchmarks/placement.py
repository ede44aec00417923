"""Peak resident memory and time of loading a spliced SmolLM2, against the size of what was loaded.

Each case runs in a fresh process: it imports everything, notes its resident memory, loads the embedded default
model, splices the shipped layer-3 module and runs one forward pass; it reports the peak resident memory above the
imports divided by the bytes of the weights it holds (host + Lorsa module), and the seconds the load took.

    python benchmarks/placement.py

Cases: the first load of the GGUF file (de-quantised, then cached as safetensors), a later load (from that
cache), a later load in bfloat16, and a later load with half the layers offloaded to disk (--max-memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

CASE = r"""
import json, resource, sys, tempfile, time
import torch
import lorsa_surgery as ls

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

options = json.loads(sys.argv[1])
lorsa = ls.module_for(None, 3, "default")
before = rss_mb()
start = time.perf_counter()
model, tok = ls.load_model("smollm2", lorsa={3: lorsa}, **options)
handle = ls.splice(model, {3: lorsa})
seconds = time.perf_counter() - start
with torch.no_grad():
    model(tok("The lighthouse keeper climbed the stairs", return_tensors="pt").input_ids.to(ls.input_device(model)))
held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
print(json.dumps({"seconds": seconds, "peak_above_imports_mb": peak - before, "weights_mb": held / 2**20}))
"""


def run(options: dict, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CASE, json.dumps(options)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import os

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as offload:
        env = {**os.environ, "LORSA_SURGERY_CACHE": cache, "TQDM_DISABLE": "1"}
        cases = {
            "first load (de-quantise GGUF)": {},
            "later load (cached safetensors)": {},
            "later load, bfloat16": {"dtype": "bfloat16"},
            "later load, cpu=260MB, rest on disk": {"max_memory": "cpu=260MB", "offload_dir": offload},
        }
        rows = {name: run(options, env) for name, options in cases.items()}
    first = rows["first load (de-quantise GGUF)"]["seconds"]
    print(f"{'case':<34} {'load s':>7} {'vs first':>9} {'weights MB':>11} {'peak MB':>8} {'peak / weights':>15}")
    for name, r in rows.items():
        print(f"{name:<34} {r['seconds']:>7.1f} {r['seconds'] / first:>8.2f}x {r['weights_mb']:>11.0f} "
              f"{r['peak_above_imports_mb']:>8.0f} {r['peak_above_imports_mb'] / r['weights_mb']:>14.2f}x")


if __name__ == "__main__":
    main()
