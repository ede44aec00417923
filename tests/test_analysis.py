"""Head analysis: corpus scans, z-patterns, direct logit attribution, plots, the HTML dashboard in headless
Chromium, and the `heads` commands."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.analysis.attribution import logit_attribution, token_text, z_pattern
from lorsa_surgery.analysis.plots import plot_logit_attribution, plot_sweep, plot_z_pattern
from lorsa_surgery.analysis.scan import mean_activations, scan_heads
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Recorder
from lorsa_surgery.interventions.patching import Loss, sweep
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy
from test_interventions import char_tokenizer, cli, spliced, tiny_folders
from test_splice import tiny


def windows_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g) for n in lengths]


@torch.no_grad()
def test_scan_matches_one_window_at_a_time():
    model, handle = spliced()
    windows = windows_of([12, 7, 12, 3, 10])
    scans = scan_heads(model, windows, "L1.H0-2,L1:five", k=4, context=(2, 1), batch_size=2, progress=False)
    acts = []
    for w in windows:
        with Recorder(model, "L1.H0-2,L1.H5") as rec:
            model(w[None])
        acts.append(rec.activations()[0])
    every = torch.cat(acts)  # [tokens, 4]
    for j, ref in enumerate(["L1.H0", "L1.H1", "L1.H2", "L1.H5"]):
        scan = scans[ref]
        column = every[:, j]
        assert scan.stats.tokens == 44 and scan.stats.fired == int((column != 0).sum())
        assert scan.stats.mean == pytest.approx(float(column.mean()), rel=1e-5)
        assert scan.stats.max == pytest.approx(float(column.max()))
        fired = column[column != 0]
        assert [t.value for t in scan.top] == pytest.approx(fired.sort(descending=True).values[:4].tolist())
        for t in scan.top:
            w = windows[t.window]
            lo = max(0, t.position - 2)
            assert t.tokens == w[lo : t.position + 2].tolist() and t.tokens[t.focus] == int(w[t.position])
            assert t.acts == pytest.approx(acts[t.window][lo : t.position + 2, j].tolist())
    assert scans["L1.H5"].name == "L1.H5 (five)"
    means = mean_activations(model, windows, "L1.H0-2", batch_size=3, progress=False)
    assert means == pytest.approx(dict(zip(("L1.H0", "L1.H1", "L1.H2"), every[:, :3].mean(0).tolist())), rel=1e-5)
    with InterventionSet([Ablate("L1.H0-2", how="mean", means=means)]).applied(model), Recorder(model, "L1.H1") as rec:
        model(windows[0][None])
    assert torch.allclose(rec.activations("L1.H1"), torch.full((1, 12), means["L1.H1"]))


@torch.no_grad()
def test_z_pattern_sums_to_the_pre_activation_and_ignores_padding():
    model = tiny("llama")
    with splice(model, {1: exact_copy(model, 1)}):  # relu heads: activation = relu(z), exactly
        ids = torch.randint(3, 97, (1, 9))
        zp = z_pattern(model, "L1.H40", ids, position=[6])
        assert zp.positions == [6] and zp.contributions.shape == (1, 9)
        assert torch.all(zp.contributions[0, 7:] == 0)  # causal: later tokens feed nothing
        assert torch.allclose(zp.activation, zp.z.relu(), atol=1e-6)
        pair = z_pattern(model, "L1.H56", ids, 6)  # MHSA head 1, dim 8: H40 = +v, H56 = -v
        assert torch.allclose(pair.z, -zp.z, atol=1e-6) and torch.allclose(pair.activation, (-zp.z).relu(), atol=1e-6)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], 1).long()
        shifted = z_pattern(model, "L1.H40", padded, 9, attention_mask=mask)
        assert torch.allclose(shifted.contributions[0, 3:], zp.contributions[0], atol=1e-5)
        with pytest.raises(LorsaSurgeryError, match="names 2 heads"):
            z_pattern(model, "L1.H1-2", ids)


@torch.no_grad()
def test_logit_attribution_by_hand():
    for family in ("llama", "gpt2"):  # RMSNorm gain; LayerNorm centring and gain
        model = tiny(family)
        lorsa = exact_copy(model, 1)
        with splice(model, {1: lorsa}):
            attribution = logit_attribution(model, "L1.H7", k=3)
        direction = lorsa.W_O[7]
        norm = model.model.norm if family == "llama" else model.transformer.ln_f
        if family == "gpt2":
            direction = direction - direction.mean()
        scores = model.get_output_embeddings().weight @ (direction * norm.weight)
        assert [t for t, _ in attribution.promoted] == scores.topk(3).indices.tolist()
        assert [v for _, v in attribution.suppressed] == pytest.approx((-scores).topk(3).values.neg().tolist(), rel=1e-5)


def test_plots_are_written(tmp_path):
    from matplotlib.image import imread

    model, handle = spliced()
    tok = char_tokenizer()
    ids = tok("The cat sat on the mat", return_tensors="pt").input_ids
    paths = [
        plot_z_pattern(z_pattern(model, "L1.H5", ids, -1), tok, tmp_path / "z.png"),
        plot_sweep(sweep(model, ids, "L1.H0-3", Loss(), positions=[0, 5, 10], progress=False), tmp_path / "sweep.png"),
        plot_logit_attribution(logit_attribution(model, "L1.H5"), tok, tmp_path / "dla.png"),
    ]
    for path in paths:
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 0.05


# ---- the pages, rendered by a real browser --------------------------------------------------------------------------


class _Dom(HTMLParser):
    """Collects what the page tests look at in a dumped DOM: examples, token rows, sections, table rows, images."""

    def __init__(self):
        super().__init__()
        self.examples, self.rows, self.sections, self.table, self.svgs, self.ids = [], [], [], [], 0, set()
        self._row = self._cell = None
        self._h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class", "").split()
        self.ids.add(a.get("id"))
        if "example" in classes:
            self.examples.append({"value": float(a["data-value"]), "rows": {}})
        elif "tokens" in classes:
            self._row = []
            self.examples[-1]["rows"]["acts" if "acts" in classes else "srcs"] = self._row
        elif tag == "span" and self._row is not None:
            self._row.append({"focus": "focus" in classes, "classes": classes, "text": ""})
        elif tag == "h2":
            self._h2 = True
            self.sections.append("")
        elif tag == "tr":
            self.table.append([])
        elif tag == "td":
            self._cell = ""
        elif tag == "svg":
            self.svgs += 1

    def handle_endtag(self, tag):
        if tag == "div":
            self._row = None
        elif tag == "h2":
            self._h2 = False
        elif tag == "td":
            self.table[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._row:
            self._row[-1]["text"] += data
        if self._h2:
            self.sections[-1] += data
        if self._cell is not None:
            self._cell += data


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]


def _chromium(tmp_path, url: str, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console  # the pages run without a console error
    return done


def _shade(classes: list[str]) -> int:
    """The highlight level of a token span (p3: positive, level 3 of 10; n3 negative), 0 for none."""
    return next((int(c[1:]) for c in classes if c[0] in "pn" and c[1:].isdigit()), 0)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for headless rendering (apt-get install -y chromium)")
def test_index_and_head_pages_render_in_headless_chromium(tmp_path):
    from lorsa_surgery.host.metrics import document_windows
    from lorsa_surgery.analysis.pages import AFTER, BEFORE, write_site
    from lorsa_surgery.analysis.scan import scan

    model, handle = spliced()
    handle.modules()[1].catalog[5]["note"] = '<img src=x onerror="alert(1)"> a test head'
    tok = char_tokenizer()
    texts = ["if a<b && c>d: print('<script>alert(1)</script>')\n" * 4, "The cat sat on the mat. " * 12, "Mary and John. " * 9]
    store = scan(handle, list(document_windows(tok, texts, 96)), 1, progress=False)
    index = write_site([store], tok, tmp_path / "site")
    column = store.column(5)
    dumped = _chromium(tmp_path, (tmp_path / "site" / "heads" / "L1.H5.html").as_uri(), "--dump-dom").stdout
    dom = _Dom()
    dom.feed(dumped)
    assert "<title>L1.H5 (five) - lorsa-surgery</title>" in dumped and "a test head" in dumped
    assert "<img" not in dumped and "&lt;img" in dumped and "<script>alert" not in dumped  # data stays text
    assert {"histogram", "dla", "qk-group", "firing"} <= dom.ids and dom.svgs >= 2
    examples = store.examples(column)
    assert [e["value"] for e in dom.examples] == pytest.approx([e["value"] for e in examples])
    bands = {e["kind"] for e in examples}
    assert dom.sections[0] == "Strongest activations" and len(dom.sections) == len(bands) and 0 in bands and len(bands) > 1
    assert f"of document {examples[0]['doc']}" in dumped
    for shown, ex in zip(dom.examples, examples):
        acts, srcs = shown["rows"]["acts"], shown["rows"]["srcs"]
        ids = store.window(ex["window"]).tolist()
        lo = [t["focus"] for t in acts].index(True)
        lo = ex["position"] - lo  # where the shown context starts
        assert len(acts) == min(BEFORE + AFTER + 1, len(ids)) >= min(64, len(ids)) and len(srcs) == len(acts)
        assert [t["text"] for t in acts] == [token_text(tok, i) for i in ids[lo : lo + len(acts)]]
        contributions = ex["contributions"][lo : lo + len(srcs)]
        strongest = int(contributions.abs().argmax())
        assert _shade(srcs[strongest]["classes"]) == 10  # the strongest source is highlighted fully
        biggest = float(contributions.abs().max())
        assert [_shade(t["classes"]) > 0 for t in srcs] == [abs(c) >= 0.05 * biggest for c in contributions.tolist()]
        assert any(c.startswith("u") for t in srcs for c in t["classes"])  # the QK group's attention underlines sources
        acts_values = [store.entry_value[(store.entry_window == ex["window"]) & (store.entry_position == lo + j)
                                         & (store.entry_column == column)] for j in range(len(acts))]
        assert [bool(len(v)) for v in acts_values] == [_shade(t["classes"]) > 0 for t in acts]  # shaded where it fired
    shot = tmp_path / "head.png"
    _chromium(tmp_path, (tmp_path / "site" / "heads" / "L1.H5.html").as_uri(), f"--screenshot={shot}", "--window-size=1100,1600")
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    orange = (abs(pixels[..., 0] - 224 / 255) < 0.03) & (abs(pixels[..., 1] - 123 / 255) < 0.03) & (abs(pixels[..., 2]) < 0.03)
    assert orange.sum() > 200  # histogram, DLA and token highlights were painted

    sorted_dom = _Dom()
    sorted_dom.feed(_chromium(tmp_path, index.as_uri() + "#sort=firing", "--dump-dom").stdout)
    rows = [r for r in sorted_dom.table if r]
    assert len(rows) == len(store.heads) and rows[0][0].startswith("L1.H")
    rates = [float(r[2]) for r in rows]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]  # the script sorted by firing rate
    _chromium(tmp_path, index.as_uri(), f"--screenshot={tmp_path / 'index.png'}", "--window-size=1100,900")
    assert (tmp_path / "index.png").stat().st_size > 10_000
    shutil.copy(shot, tmp_path / "site" / "head.png")


# ---- the heads commands --------------------------------------------------------------------------------------------


def handle_of(model_dir, lorsa_dir):
    from lorsa_surgery.host.models import load_model

    model, _ = load_model(str(model_dir))
    return splice(model, {1: Lorsa.from_pretrained(lorsa_dir)})


def test_heads_commands(tmp_path):
    model_dir, lorsa_dir = tiny_folders(tmp_path)
    (tmp_path / "corpus.txt").write_text("The cat sat on the mat. The dog sat on the rug. " * 4)
    common = [model_dir, "--lorsa", f"1={lorsa_dir}"]
    scan_args = ["heads", "scan", *common, "--text", tmp_path / "corpus.txt", "-k", "3", "--out", tmp_path / "scan"]
    result = cli(*scan_args)
    assert result.exit_code == 0, result.output
    assert "layer 1: scanned 192 tokens, 128 heads" in result.output and (tmp_path / "scan" / "index.html").is_file()
    assert len(list((tmp_path / "scan" / "heads").glob("L1.H*.html"))) == 128
    again = cli(*scan_args)  # same module, same corpus: read, not scanned again
    assert again.exit_code == 0 and "layer 1: unchanged, kept" in again.output

    result = cli("heads", "top", tmp_path / "scan", "L1:five,L1.H11", "--json")
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)
    assert set(top) == {"L1.H5", "L1.H11"} and top["L1.H5"]["name"] == "L1.H5 (five)"
    assert top["L1.H5"]["stats"]["fired"] == 0 and top["L1.H5"]["top"] == []  # never in the top-K on this text
    assert top["L1.H11"]["stats"]["tokens"] == 192 and len(top["L1.H11"]["top"]) == 3
    best = top["L1.H11"]["top"][0]
    assert best["value"] == top["L1.H11"]["stats"]["max"] and len(best["text"]) == len(best["tokens"]) == 17

    result = cli("heads", "list", tmp_path / "scan", "--sort", "firing", "--min-firing", "0.5", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    rates = [r["firing_rate"] for r in listed]
    assert listed and rates == sorted(rates, reverse=True) and min(rates) >= 0.5
    assert {"label", "mean", "dead", "qk_group", "promoted_text"} <= set(listed[0])
    fives = json.loads(cli("heads", "list", tmp_path / "scan", "--label", "five", "--json").stdout)
    assert [r["head"] for r in fives] == ["L1.H5"] and fives[0]["dead"]
    firing = json.loads(cli("heads", "list", tmp_path / "scan", "--fires-on", "The cat sat", "--json").stdout)
    with Recorder(handle_of(model_dir, lorsa_dir), "L1.H0-127") as rec, torch.no_grad():
        rec.handle.model(char_tokenizer()("The cat sat", return_tensors="pt").input_ids)
    expected = {f"L1.H{h}" for h in (rec.activations() != 0).any(1)[0].nonzero()[:, 0].tolist()}
    assert {r["head"] for r in firing} == expected and 0 < len(expected) < 128

    result = cli("heads", "zpattern", *common, "L1.H5", "--prompt", "The cat sat", "--position", "-1", "--json", "--plot", tmp_path / "z.png")
    assert result.exit_code == 0, result.output
    zp = json.loads(result.stdout)
    assert zp["position"] == 10 and len(zp["sources"]) == 10 and (tmp_path / "z.png").stat().st_size > 1000

    result = cli("heads", "dashboard", tmp_path / "scan", "L1.H10-11", "--out", tmp_path / "dash")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dash" / "heads").iterdir()) == ["L1.H10.html", "L1.H11.html"]
    assert (tmp_path / "dash" / "heads" / "L1.H11.html").read_text().count('class="example"') >= 3

    result = cli("heads", "label", lorsa_dir, "L1.H6", "copy-ish", "--note", "fires on repeats")
    assert result.exit_code == 0, result.output
    assert Lorsa.from_pretrained(lorsa_dir).catalog[6] == {"label": "copy-ish", "note": "fires on repeats"}
    assert cli("heads", "label", lorsa_dir, "L1.H5", "").exit_code == 0 and 5 not in Lorsa.from_pretrained(lorsa_dir).catalog
    for bad, message in [(["L2.H5", "x"], "not 2"), (["L1.H999", "x"], "Unknown head"), (["L1:five", "x"], "not one head")]:
        result = cli("heads", "label", lorsa_dir, *bad)
        assert result.exit_code != 0 and message in result.output
