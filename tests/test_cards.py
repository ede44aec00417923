"""Model cards: text from catalogs, metrics and names cannot inject HTML, links or table breaks, and only a base that
is on the Hub gets `base_model` metadata and a link."""

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from lorsa_surgery.interventions.edits import Ablate, InterventionSet
from lorsa_surgery.host.models import base_record
from lorsa_surgery.publishing.patched import save_patched
from lorsa_surgery.host.splicing import splice
from test_splice import LAYER, sparse_module, tiny

HOSTILE_CATALOG = {
    3: {"label": "<script>alert(1)</script>", "note": "x | y\nz"},
    7: {"label": "[a](javascript:alert(1))", "note": "<img src=x onerror=alert(1)>"},
    9: {"label": "a`|`b", "note": "one\r\ntwo ![i](javascript:alert(2)) \\| three"},
}


def _card(tmp_path: Path, base: dict, *, catalog=None, training=None, metrics=None, interventions=None) -> str:
    model = tiny("llama")
    lorsa = sparse_module(model)
    lorsa.catalog = catalog or {}
    lorsa.training_info = training
    with splice(model, {LAYER: lorsa}) as handle:
        if interventions is not None:
            interventions.attach(handle)
        out = tmp_path / f"card-{len(list(tmp_path.iterdir()))}"
        save_patched(handle, out, base=base, metrics=metrics, repo_id="ns/patched")
    return (out / "README.md").read_text(encoding="utf-8")


def _outside_fences(text: str) -> str:
    """The card without its fenced code blocks, whose content Markdown shows literally."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _assert_tables_whole(text: str) -> None:
    """Every table row has its header's number of cells, and a table ends only at a blank line."""
    width = None
    for line in _outside_fences(text).splitlines():
        if line.startswith("|"):
            cells = len(re.findall(r"(?<!\\)\|", line))
            width = width or cells
            assert cells == width, line
        else:
            assert width is None or not line.strip(), f"a table row broke onto {line!r}"
            width = None


def test_text_from_catalogs_metrics_and_names_is_inert_in_the_card(tmp_path):
    card = _card(
        tmp_path, {"id": "ns/base", "revision": None}, catalog=HOSTILE_CATALOG,
        training={"<b>steps|</b>": "10\n| x | y |", "lr": "[c](javascript:alert(3))"},
        metrics={"lm_loss": {"original": 4.0, "spliced": 4.1, "delta": 0.1}, "tokens": 64,
                 "text_source": "<script>alert(4)</script> | the\nsample", "layers": {}},
        interventions=InterventionSet([Ablate(f"L{LAYER}:<script>alert(1)</script>")]),
    )
    prose = _outside_fences(card)
    assert "<script" not in prose and "<img" not in prose and "<b>" not in prose
    assert not re.search(r"\]\(\s*javascript:", prose)
    _assert_tables_whole(card)
    # The text is still there to read, escaped.
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; | x &#124; y z |" in prose
    assert ModelCard(card).data.base_model == "ns/base"

    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(card)
    assert "<script" not in html and "<img" not in html and "javascript:" not in re.sub(r">[^<]*<", "><", html)
    for table in re.findall(r"<table>.*?</table>", html, flags=re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
        assert len({len(re.findall(r"<t[hd][ >]", row)) for row in rows}) == 1, table


def test_plain_text_is_left_as_written(tmp_path):
    card = _card(tmp_path, {"id": "ns/base", "revision": None},
                 catalog={5: {"label": "induction_attention", "note": "copies the token after an earlier match, twice."}})
    assert "| `L1.H5` | induction_attention | copies the token after an earlier match, twice. |" in card
    assert "`L1:induction_attention`" in card


def test_a_local_folder_base_is_described_in_words_without_hub_metadata_or_link(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "base")
    record = base_record(str(tmp_path / "base"))
    card = _card(tmp_path, record)
    assert ModelCard(card).data.base_model is None
    assert "huggingface.co/base" not in card and "](" not in card.split("## Layers")[0]
    assert f"the local folder `base` (fingerprint `{record['fingerprint']}`," in card


def test_a_local_file_base_has_no_link_either(tmp_path):
    card = _card(tmp_path, {"id": "model.gguf", "file": "model.gguf", "sha256": "ab" * 32})
    assert ModelCard(card).data.base_model is None and "huggingface.co" not in card
    assert f"the local file `model.gguf` (sha256 `{'ab' * 32}`)" in card


def test_the_embedded_default_names_its_upstream_hub_model(tmp_path):
    record = {"id": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "cd" * 32,
              "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    card = _card(tmp_path, record)
    assert ModelCard(card).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card
    assert f"`SmolLM2-135M-Instruct.Q4_1.gguf` (sha256 `{'cd' * 32}`)" in card


def test_healing_on_other_text_and_layers_replaced_together_are_tabled(tmp_path):
    gap = lambda kl, g: {"kl": kl, "lm_loss_gap": g, "tokens": 64}  # noqa: E731
    healing = {"trained": ["lora", "lorsa"], "tokens": 1000, "text": "docs", "before": gap(0.3, 0.2),
               "after": gap(0.1, 0.05), "ood_before": gap(0.8, 0.85), "ood_after": gap(0.2, 0.15), "ood_text": "prose"}
    rows = [{"label": "first 2 | x", "text": "prose", "original": 3.8, "replaced": 3.9, "floor": 4.8, "kl": 0.05,
             "recovered": 0.9}, {"label": "all 30", "text": "prose", "original": 3.8, "replaced": 3.8, "floor": 3.8,
                                 "kl": 0.0, "recovered": None}]
    card = _card(tmp_path, {"id": "ns/base", "revision": None},
                 metrics={"healing": healing, "replacement": {"rows": rows, "note": "Measured <b>here</b>."}})
    _assert_tables_whole(card)
    assert "| after, on prose | 0.2000 | +0.1500 |" in card
    assert "| first 2 &#124; x | prose | 3.800 | 3.900 | 4.800 | 0.050 | 90.0% |" in card
    assert "| all 30 | prose | 3.800 | 3.800 | 3.800 | 0.000 | - |" in card and "<b>" not in card
