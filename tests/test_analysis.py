"""Head analysis: corpus scans, z-patterns, direct logit attribution, plots, the HTML dashboard in headless
Chromium, and the `heads` commands."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.analysis import (
    dashboard, logit_attribution, mean_activations, plot_logit_attribution, plot_sweep, plot_z_pattern, scan_heads,
    token_text, z_pattern,
)
from lorsa_surgery.interventions import Ablate, InterventionSet, Recorder
from lorsa_surgery.patching import Loss, sweep
from lorsa_surgery.splicing import splice
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
    with splice(model, {1: Lorsa.from_attention(model, 1)}):  # relu heads: activation = relu(z), exactly
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
        lorsa = Lorsa.from_attention(model, 1)
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


# ---- the dashboard, rendered by a real browser ----------------------------------------------------------------------


class _Dom(HTMLParser):
    """Collects the token spans and z-pattern bars of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.examples, self.tokens, self.bars, self.scripts, self._tok = [], [], [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class", "").split()
        if "example" in classes:
            self.examples.append(float(a["data-value"]))
            self.tokens.append([])
            self.bars.append([])
        elif "tok" in classes:
            self._tok = {"act": float(a["data-act"]), "focus": "focus" in classes, "style": a["style"], "text": ""}
            self.tokens[-1].append(self._tok)
        elif "bar" in classes:
            self.bars[-1].append((float(a["data-contribution"]), a["style"]))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "span":
            self._tok = None

    def handle_data(self, data):
        if self._tok is not None:
            self._tok["text"] += data


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for headless rendering (apt-get install -y chromium)")
def test_dashboard_renders_in_headless_chromium(tmp_path):
    model, handle = spliced()
    handle.modules()[1].catalog[5]["note"] = '<img src=x onerror="alert(1)"> a test head'
    tok = char_tokenizer()
    text = "if a<b && c>d: print('<script>alert(1)</script>')\n" * 3
    windows = [tok(text[i : i + 40], return_tensors="pt").input_ids[0] for i in range(0, len(text) - 40, 20)]
    page = dashboard(model, tok, "L1:five", windows, tmp_path / "L1.H5.html", k=5, context=(8, 3), progress=False)
    scan = scan_heads(model, windows, "L1.H5", k=5, context=(8, 3), progress=False)["L1.H5"]
    run = lambda *extra: subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, page.as_uri()],
                                        capture_output=True, text=True, timeout=120)
    dumped = run("--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)
    scale = max(abs(a) for t in scan.top for a in t.acts)
    assert "<title>L1.H5 (five) - lorsa-surgery</title>" in dumped.stdout and "a test head" in dumped.stdout
    assert dom.scripts == 0 and "<img" not in dumped.stdout and "&lt;img" in dumped.stdout  # markup in data stays text
    assert dom.examples == pytest.approx([t.value for t in scan.top]) and len(dom.examples) == 5
    for spans, bars, example in zip(dom.tokens, dom.bars, scan.top):
        assert [s["text"] for s in spans] == [token_text(tok, t) for t in example.tokens]
        assert [s["act"] for s in spans] == pytest.approx(example.acts)
        assert [s["focus"] for s in spans].index(True) == example.focus
        alphas = [float(s["style"].rsplit(",", 1)[1].rstrip(");")) for s in spans]
        assert alphas == pytest.approx([abs(a) / scale for a in example.acts], abs=1e-3)  # colour follows activation
        widths = [float(style.split(":")[1].rstrip("%;")) for _, style in bars]
        assert 1 <= len(bars) <= 8 and max(widths) == 100.0 and widths == sorted(widths, reverse=True)

    shot = run("--screenshot=" + str(tmp_path / "shot.png"), "--window-size=1000,1400")
    assert shot.returncode == 0, shot.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(tmp_path / "shot.png")[..., :3]
    orange = (abs(pixels[..., 0] - 224 / 255) < 0.03) & (abs(pixels[..., 1] - 123 / 255) < 0.03) & (abs(pixels[..., 2]) < 0.03)
    assert orange.sum() > 200  # the z-pattern bars (and the strongest tokens) really were painted


# ---- the heads commands --------------------------------------------------------------------------------------------


def test_heads_commands(tmp_path):
    model_dir, lorsa_dir = tiny_folders(tmp_path)
    (tmp_path / "corpus.txt").write_text("The cat sat on the mat. The dog sat on the rug. " * 4)
    common = [model_dir, "--lorsa", f"1={lorsa_dir}"]
    result = cli("heads", "top", *common, "L1:five,L1.H11", "--text", tmp_path / "corpus.txt", "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)
    assert set(top) == {"L1.H5", "L1.H11"} and top["L1.H5"]["name"] == "L1.H5 (five)"
    assert top["L1.H5"]["stats"]["fired"] == 0 and top["L1.H5"]["top"] == []  # never in the top-K on this text
    assert top["L1.H11"]["stats"]["tokens"] == 192 and len(top["L1.H11"]["top"]) == 3
    best = top["L1.H11"]["top"][0]
    assert best["value"] == top["L1.H11"]["stats"]["max"] and len(best["text"]) == len(best["tokens"]) == 17

    result = cli("heads", "zpattern", *common, "L1.H5", "--prompt", "The cat sat", "--position", "-1", "--json", "--plot", tmp_path / "z.png")
    assert result.exit_code == 0, result.output
    zp = json.loads(result.stdout)
    assert zp["position"] == 10 and len(zp["sources"]) == 10 and (tmp_path / "z.png").stat().st_size > 1000

    result = cli("heads", "dashboard", *common, "L1.H10-11", "--text", tmp_path / "corpus.txt", "--out", tmp_path / "dash")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dash").iterdir()) == ["L1.H10-logits.png", "L1.H10.html", "L1.H11-logits.png", "L1.H11.html"]
    assert (tmp_path / "dash" / "L1.H11.html").read_text().count('class="example"') == 10

    result = cli("heads", "label", lorsa_dir, "L1.H6", "copy-ish", "--note", "fires on repeats")
    assert result.exit_code == 0, result.output
    assert Lorsa.from_pretrained(lorsa_dir).catalog[6] == {"label": "copy-ish", "note": "fires on repeats"}
    assert cli("heads", "label", lorsa_dir, "L1.H5", "").exit_code == 0 and 5 not in Lorsa.from_pretrained(lorsa_dir).catalog
    for bad, message in [(["L2.H5", "x"], "not 2"), (["L1.H999", "x"], "Unknown head"), (["L1:five", "x"], "not one head")]:
        result = cli("heads", "label", lorsa_dir, *bad)
        assert result.exit_code != 0 and message in result.output
