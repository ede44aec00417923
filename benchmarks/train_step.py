"""One Lorsa training step (forward + backward + Adam update) and the forward alone: ours against the
reference implementation (llamascopium), on identical shapes, weights and batch, side by side in one run.

    python benchmarks/train_step.py                       # ours only, with the FLOP rate
    python benchmarks/train_step.py --with-reference      # installs llamascopium into a temporary venv
    python benchmarks/train_step.py --reference-venv DIR  # reuses (or creates) that venv

The reference never becomes a dependency: it lives in its own virtual environment and runs in a worker
process that receives the same weights and batch through a safetensors file. Rounds alternate between
the two so that both see the same machine load; the table reports medians.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorsa_surgery import Lorsa, LorsaConfig

WORKER = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from llamascopium.models.lorsa import LorsaConfig, LowRankSparseAttention

torch.set_num_threads(int(sys.argv[2]))
data = load_file(sys.argv[1])
shape = json.loads(sys.argv[3])
clock = time.process_time if sys.argv[4] == "cpu" else time.perf_counter
cfg = LorsaConfig(
    hook_point_in="in", hook_point_out="out", d_model=shape["d_model"], expansion_factor=shape["n_heads"] / shape["d_model"],
    n_qk_heads=shape["n_qk_heads"], d_qk_head=shape["d_qk_head"], rotary_dim=shape["d_qk_head"], n_ctx=shape["context"],
    act_fn="topk", top_k=shape["k"], rotary_adjacent_pairs=False, norm_activation="inference", device="cpu",
    dtype=torch.float32,
)
model = LowRankSparseAttention(cfg)
model.load_state_dict({k: data[k] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_D")}, strict=False)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
batch = {"in": data["x"], "out": data["y"]}

def step():
    loss = model.compute_loss(batch, return_aux_data=False)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

def forward():
    with torch.no_grad():
        return model.decode(model.encode(batch["in"]))

with torch.no_grad():
    loss = model.compute_loss(batch, return_aux_data=False).item()
print(json.dumps({"loss": loss}), flush=True)
for line in sys.stdin:
    what, n = line.split()
    times = []
    for _ in range(int(n)):
        start = clock()
        (step if what == "step" else forward)()
        times.append(clock() - start)
    print(json.dumps({"times": times}), flush=True)
'''


def make_reference_venv(folder: Path) -> Path:
    """A virtual environment with the reference implementation and the same torch as ours; its python."""
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    torch_version = torch.__version__.split("+")[0]
    # Pinning torch to our version keeps the comparison fair and stops pip fetching a multi-GB CUDA build.
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}", "llamascopium", "transformer-lens<4"],
        capture_output=True, text=True,
    )
    if done.returncode:
        raise RuntimeError("pip could not install the reference:\n" + (done.stderr or done.stdout)[-3000:])
    return python


def model_flops(shape: dict, training: bool) -> float:
    """Arithmetic of one pass as written: Q/K/V projection, attention over the full T x T square (what the
    CPU kernels compute), the K-row sparse decode; a training step counts three passes (backward = 2x)."""
    B, T, d = shape["batch"], shape["context"], shape["d_model"]
    n_qk, d_qk, n = shape["n_qk_heads"], shape["d_qk_head"], shape["n_heads"]
    projection = 2 * B * T * d * (2 * n_qk * d_qk + n)
    attention = 2 * B * n_qk * T * T * (d_qk + n // n_qk)
    decode = 2 * B * T * shape["k"] * d
    return (projection + attention + decode) * (3 if training else 1)


def matmul_rate(shape: dict, clock, repeats: int = 10) -> float:
    """GFLOP/s of one plain float32 matmul with the shape of the Q/K/V projection."""
    B, T, d = shape["batch"], shape["context"], shape["d_model"]
    a = torch.randn(B * T, d)
    b = torch.randn(d, 2 * shape["n_qk_heads"] * shape["d_qk_head"] + shape["n_heads"])
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = clock()
        a @ b
        times.append(clock() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-reference", action="store_true", help="Install the reference into a temporary venv.")
    parser.add_argument("--reference-venv", type=Path, help="Venv for the reference (created and filled if needed).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, for both sides.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds; each side runs --iters per round.")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="Time with process CPU time instead of the wall clock: with --threads 1 this measures the "
                             "work done, unaffected by other processes sharing the machine.")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--heads", type=int, default=4608)
    parser.add_argument("--qk-heads", type=int, default=36)
    parser.add_argument("--d-qk", type=int, default=64)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = {"d_model": args.d_model, "n_heads": args.heads, "n_qk_heads": args.qk_heads, "d_qk_head": args.d_qk,
             "k": args.k, "batch": args.batch, "context": args.context}

    torch.manual_seed(0)
    cfg = LorsaConfig(d_model=args.d_model, n_qk_heads=args.qk_heads, d_qk_head=args.d_qk, n_ov_heads=args.heads,
                      top_k=args.k, n_ctx=args.context)
    lorsa = Lorsa(cfg)
    with torch.no_grad():
        lorsa.b_V.normal_(0, 0.1)
        lorsa.b_D.normal_(0, 0.1)
    x = torch.randn(args.batch, args.context, args.d_model)
    y = torch.randn(args.batch, args.context, args.d_model)
    optimizer = torch.optim.Adam(lorsa.parameters(), lr=1e-4)  # as the trainer builds it

    def our_step():
        loss = (lorsa(x) - y).pow(2).sum(-1).mean()  # the trainer's loss: squared error summed over d, token mean
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def our_forward():
        with torch.no_grad():
            lorsa(x)

    with torch.no_grad():
        our_loss = (lorsa(x) - y).pow(2).sum(-1).mean().item()

    worker = None
    reference_loss = None
    tmp = Path(tempfile.mkdtemp(prefix="lorsa-bench-"))
    if args.with_reference or args.reference_venv:
        try:
            python = make_reference_venv(args.reference_venv or tmp / "venv")
            data = tmp / "batch.safetensors"
            save_file({**{k: v.detach().contiguous() for k, v in lorsa.state_dict().items()}, "x": x, "y": y}, str(data))
            script = tmp / "worker.py"
            script.write_text(WORKER)
            errors = open(tmp / "worker.err", "w")
            worker = subprocess.Popen([str(python), "-W", "ignore", str(script), str(data), str(args.threads), json.dumps(shape),
                                       "cpu" if args.cpu_time else "wall"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError("the reference worker failed:\n" + (tmp / "worker.err").read_text()[-3000:])
            reference_loss = json.loads(line)["loss"]
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"Reference not run: {e}")
            worker = None

    def reference(what: str) -> list[float]:
        worker.stdin.write(f"{what} {args.iters}\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())["times"]

    clock = time.process_time if args.cpu_time else time.perf_counter

    def ours(fn) -> list[float]:
        times = []
        for _ in range(args.iters):
            start = clock()
            fn()
            times.append(clock() - start)
        return times

    for fn in (our_step, our_forward):  # warm-up
        fn()
    if worker:
        reference("step"), reference("forward")
    results: dict[str, dict[str, list[float]]] = {w: {"ours": [], "reference": []} for w in ("step", "forward")}
    for _ in range(args.rounds):
        for what, fn in (("step", our_step), ("forward", our_forward)):
            results[what]["ours"] += ours(fn)
            if worker:
                results[what]["reference"] += reference(what)
    if worker:
        worker.stdin.close()
        worker.wait()

    tokens = args.batch * args.context
    rate = matmul_rate(shape, clock)
    print(f"\nLorsa, d_model {args.d_model}, {args.heads} heads, {args.qk_heads} QK heads x {args.d_qk}, K {args.k}, "
          f"batch {args.batch} x {args.context}, {args.threads} threads, float32 CPU; medians of {args.rounds * args.iters}, "
          f"{'CPU time' if args.cpu_time else 'wall clock'}\n")
    print(f"{'':<24}{'ours ms':>10}{'ref ms':>10}{'speed-up':>10}{'ours tok/s':>12}{'ref tok/s':>12}{'ours GFLOP/s':>14}")
    for what, label in (("step", "train step (fwd+bwd+Adam)"), ("forward", "forward only")):
        mine = statistics.median(results[what]["ours"])
        ref = statistics.median(results[what]["reference"]) if results[what]["reference"] else math.nan
        gflops = model_flops(shape, what == "step") / mine / 1e9
        print(f"{label:<24}{mine * 1e3:>10.1f}{ref * 1e3:>10.1f}{ref / mine:>9.2f}x{tokens / mine:>12.0f}"
              f"{tokens / ref:>12.0f}{gflops:>14.1f}")
    print(f"\nloss on the same batch: ours {our_loss:.6f}, reference "
          + (f"{reference_loss:.6f} (difference {abs(our_loss - reference_loss):.2e})" if reference_loss is not None else "not run"))
    step_rate = model_flops(shape, True) / statistics.median(results["step"]["ours"]) / 1e9
    fwd_rate = model_flops(shape, False) / statistics.median(results["forward"]["ours"]) / 1e9
    print(f"plain float32 matmul on this machine ({tokens} x {args.d_model} @ {args.d_model} x "
          f"{2 * args.qk_heads * args.d_qk + args.heads}): {rate:.1f} GFLOP/s; ours reaches {step_rate / rate:.0%} of it "
          f"in the training step and {fwd_rate / rate:.0%} in the forward")


if __name__ == "__main__":
    main()
