"""Circuits through Lorsa heads on tiny random models: node attribution against activation patching, Q/K/V edges
against path patching, the pruned graph and its JSON, faithfulness and necessity, the command and its page."""

import json
import shutil
import subprocess

import pytest
import torch

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.analysis.circuit_page import circuit_page
from lorsa_surgery.analysis.circuits import (Graph, attribute, attribute_edges, faithfulness, head_stats, matched_heads,
                                             necessity, patch_heads, path_patch, prune, spearman)
from lorsa_surgery.host.arch import exact_copy
from lorsa_surgery.host.hooks import run_with_cache
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Patch
from lorsa_surgery.interventions.heads import HeadRef
from lorsa_surgery.interventions.patching import LogitDiff, Probability, RepeatGain, cache_run, forward, sweep
from test_interventions import char_tokenizer, cli
from test_splice import tiny

METRIC = LogitDiff(5, 9)


def spliced_everywhere(scale: float = 1.0, topk: bool = False, exact: tuple[int, ...] = (), dtype=torch.float32):
    """A tiny Llama with a Lorsa module at each of its 3 layers: exact copies (at `exact`) or relu heads made sparse by
    a negative value bias (or top-K of a quarter of them), their output directions scaled by `scale` (small: nearly
    linear)."""
    model = tiny("llama").to(dtype)
    modules = {}
    for layer in range(3):
        lorsa = exact_copy(model, layer)
        if layer not in exact:
            with torch.no_grad():
                lorsa.b_V.sub_(0.02)
                lorsa.W_O.mul_(scale)
            if topk:
                lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", lorsa.cfg.n_ov_heads // 4
        modules[layer] = lorsa
    modules[1].catalog = {7: {"label": "seven"}}
    return model, splice(model, modules)


def prompts(n=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (1, T), generator=g) for _ in range(n)]


def patched_one_by_one(handle, clean, corrupt, n=24):
    """clean metric minus the metric with each of the first n heads of every layer patched from the corrupt run at each
    position, [layers x n, T]."""
    heads = ",".join(f"L{layer}.H0-{n - 1}" for layer in handle.layers)
    result = sweep(handle, clean, heads, METRIC, source=cache_run(handle, corrupt, heads), batch_size=64, progress=False)
    return result.baseline - result.values


def test_node_attribution_is_the_first_order_patching_effect():
    model, handle = spliced_everywhere(scale=0.05)
    clean, corrupt = prompts()
    nodes = attribute(handle, clean, METRIC, corrupt)
    assert nodes.baseline == "corrupt" and nodes.names[1][7] == "L1.H7" and nodes.values[0].shape == (128, 8)
    true = patched_one_by_one(handle, clean, corrupt)
    ours = torch.cat([nodes.values[layer][:24] for layer in handle.layers])
    assert (ours - true).norm() < 0.01 * true.norm()
    assert nodes.clean_metric == pytest.approx(float(METRIC(forward(handle, clean), clean, None)), abs=1e-5)


def test_node_attribution_ranks_heads_as_patching_does():
    model, handle = spliced_everywhere()
    clean, corrupt = prompts()
    true = patched_one_by_one(handle, clean, corrupt).flatten()
    ours = torch.cat([attribute(handle, clean, METRIC, corrupt).values[layer][:24] for layer in handle.layers]).flatten()
    top = true.abs().argsort(descending=True)[:50]
    assert spearman(ours[top], true[top]) > 0.95


def test_baselines_and_mhsa_heads_of_exact_copies():
    model, handle = spliced_everywhere(exact=(1,))
    clean = prompts(1)[0]
    zero = attribute(handle, clean, Probability(5, log=True), baseline="zero")
    assert zero.names[1] == ["L1.A0", "L1.A1", "L1.A2", "L1.A3"] and zero.values[1].shape == (4, 8)
    cache = run_with_cache(handle, clean, ["L1.hook_acts"], grad=True)
    Probability(5, log=True)(cache.logits, clean, None).sum().backward()
    acts = cache["L1.hook_acts"]
    by_head = (acts * acts.grad)[0].T  # [128, T]: every rank-1 part against zero
    assert torch.allclose(zero.values[1], by_head.view(4, 32, 8).sum(1), atol=1e-6)
    mean = attribute(handle, clean, Probability(5, log=True))
    assert mean.baseline == "mean" and not torch.allclose(mean.values[0], zero.values[0])
    with pytest.raises(LorsaSurgeryError, match="as long"):
        attribute(handle, clean, METRIC, clean[:, :5])
    with pytest.raises(LorsaSurgeryError, match="needs corrupt_ids"):
        attribute(handle, clean, METRIC, baseline="corrupt")


def test_spearman_gives_ties_their_mean_rank():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9 ** 0.5)  # ranks 1, 2.5, 2.5, 4
    with pytest.raises(LorsaSurgeryError, match="same length"):
        spearman([1, 2], [1, 2, 3])


def test_metrics_that_read_their_tokens_from_each_row():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 7, 20, generator=g), torch.randint(0, 20, (3, 7), generator=g)
    per_row = LogitDiff(2, 4, columns=True)(logits, ids, None)
    for b in range(3):
        alone = LogitDiff(int(ids[b, 2]), int(ids[b, 4]))(logits[b : b + 1], ids[b : b + 1], None)
        assert per_row[b] == pytest.approx(float(alone))
    ids[:, 4:] = ids[:, 1:4]  # a start token, then 3 tokens written twice
    logp = logits.log_softmax(-1)
    gain = RepeatGain(3)(logits, ids, None)
    expected = [(logp[b, 4, ids[b, 5]] + logp[b, 5, ids[b, 6]] - logp[b, 1, ids[b, 2]] - logp[b, 2, ids[b, 3]]) / 2
                for b in range(3)]
    assert torch.allclose(gain, torch.stack(expected), atol=1e-5)
    with pytest.raises(LorsaSurgeryError, match="rows of 9 tokens"):
        RepeatGain(4)(logits, ids, None)


def test_patching_a_head_everywhere_is_what_its_summed_attribution_estimates():
    model, handle = spliced_everywhere(scale=0.05)
    texts = prompts(4)
    clean, corrupt = torch.cat(texts[:2]), torch.cat(texts[2:])
    nodes = attribute(handle, clean, METRIC, corrupt)
    top = nodes.top_heads(20)
    assert len(top) == 20 and abs(top[0][1]) >= abs(top[-1][1]) > 0
    layer, unit, _ = nodes.node(f"{top[0][0]}@0")
    assert top[0][1] == pytest.approx(float(nodes.values[layer][unit].sum()))
    heads, ours = [h for h, _ in top], torch.tensor([v for _, v in top])
    true = patch_heads(nodes, METRIC, heads, batch_size=6)  # 3 heads a pass: the last pass has 2
    assert (ours - true).norm() < 0.02 * true.norm()
    for head in heads[:2] + heads[-1:]:  # the batched passes against one Patch at a time
        with InterventionSet([Patch(head, cache_run(handle, corrupt, head))]).applied(handle):
            alone = nodes.clean_metric - float(METRIC(forward(handle, clean), clean, None).mean())
        assert float(true[heads.index(head)]) == pytest.approx(alone, abs=1e-5)

    model, handle = spliced_everywhere(exact=(1,))
    nodes = attribute(handle, clean, METRIC, baseline="zero")
    true = patch_heads(nodes, METRIC, ["L1.A2", "L2.H5"])
    with InterventionSet([Ablate("L1.A2")]).applied(handle):  # zero baseline: patching is ablating
        alone = nodes.clean_metric - float(METRIC(forward(handle, clean), clean, None).mean())
    assert float(true[0]) == pytest.approx(alone, abs=1e-5)
    with pytest.raises(LorsaSurgeryError, match="no node"):
        patch_heads(nodes, METRIC, ["L1.H3"])


def test_freezing_which_heads_fire_takes_the_top_k_jumps_out_of_patching():
    model, handle = spliced_everywhere(topk=True)
    texts = prompts(4)
    nodes = attribute(handle, torch.cat(texts[:2]), METRIC, torch.cat(texts[2:]))
    top = nodes.top_heads(30)
    heads, ours = [h for h, _ in top], torch.tensor([v for _, v in top])
    patched, frozen = patch_heads(nodes, METRIC, heads), patch_heads(nodes, METRIC, heads, freeze=True)
    assert (ours - patched).norm() > 0.25 * patched.norm()  # heads of later layers switch on and off
    assert (ours - frozen).norm() < 0.1 * frozen.norm()
    last = [i for i, head in enumerate(heads) if head.startswith("L2.")]  # nothing fires after the last layer
    assert last and torch.allclose(patched[last], frozen[last], atol=1e-6)


# ---- edges against path patching -------------------------------------------------------------------------------


@pytest.mark.parametrize("mlps", ["direct", "linearised"])
def test_edges_of_each_kind_are_path_patching_to_first_order(mlps):
    model, handle = spliced_everywhere(scale=0.05, dtype=torch.float64)  # the weakest edges move activations by 1e-7
    clean, corrupt = prompts()
    nodes = attribute(handle, clean, METRIC, corrupt)
    edges = attribute_edges(nodes, top=6, mlps=mlps)
    assert len(edges.targets) == 6 and all(not key.startswith("L0.") for key in edges.targets)
    weights = edges.weights()
    for kind in ("q", "k", "v"):
        strongest = sorted((key for key in weights if key[2] == kind), key=lambda key: -abs(weights[key]))[:3]
        assert strongest, kind
        for key in strongest:
            assert path_patch(nodes, METRIC, *key, mlps=mlps) == pytest.approx(weights[key], rel=0.05), key
    # A query at position 0 sees one key: its pattern cannot move, so nothing reaches it through Q or K.
    fired = nodes.run.clean[1][0, 0].nonzero().flatten()[:3].tolist()
    first = attribute_edges(nodes, [f"L1.H{h}@0" for h in fired], mlps=mlps)
    assert set(first.kind.tolist()) <= {2} and len(first.weight)


@pytest.mark.parametrize("mlps", ["direct", "linearised"])
def test_path_patching_a_batch_is_the_mean_of_its_rows(mlps):
    model, handle = spliced_everywhere(scale=0.05, dtype=torch.float64)
    texts = prompts(4)
    rows = [attribute(handle, texts[b], METRIC, texts[b + 2]) for b in range(2)]
    batch = attribute(handle, torch.cat(texts[:2]), METRIC, torch.cat(texts[2:]))
    weights = attribute_edges(batch, top=4, mlps=mlps).weights()
    for kind in ("q", "k", "v"):
        key = max((key for key in weights if key[2] == kind), key=lambda key: abs(weights[key]))
        together = path_patch(batch, METRIC, *key, mlps=mlps)
        assert together == pytest.approx(sum(path_patch(nodes, METRIC, *key, mlps=mlps) for nodes in rows) / 2, rel=1e-6)
        assert together == pytest.approx(weights[key], rel=0.05), key
    with pytest.raises(LorsaSurgeryError, match="not in a layer below"):
        path_patch(batch, METRIC, key[1], key[0], "v")


def test_path_patching_with_firing_frozen_is_the_edge_under_top_k():
    model, handle = spliced_everywhere(scale=0.05, topk=True, dtype=torch.float64)
    clean, corrupt = prompts()
    nodes = attribute(handle, clean, METRIC, corrupt)
    weights = attribute_edges(nodes, top=6).weights()
    for kind in ("q", "k", "v"):
        key = max((key for key in weights if key[2] == kind), key=lambda key: abs(weights[key]))
        assert path_patch(nodes, METRIC, *key, freeze=True) == pytest.approx(weights[key], rel=0.05), key


def test_the_two_treatments_of_mlps_differ_and_agree_in_rank():
    model, handle = spliced_everywhere()
    clean, corrupt = prompts()
    nodes = attribute(handle, clean, METRIC, corrupt)
    direct, linearised = (attribute_edges(nodes, top=10, mlps=mlps).weights() for mlps in ("direct", "linearised"))
    assert direct.keys() == linearised.keys()
    a, b = (torch.tensor([w[key] for key in direct]) for w in (direct, linearised))
    assert (a - b).norm() > 1e-3 * b.norm()  # the MLP between layers carries something
    assert spearman(a, b) > 0.5


# ---- the graph ---------------------------------------------------------------------------------------------------


def test_prune_keeps_the_share_asked_and_the_graph_round_trips(tmp_path):
    model, handle = spliced_everywhere()
    clean, corrupt = prompts()
    nodes = attribute(handle, clean, METRIC, corrupt)
    edges = attribute_edges(nodes, top=8)
    graph = prune(nodes, edges, 0.6, 0.7, tokenizer=char_tokenizer())
    ranked = [abs(v) for _, v in nodes.top()]
    kept = [abs(node["attribution"]) for node in graph.nodes]
    assert sum(kept) >= 0.6 * sum(ranked) > sum(kept[:-1])
    assert kept == ranked[: len(kept)]
    ids = {node["id"] for node in graph.nodes}
    between = [abs(w) for (s, t, _), w in edges.weights().items() if s in ids and t in ids]
    weights = [abs(edge["weight"]) for edge in graph.edges]
    assert graph.edges and sum(weights) >= 0.7 * sum(between) > sum(weights[:-1])
    assert {edge["kind"] for edge in graph.edges} <= {"q", "k", "v"}
    node = next(n for n in graph.nodes)
    assert node["id"] == f"{node['head']}@{node['position']}" and len(node["promoted"]) == 5
    assert graph.tokens[node["position"]] == node["token"]
    graph.save(tmp_path / "graph.json")
    assert Graph.load(tmp_path / "graph.json") == graph
    assert Graph.from_dict(json.loads(json.dumps(graph.to_dict()))) == graph
    with pytest.raises(LorsaSurgeryError, match="Not a lorsa-surgery circuit"):
        Graph.from_dict({"nodes": []})
    with pytest.raises(LorsaSurgeryError, match="node_share"):
        prune(nodes, edges, 0)


def test_faithfulness_and_necessity():
    model, handle = spliced_everywhere()
    texts = prompts(3)
    stats = head_stats(handle, texts)
    every = [f"L{layer}.H0-127" for layer in handle.layers]
    whole = faithfulness(handle, texts, every, METRIC, stats=stats)
    assert whole.share.mean == pytest.approx(1.0) and whole.share.low == pytest.approx(1.0)
    none = faithfulness(handle, texts, [], METRIC, stats=stats)
    assert none.share.mean == pytest.approx(float(none.empty.mean() / none.full.mean()))
    assert torch.allclose(none.circuit, none.empty) and none.normalised.mean == pytest.approx(0.0, abs=1e-9)
    clean, corrupt = prompts(2, seed=3)
    graph = prune(attribute(handle, clean, METRIC, corrupt), node_share=0.5)
    result = necessity(handle, texts, graph, METRIC, stats=stats)
    assert len(result.control) == len(result.heads) == len(graph.heads()) and not set(result.control) & set(result.heads)
    assert result.lost.low <= result.lost.mean <= result.lost.high
    refs = [HeadRef(1, h) for h in range(4)]
    control = matched_heads(stats, refs)
    assert all(abs(float(stats.rates[1][c.index] - stats.rates[1][r.index])) <= 0.25 for c, r in zip(control, refs))
    kept = faithfulness(handle, texts, graph, METRIC, stats=stats)
    assert kept.to_dict()["heads"] == len(graph.heads())


# ---- the command and its page ------------------------------------------------------------------------------------


def test_page_escapes_what_it_shows():
    graph = Graph("m<x>", "zero", 1.0, 0.0, ["<b>", "&"], [
        {"id": "L1.H2@0", "layer": 1, "head": "L1.H2", "position": 0, "token": "<b>", "attribution": 0.5,
         "label": "<script>alert(1)</script>", "promoted": ["</script>"]},
    ], [], 0.8, 0.8)
    page = circuit_page(graph, {"L1.H2": "scan/heads/L1.H2.html"})
    assert "<script>alert" not in page and "</script>\"" not in page and "&lt;b&gt;" in page
    assert 'href="scan/heads/L1.H2.html"' in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_cli_writes_the_graph_and_a_page_that_renders(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "scan" / "heads").mkdir(parents=True)
    out = tmp_path / "circuit"
    args = ["circuit", tmp_path / "model", "--lorsa", "all=from-attention", "--prompt", "The cat sat on the", "--corrupt",
            "The dog ran to the", "--token", "m", "--vs-token", "r", "--targets", "8", "--scan", tmp_path / "scan", "--out", out]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    graph = Graph.load(out / "graph.json")
    assert graph.nodes and graph.edges and graph.tokens[:3] == ["T", "h", "e"]
    assert all(node["head"].split(".")[1].startswith("A") for node in graph.nodes)  # exact copies: MHSA heads
    assert graph.verification["faithfulness"]["prompts"] == 1
    assert "every head" in graph.verification["necessity"]["skipped"]  # 4 MHSA heads a layer: the circuit holds them all
    page = (out / "circuit.html").read_text()
    assert "<svg" in page and graph.nodes[0]["id"] in page
    again = cli(*args)
    assert again.exit_code != 0 and "--overwrite" in again.output
    bad = cli(*args[:-1], tmp_path / "other", "--token", "mm")
    assert bad.exit_code != 0 and "exactly one token" in bad.output

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium on this machine to render the page in")
    shot = tmp_path / "circuit.png"
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}", "--window-size=1200,800",
                    (out / "circuit.html").as_uri()], capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    pixels = torch.tensor(list(Image.open(shot).convert("L").tobytes()), dtype=torch.float32)
    assert pixels.std() > 10  # not a blank page
