"""`lorsa-surgery demo`: the toolkit's whole story on the embedded SmolLM2, measured, in one report.

1. splice the shipped modules (layers 3 and 23) and measure explained variance and LM loss;
2. detect head families in the layer-23 module and show the best induction head (top contexts, z-pattern, logit
   effects);
3. ablate the induction heads against a matched random control, steer one head during cached generation, patch
   the name movers from one IOI prompt into its counterpart;
4. train two small GPT-Js on the multi-hop number and letter tasks, label their heads positional or symbolic, and
   measure accuracy as the input grows;
5. save the patched model and push it with its card to a Hub: $HF_ENDPOINT when set (and HF_HUB_OFFLINE is not),
   else a local Hub server that the demo starts on 127.0.0.1 and stops.

Each step's results and plots are cached under the user cache directory (`models.cache_dir()`), so a second run
only rebuilds the report and pushes again; `fresh=True` redoes everything. The report is one HTML file with its
plots and the head dashboard inside it (it opens from disk with no server and no network), beside a Markdown summary.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from jinja2 import Environment
from tqdm.auto import tqdm

from lorsa_surgery.host import corpus

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError


@dataclass(frozen=True)
class DemoSize:
    """How much work each step does: the full demo, or `fast` for tests."""

    texts: int
    """Prose documents for explained variance and LM loss."""
    max_length: int
    """Token window for those texts and the dashboard's contexts."""
    detect_prompts: int
    """Prompts per family detector."""
    causal_prompts: int
    """Prompts in the induction ablation."""
    new_tokens: int
    """Tokens generated with and without steering."""
    task_steps: int
    """Training steps of each multi-hop GPT-J."""
    task_layers: int
    """Layers of each multi-hop GPT-J."""
    lengths: tuple[int, ...]
    """Extra window tokens in the length sweep (the training input is 17 tokens)."""


SIZES = {
    "full": DemoSize(texts=14, max_length=256, detect_prompts=16, causal_prompts=64, new_tokens=24, task_steps=1000,
                     task_layers=6, lengths=(0, 16, 48, 112, 240, 496)),
    "fast": DemoSize(texts=2, max_length=96, detect_prompts=4, causal_prompts=8, new_tokens=8, task_steps=30,
                     task_layers=2, lengths=(0, 16)),
}

STEER_PROMPT = "The lighthouse keeper climbed the stairs and"
STEER_CLAMP = 100.0
"""The steered head's activation at every generated token: the best induction head's output direction is short
(norm about 1), so 30 leaves greedy text unchanged and 100 turns it towards what the head promotes."""
IOI = ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to")
"""The clean IOI prompt (answer Mary) and its counterpart with the subject swapped (answer John)."""
NAMES = (" Mary", " John")
INDUCTION_CUT = 0.05
"""Induction score from which heads are ablated together: at the family's own threshold (0.2) the effect stays within
the matched control's, since induction in layer 23 is spread over many heads (docs/heads.md)."""


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _step_cache(folder: Path, name: str, work: Callable[[Path], dict], fresh: bool) -> dict:
    """A step's results: read from folder/name/result.json, or computed by work(that folder) and written there."""
    where = folder / name
    if fresh and where.exists():
        shutil.rmtree(where)
    done = where / "result.json"
    if done.is_file():
        return files.read_json(done)
    where.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = work(where)
    result["seconds"] = time.perf_counter() - start
    files.write_json(done, result)
    return files.read_json(done)  # the same shape (string keys) whether computed now or read back


def _splice_step(model, tokenizer, modules, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.host.metrics import splice_report

    def work(where: Path) -> dict:
        report = splice_report(model, tokenizer, modules, corpus.prose()[: size.texts], size.max_length)
        report["heads"] = {layer: m.cfg.n_ov_heads for layer, m in modules.items()}
        report["k"] = {layer: m.cfg.top_k for layer, m in modules.items()}
        return report

    return work


def _families_step(model, tokenizer, lorsa, layer: int, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.analysis.attribution import logit_attribution, token_text, z_pattern
    from lorsa_surgery.analysis.pages import dashboard
    from lorsa_surgery.analysis.plots import plot_logit_attribution, plot_z_pattern
    from lorsa_surgery.analysis.causal import INDUCTION_LENGTH, family_words
    from lorsa_surgery.analysis.families import FAMILIES, detect, repeated_probe
    from lorsa_surgery.host.metrics import token_windows
    from lorsa_surgery.host.splicing import splice

    def work(where: Path) -> dict:
        found = detect(model, tokenizer, layer, lorsa, families=["induction", "name_mover"], n_prompts=size.detect_prompts)
        induction = found["induction"]
        best = int(induction.scores.argmax())
        ref = f"L{layer}.H{best}"
        with splice(model, {layer: lorsa}) as handle:
            # A rank-1 head copies its own few tokens: show it on a repeated sequence of the words its family promotes,
            # at the repeated token where it fires most.
            words = family_words(handle, layer, induction.members() or [best], tokenizer, k=max(3, -(-20 // max(1, len(induction.members())))))
            probe = repeated_probe(tokenizer, 1, INDUCTION_LENGTH, 7, "induction", words)
            queries = probe.query[0].nonzero().flatten().tolist()
            zp = z_pattern(handle, ref, probe.input_ids.repeat(len(queries), 1), position=queries)
            row = int(zp.activation.argmax()) if zp.activation.max() > 0 else int(zp.z.argmax())
            plot_z_pattern(zp, tokenizer, where / "z_pattern.png", row=row)
            at, source = queries[row], int(zp.contributions[row].argmax())
            windows = list(token_windows(tokenizer, corpus.prose()[: size.texts], size.max_length))
            page = dashboard(handle, tokenizer, ref, windows + [probe.input_ids], where / "dashboard.html", progress=False)
            attribution = logit_attribution(handle, ref, k=8)
            plot_logit_attribution(attribution, tokenizer, where / "logit_attribution.png")
        ablated = [int(h) for h in (induction.scores >= INDUCTION_CUT).nonzero().flatten()]
        top = lambda fs: [(f"L{layer}.H{h}", float(fs.scores[h])) for h in fs.scores.argsort(descending=True)[:5].tolist()]
        return {
            "layer": layer,
            "families": {name: {"threshold": FAMILIES[name].threshold, "members": [int(h) for h in fs.members()],
                                "top": top(fs), "description": FAMILIES[name].description}
                         for name, fs in found.items()},
            "ablated": {"cut": INDUCTION_CUT, "heads": ablated or [best]},
            "best_induction": {"head": ref, "score": float(induction.scores[best]),
                               "promotes": [token_text(tokenizer, t) for t, _ in attribution.promoted],
                               "z": float(zp.z[row]), "activation": float(zp.activation[row]), "position": at,
                               "token": token_text(tokenizer, int(probe.input_ids[0, at])), "source": source,
                               "source_token": token_text(tokenizer, int(probe.input_ids[0, source])),
                               "source_is_induction": source == at - INDUCTION_LENGTH + 1,
                               "dashboard": page.name},
        }

    return work


def _plot_causal(check, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="tight")
    ax = fig.subplots()
    bars = [("clean", check.clean), ("induction heads\nablated", check.ablated),
            ("matched control\nablated", check.control_ablated), ("ablated, then\npatched back", check.restored)]
    means = [e.mean for _, e in bars]
    errors = [[e.mean - e.low for _, e in bars], [e.high - e.mean for _, e in bars]]
    ax.bar(range(len(bars)), means, yerr=errors, capsize=4, color=["#777", "#e07b00", "#3b6fd8", "#999"])
    ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set(ylabel="repeated-token accuracy", ylim=(0, 1), title=f"{len(check.heads)} heads, {check.prompts} prompts, 95% CI")
    return files.write_figure(path, fig)


def _interventions_step(model, tokenizer, lorsa, layer: int, families: dict, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.analysis.causal import causal_check
    from lorsa_surgery.interventions.edits import InterventionSet, Patch, Steer
    from lorsa_surgery.interventions.patching import cache_run, forward
    from lorsa_surgery.host.splicing import splice

    def work(where: Path) -> dict:
        induction = families["ablated"]["heads"]
        with splice(model, {layer: lorsa}) as handle:
            check = causal_check(handle, tokenizer, layer, "induction", induction, n_prompts=size.causal_prompts,
                                 words="family")
            _plot_causal(check, where / "ablation.png")

            steered_head = families["best_induction"]["head"]
            prompt = tokenizer(STEER_PROMPT, return_tensors="pt")
            settings = dict(max_new_tokens=size.new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
            plain = model.generate(**prompt, **settings)[0, prompt.input_ids.shape[1]:]
            with InterventionSet([Steer(steered_head, clamp=STEER_CLAMP, positions="generated")]).applied(handle):
                steered = model.generate(**prompt, **settings)[0, prompt.input_ids.shape[1]:]

            ids = [tokenizer(p, return_tensors="pt").input_ids for p in IOI]
            answers = [tokenizer(n, add_special_tokens=False).input_ids for n in NAMES]
            if ids[0].shape != ids[1].shape or any(len(a) != 1 for a in answers):
                raise LorsaSurgeryError("The IOI prompts need one token per name and equal lengths under this tokenizer.")
            (mary,), (john,) = answers
            movers = families["families"]["name_mover"]["members"] or [int(h.split(".H")[1]) for h, _ in families["families"]["name_mover"]["top"]]
            diff = lambda logits: float(logits[0, -1, mary] - logits[0, -1, john])
            clean, corrupt = (diff(forward(handle, i).float()) for i in ids)
            patched = {}
            for name, heads in (("name movers", movers), ("all heads", list(range(lorsa.cfg.n_ov_heads)))):
                refs = [f"L{layer}.H{h}" for h in heads]
                with InterventionSet([Patch(refs, cache_run(handle, ids[0], refs))]).applied(handle):
                    patched[name] = {"heads": len(heads), "logit_diff": diff(forward(handle, ids[1]).float())}
        return {
            "ablation": {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in vars(check).items()},
            "steer": {"head": steered_head, "clamp": STEER_CLAMP, "prompt": STEER_PROMPT,
                      "plain": tokenizer.decode(plain, skip_special_tokens=True),
                      "steered": tokenizer.decode(steered, skip_special_tokens=True)},
            "patch": {"clean_prompt": IOI[0], "corrupt_prompt": IOI[1], "clean": clean, "corrupt": corrupt,
                      "patched": {name: {**p, "restored": (p["logit_diff"] - corrupt) / (clean - corrupt)}
                                  for name, p in patched.items()}},
        }

    return work


def _positional_step(size: DemoSize, progress: bool) -> Callable[[Path], dict]:
    from lorsa_surgery.multihop import positional
    from lorsa_surgery.multihop.tasks import TaskTokenizer, generate
    from lorsa_surgery.multihop.train import length_sweep, load_checkpoint, plot_accuracy_vs_length, preset, train

    def work(where: Path) -> dict:
        out, sweeps = {}, {}
        for task in ("number", "letter"):
            steps = size.task_steps
            config = preset("small", task=task, n_layer=size.task_layers, steps=steps, warmup_steps=steps // 10,
                            checkpoint_steps=(steps,), eval_every=max(10, steps // 10), eval_examples=256)
            history = train(config, where / task, progress=progress)
            model, _ = load_checkpoint(where / task / f"step_{steps:06d}")
            ids, _ = TaskTokenizer(task).encode_examples(generate(task, 64, seed="demo-scores"))
            scores = positional.head_scores(model, ids, progress=False).to_dict()
            sweeps[task] = length_sweep(model, task, list(size.lengths), n=256, progress=progress)
            out[task] = {"accuracy": history[-1]["accuracy"], "per_hop": history[-1]["per_hop"], "layers": config.n_layer,
                         "steps": steps, "labels": scores["labels"], "positional": scores["positional"],
                         "symbolic": scores["symbolic"],
                         "by_length": {n: r["accuracy"] for n, r in sweeps[task].items()}}
        plot_accuracy_vs_length(sweeps, where / "by_length.png", title="multi-hop accuracy by input length")
        return {"tasks": out}

    return work


def _publish(handle, report: dict, out: Path) -> dict:
    """Save the patched model and push it: to $HF_ENDPOINT with the user's token when one is set and HF_HUB_OFFLINE
    does not rule it out, else to a local Hub server started for this and stopped after it."""
    from huggingface_hub import HfApi, constants

    from lorsa_surgery.io.hub import push_folder
    from lorsa_surgery.publishing.patched import save_patched

    folder = save_patched(handle, out / "patched-smollm2", metrics=report, overwrite=True)  # the demo's own folder
    endpoint = os.environ.get("HF_ENDPOINT")
    with contextlib.ExitStack() as stack:
        if endpoint and not constants.is_offline_mode():
            token, where = None, f"the configured Hub ({endpoint})"
        else:
            from lorsa_surgery.io.hub_server import HubServer

            server = HubServer().start()
            stack.callback(server.stop)
            # The local server speaks the Hub's plain and LFS uploads, not Xet; huggingface_hub reads this per call.
            stack.enter_context(mock.patch.object(constants, "HF_HUB_DISABLE_XET", True))
            # HF_HUB_OFFLINE keeps the demo off remote Hubs, not off its own server on 127.0.0.1; huggingface_hub
            # reads the variable once, at import, and this constant on every request.
            stack.enter_context(mock.patch.object(constants, "HF_HUB_OFFLINE", False))
            ruled_out = f"; HF_HUB_OFFLINE=1 rules out the configured Hub ({endpoint})" if endpoint else ""
            where = f"a local Hub server started by the demo ({server.url}, now stopped{ruled_out})"
            endpoint, token = server.url, "local-demo-token"
        api = HfApi(endpoint=endpoint, token=token)
        repo_id = f"{api.whoami()['name']}/lorsa-demo-smollm2"
        commit = push_folder(folder, repo_id, token=token, endpoint=endpoint, commit_message="lorsa-surgery demo")
        remote = sorted(api.list_repo_files(repo_id))
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {"where": where, "repo_id": repo_id, "commit": commit.oid, "url": commit.commit_url, "files": remote,
            "all_pushed": set(remote) >= {f for f in local if not f.startswith(".")}, "folder": str(folder)}


def run_demo(out: str | Path = "lorsa-demo", fast: bool = False, fresh: bool = False, progress: bool = True) -> Path:
    """Run the demo (see the module docstring) and write out/report.html and out/report.md; returns the HTML path."""
    from lorsa_surgery.host.models import cache_dir, load_model
    from lorsa_surgery.publishing.patched import module_for
    from lorsa_surgery.host.splicing import splice

    size = SIZES["fast" if fast else "full"]
    out = Path(out)
    files.claim(out, kind="demo")  # before the work: a folder of someone else's is refused, a file too
    cache = cache_dir() / "demo" / ("fast" if fast else "full")
    steps = tqdm(total=5, desc="demo", disable=not progress, unit="step")
    steps.set_postfix_str("loading SmolLM2")
    model, tokenizer = load_model("smollm2")
    modules = {layer: module_for(model, layer, "default") for layer in (3, 23)}
    layer = 23

    reused: list[str] = []

    def step(name: str, work: Callable[[Path], dict]) -> dict:
        steps.set_postfix_str(name)
        if not fresh and (cache / name / "result.json").is_file():
            reused.append(name)
        result = _step_cache(cache, name, work, fresh)
        steps.update()
        return result

    results: dict[str, Any] = {"size": asdict(size), "fast": fast, "reused": reused}
    results["splice"] = step("splice", _splice_step(model, tokenizer, modules, size))
    results["families"] = step("families", _families_step(model, tokenizer, modules[layer], layer, size))
    results["interventions"] = step("interventions", _interventions_step(model, tokenizer, modules[layer], layer,
                                                                         results["families"], size))
    results["positional"] = step("positional", _positional_step(size, progress))
    steps.set_postfix_str("publish")
    with splice(model, modules) as handle:
        results["publish"] = _publish(handle, results["splice"], out)
    steps.update()
    steps.close()

    images = {name: _png(cache / folder / f"{name}.png") for folder, name in (
        ("families", "z_pattern"), ("families", "logit_attribution"), ("interventions", "ablation"), ("positional", "by_length"))}
    dashboard = (cache / "families" / results["families"]["best_induction"]["dashboard"]).read_text(encoding="utf-8")
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    for kind in ("html", "md"):
        template = resources.files("lorsa_surgery.templates").joinpath(f"demo.{kind}.jinja").read_text(encoding="utf-8")
        if kind == "md":
            env = Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(r=results, images=images, dashboard=dashboard)
        files.write_text(out / f"report.{kind}", text)
    files.write_json(out / "results.json", results)
    return out / "report.html"
