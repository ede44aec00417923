"""`lorsa-surgery demo`: the toolkit's whole story on the embedded SmolLM2, measured, in one report.

1. splice the shipped single-layer modules (layers 3, 18 and 23) and measure explained variance and LM loss;
2. load the shipped complete replacement (every attention layer Lorsa, healed with LoRA adapters) and measure its
   LM loss on the prose against the original and the floor (every attention layer mean-ablated), hence the share of
   the loss it recovers; beside it the figures recorded in the shipped model, before healing among them; one greedy
   generation from each;
3. find the layer-18 heads that read like induction heads (where SmolLM2's induction runs) and show the one that
   reads most (top contexts, z-pattern, logit effects); find the name movers of layer 23;
4. ablate those induction readers against a matched random control, steer the head shown during cached generation,
   patch layer 23's name movers from one IOI prompt into its counterpart;
5. train two small GPT-Js on the multi-hop number and letter tasks, label their heads positional or symbolic, and
   measure accuracy as the input grows;
6. save the patched model and push it with its card to a Hub: $HF_ENDPOINT when set (and HF_HUB_OFFLINE is not),
   else a local Hub server that the demo starts on 127.0.0.1 and stops.

Each step's results and plots are cached under the user cache directory (`models.cache_dir()`), so a second run
with the same version of the demo only rebuilds the report and pushes again; `fresh=True` redoes everything. The report is one HTML file with its
plots and the head dashboard inside it (it opens from disk with no server and no network), beside a Markdown summary.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
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
    """Tokens of each greedy generation (steered or not, complete replacement or original)."""
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

SPLICED = (3, 18, 23)
"""The shipped single-layer modules, spliced together in the first step and published."""
INDUCTION_LAYER = 18
"""Where SmolLM2's induction runs (docs/heads.md): its heads that read like induction heads carry most of what the
layer's whole attention does for repeated text, while layer 23's induction heads carry little of it."""
MOVER_LAYER = 23
"""Where the name movers are: layer 18 has none, and patching all its heads from the clean IOI prompt into the
corrupted one restores none of the logit difference, where layer 23's heads restore most of it."""
PROMPT = "The lighthouse keeper climbed the stairs and"
"""The start of every greedy generation: steered or not, from the complete replacement and from the original."""
STEER_CLAMP = 100.0
"""The steered head's activation at every generated token, large because layer-18 heads' output directions are
short (median norm 1.2)."""
IOI = ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to")
"""The clean IOI prompt (answer Mary) and its counterpart with the subject swapped (answer John)."""
NAMES = (" Mary", " John")


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
"""Which version of this file computed a cached step: what a step records changes with it, so a result cached by
another version is computed again rather than read into a report that expects other fields."""


def _step_cache(folder: Path, name: str, work: Callable[[Path], dict], fresh: bool) -> tuple[dict, bool]:
    """A step's results and whether they were read back: from folder/name/result.json when this version of the demo
    wrote it (and not `fresh`), else computed by work(that folder) and written there."""
    where = folder / name
    done = where / "result.json"
    if not fresh and done.is_file():
        cached = files.read_json(done)
        if cached.get("code") == CODE:
            return cached, True
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    start = time.perf_counter()
    result = work(where)
    result["seconds"] = time.perf_counter() - start
    result["code"] = CODE
    files.write_json(done, result)
    return files.read_json(done), False  # the same shape (string keys) whether computed now or read back


def _greedy(model, tokenizer, new_tokens: int) -> str:
    """The model's greedy continuation of PROMPT (cached generation), as text."""
    prompt = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)


def _splice_step(model, tokenizer, modules, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.host.metrics import splice_report

    def work(where: Path) -> dict:
        report = splice_report(model, tokenizer, modules, corpus.prose()[: size.texts], size.max_length)
        report["heads"] = {layer: m.cfg.n_ov_heads for layer, m in modules.items()}
        report["k"] = {layer: m.cfg.top_k for layer, m in modules.items()}
        return report

    return work


def _complete_step(model, tokenizer, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.host.metrics import attention_means, lm_loss_sums, loss_recovered, mean_ablated
    from lorsa_surgery.publishing.patched import COMPLETE, load_patched, read_root, shipped
    from lorsa_surgery.training.healing import evaluate
    from lorsa_surgery.training.trainer import token_sequences

    def work(where: Path) -> dict:
        replaced, _, handle = load_patched(COMPLETE)
        ids, mask = token_sequences(corpus.prose()[: size.texts], tokenizer, size.max_length)
        # The floor's means come from other text than the prose measured on: rows spread over the documentation.
        doc_ids, doc_mask = token_sequences(corpus.python_documentation(), tokenizer, size.max_length)
        spread = slice(None, None, max(1, len(doc_ids) // len(ids)))
        means = attention_means(model, handle.layers, doc_ids[spread][: len(ids)], doc_mask[spread][: len(ids)])
        with mean_ablated(model, means):
            summed, counted = lm_loss_sums(model, ids, mask).tolist()
        floor, healed = summed / counted, evaluate(handle, ids, mask)
        modules = handle.modules().values()
        metrics = read_root(shipped(COMPLETE))["metrics"]
        # The recorded rows of every layer replaced, as examples/complete_replacement.py labels them.
        labels = {f"first {len(handle.layers)}": "unhealed", "all, healed": "healed"}
        return {
            "name": COMPLETE, "layers": len(handle.layers), "heads": sum(m.cfg.n_ov_heads for m in modules),
            "k": sorted({m.cfg.top_k for m in modules}), "lora_rank": handle.adapter.r if handle.adapter else 0,
            "tokens": healed["tokens"], "original": healed["lm_loss_original"], "replaced": healed["lm_loss_spliced"],
            "kl": healed["kl"], "floor": floor,
            "recovered": loss_recovered(healed["lm_loss_original"], healed["lm_loss_spliced"], floor),
            "generation": {"prompt": PROMPT, "original": _greedy(model, tokenizer, size.new_tokens),
                           "replaced": _greedy(replaced, tokenizer, size.new_tokens)},
            "recorded": {
                "rows": [{**row, "state": labels[row["label"]]} for row in metrics["replacement"]["rows"]
                         if row["label"] in labels],
                "healing": {key: metrics["healing"][key] for key in ("before", "after", "ood_before", "ood_after",
                                                                     "text", "ood_text", "tokens")},
            },
        }

    return work


def _families_step(model, tokenizer, modules, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.analysis.attribution import logit_attribution, token_text, z_pattern
    from lorsa_surgery.analysis.pages import dashboard
    from lorsa_surgery.analysis.plots import plot_logit_attribution, plot_z_pattern
    from lorsa_surgery.analysis.causal import INDUCTION_LENGTH
    from lorsa_surgery.analysis.families import ATTENTION_THRESHOLD, FAMILIES, detect, repeated_probe
    from lorsa_surgery.host.metrics import token_windows
    from lorsa_surgery.host.splicing import splice

    def work(where: Path) -> dict:
        found = {"induction": (INDUCTION_LAYER, detect(model, tokenizer, INDUCTION_LAYER, modules[INDUCTION_LAYER],
                                                       families=["induction"], n_prompts=size.detect_prompts)["induction"]),
                 "name_mover": (MOVER_LAYER, detect(model, tokenizer, MOVER_LAYER, modules[MOVER_LAYER],
                                                    families=["name_mover"], n_prompts=size.detect_prompts)["name_mover"])}
        induction = found["induction"][1]
        # At layer 18 the induction heads are found by where they read, not by what they write (docs/heads.md).
        readers = induction.attending()
        if not readers:
            raise LorsaSurgeryError(f"No head of the layer-{INDUCTION_LAYER} module reads like an induction head.")
        best = max(readers, key=lambda h: float(induction.attention[h] * induction.counted[h]))  # reads most, most often
        ref = f"L{INDUCTION_LAYER}.H{best}"
        probe = repeated_probe(tokenizer, 1, INDUCTION_LENGTH, 7, "induction")  # random words written twice
        queries = probe.query[0].nonzero().flatten().tolist()
        with splice(model, {INDUCTION_LAYER: modules[INDUCTION_LAYER]}) as handle:
            zp = z_pattern(handle, ref, probe.input_ids.repeat(len(queries), 1), position=queries)
            row = int(zp.activation.argmax()) if zp.activation.max() > 0 else int(zp.z.argmax())
            plot_z_pattern(zp, tokenizer, where / "z_pattern.png", row=row)
            at, source, ids = queries[row], int(zp.contributions[row].argmax()), probe.input_ids[0]
            windows = list(token_windows(tokenizer, corpus.prose()[: size.texts], size.max_length))
            page = dashboard(handle, tokenizer, ref, windows + [probe.input_ids], where / "dashboard.html", progress=False)
            attribution = logit_attribution(handle, ref, k=8)
            plot_logit_attribution(attribution, tokenizer, where / "logit_attribution.png")
        top = lambda layer, fs: [(f"L{layer}.H{h}", float(fs.scores[h])) for h in fs.scores.argsort(descending=True)[:5].tolist()]
        return {
            "families": {name: {"layer": layer, "threshold": FAMILIES[name].threshold, "members": fs.members(),
                                "top": top(layer, fs), "description": FAMILIES[name].description}
                         for name, (layer, fs) in found.items()},
            "readers": {"layer": INDUCTION_LAYER, "heads": readers, "attention": ATTENTION_THRESHOLD},
            "shown": {"head": ref, "score": float(induction.scores[best]), "attention": float(induction.attention[best]),
                      "fired": int(induction.counted[best]),
                      "promotes": [token_text(tokenizer, t) for t, _ in attribution.promoted],
                      "z": float(zp.z[row]), "activation": float(zp.activation[row]), "position": at,
                      "token": token_text(tokenizer, int(ids[at])), "source": source,
                      "source_token": token_text(tokenizer, int(ids[source])),
                      "source_is_induction": source == at - INDUCTION_LENGTH + 1, "dashboard": page.name},
        }

    return work


def _plot_causal(check, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="tight")
    ax = fig.subplots()
    bars = [("clean", check.clean), ("induction readers\nablated", check.ablated),
            ("matched control\nablated", check.control_ablated), ("ablated, then\npatched back", check.restored)]
    means = [e.mean for _, e in bars]
    errors = [[e.mean - e.low for _, e in bars], [e.high - e.mean for _, e in bars]]
    ax.bar(range(len(bars)), means, yerr=errors, capsize=4, color=["#777", "#e07b00", "#3b6fd8", "#999"])
    ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set(ylabel="repeated-token accuracy", ylim=(0, 1),
           title=f"layer {INDUCTION_LAYER}: {len(check.heads)} heads, {check.prompts} prompts, 95% CI")
    return files.write_figure(path, fig)


def _interventions_step(model, tokenizer, modules, families: dict, size: DemoSize) -> Callable[[Path], dict]:
    from lorsa_surgery.analysis.causal import causal_check
    from lorsa_surgery.interventions.edits import InterventionSet, Patch, Steer
    from lorsa_surgery.interventions.patching import cache_run, forward
    from lorsa_surgery.host.splicing import splice

    def work(where: Path) -> dict:
        steered_head = families["shown"]["head"]
        with splice(model, {INDUCTION_LAYER: modules[INDUCTION_LAYER]}) as handle:
            # Random words, as for docs/heads.md: the readers promote no words of their own to draw prompts from.
            check = causal_check(handle, tokenizer, INDUCTION_LAYER, "induction", families["readers"]["heads"],
                                 n_prompts=size.causal_prompts)
            _plot_causal(check, where / "ablation.png")
            plain = _greedy(model, tokenizer, size.new_tokens)
            with InterventionSet([Steer(steered_head, clamp=STEER_CLAMP, positions="generated")]).applied(handle):
                steered = _greedy(model, tokenizer, size.new_tokens)

        ids = [tokenizer(p, return_tensors="pt").input_ids for p in IOI]
        answers = [tokenizer(n, add_special_tokens=False).input_ids for n in NAMES]
        if ids[0].shape != ids[1].shape or any(len(a) != 1 for a in answers):
            raise LorsaSurgeryError("The IOI prompts need one token per name and equal lengths under this tokenizer.")
        (mary,), (john,) = answers
        found = families["families"]["name_mover"]
        movers = found["members"] or [int(h.split(".H")[1]) for h, _ in found["top"]]
        diff = lambda logits: float(logits[0, -1, mary] - logits[0, -1, john])
        patched = {}
        with splice(model, {MOVER_LAYER: modules[MOVER_LAYER]}) as handle:
            clean, corrupt = (diff(forward(handle, i).float()) for i in ids)
            for name, heads in (("name movers", movers), ("all heads", list(range(modules[MOVER_LAYER].cfg.n_ov_heads)))):
                refs = [f"L{MOVER_LAYER}.H{h}" for h in heads]
                with InterventionSet([Patch(refs, cache_run(handle, ids[0], refs))]).applied(handle):
                    patched[name] = {"heads": len(heads), "logit_diff": diff(forward(handle, ids[1]).float())}
        return {
            "ablation": {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in vars(check).items()},
            "steer": {"head": steered_head, "clamp": STEER_CLAMP, "prompt": PROMPT, "plain": plain, "steered": steered},
            "patch": {"layer": MOVER_LAYER, "clean_prompt": IOI[0], "corrupt_prompt": IOI[1], "clean": clean,
                      "corrupt": corrupt,
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
    from lorsa_surgery.publishing.patched import COMPLETE, module_for, shipped
    from lorsa_surgery.host.splicing import splice

    size = SIZES["fast" if fast else "full"]
    out = Path(out)
    files.claim(out, kind="demo")  # before the work: a folder of someone else's is refused, a file too
    if shipped(COMPLETE) is None:
        raise LorsaSurgeryError(f"The complete replacement {COMPLETE} is not installed with this copy of lorsa-surgery.")
    cache = cache_dir() / "demo" / ("fast" if fast else "full")
    steps = tqdm(total=6, desc="demo", disable=not progress, unit="step")
    steps.set_postfix_str("loading SmolLM2")
    model, tokenizer = load_model("smollm2")
    modules = {layer: module_for(model, layer, "default") for layer in SPLICED}

    reused: list[str] = []

    def step(name: str, work: Callable[[Path], dict]) -> dict:
        steps.set_postfix_str(name)
        result, read_back = _step_cache(cache, name, work, fresh)
        if read_back:
            reused.append(name)
        steps.update()
        return result

    results: dict[str, Any] = {"size": asdict(size), "fast": fast, "reused": reused}
    results["splice"] = step("splice", _splice_step(model, tokenizer, modules, size))
    results["complete"] = step("complete", _complete_step(model, tokenizer, size))
    results["families"] = step("families", _families_step(model, tokenizer, modules, size))
    results["interventions"] = step("interventions", _interventions_step(model, tokenizer, modules, results["families"],
                                                                         size))
    results["positional"] = step("positional", _positional_step(size, progress))
    steps.set_postfix_str("publish")
    with splice(model, modules) as handle:
        results["publish"] = _publish(handle, results["splice"], out)
    steps.update()
    steps.close()

    images = {name: _png(cache / folder / f"{name}.png") for folder, name in (
        ("families", "z_pattern"), ("families", "logit_attribution"), ("interventions", "ablation"), ("positional", "by_length"))}
    dashboard = (cache / "families" / results["families"]["shown"]["dashboard"]).read_text(encoding="utf-8")
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    for kind in ("html", "md"):
        template = resources.files("lorsa_surgery.templates").joinpath(f"demo.{kind}.jinja").read_text(encoding="utf-8")
        if kind == "md":
            env = Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(r=results, images=images, dashboard=dashboard)
        files.write_text(out / f"report.{kind}", text)
    files.write_json(out / "results.json", results)
    return out / "report.html"
