"""Model cards for patched models, rendered from the Jinja template in model_cards/ with every interpolated value
escaped, and read back through huggingface_hub's ModelCard."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData
from markupsafe import Markup

from lorsa_surgery.lorsa.model import Lorsa

TEMPLATE = "patched_model.md"

# Written as entities, characters that could open HTML, a link or image, a code span or an entity, or end a table
# cell read the same on the Hub and stay inert; a line break would end a table row.
_INERT = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;", "`": "&#96;", "|": "&#124;",
                        "\\": "&#92;", "\r": " ", "\n": " "})


def escape(value: Any) -> str:
    """Card text from labels, notes, names and metrics, made inert for Markdown and HTML and kept on one line. The
    template passes every value it interpolates through this, except what is wrapped in Markup: the YAML header and
    the fenced JSON, which are shown as written."""
    return value if isinstance(value, Markup) else str(value).translate(_INERT)


def hub_id(base: dict[str, Any]) -> str | None:
    """The Hub repo a base record names: a Hub base's id, or the upstream repo of the embedded default. None for a
    local file or folder, whose name is no Hub id (a link would point at a stranger's page of that name)."""
    if "hub_id" in base:
        return base["hub_id"]
    if "revision" in base and "sha256" not in base and "fingerprint" not in base:
        return base["id"]
    return None


def _sparsity(lorsa: Lorsa) -> str:
    c = lorsa.cfg
    return f"top-{c.top_k}" if c.act_fn == "topk" else c.act_fn


def render(root: dict[str, Any], modules: dict[int, Lorsa], interventions=None, repo_id: str | None = None) -> str:
    """The README.md of a patched model: YAML metadata plus layer table, metrics, heads and usage."""
    base = root["base_model"]
    on_hub = hub_id(base)
    base_id = on_hub or base["id"]
    metrics = root.get("metrics") or {}
    layer_metrics = metrics.get("layers", {})
    card_data = ModelCardData(
        library_name="lorsa-surgery",
        base_model=on_hub,
        base_model_relation="adapter",
        license=base.get("license"),
        tags=["lorsa", "interpretability", "sparse-attention", "lorsa-surgery"],
        datasets=metrics.get("datasets"),
    )
    layers = []
    notable = []
    for layer, lorsa in sorted(modules.items()):
        c = lorsa.cfg
        entry = root["layers"][str(layer)]
        ev = layer_metrics.get(str(layer), layer_metrics.get(layer, {})).get("explained_variance")
        layers.append({
            "layer": layer, "site": entry.get("hook_point_out", ""), "hf_module": entry.get("hf_module", ""),
            "heads": c.n_ov_heads, "qk": f"{c.n_qk_heads} x {c.d_qk_head}", "sparsity": _sparsity(lorsa),
            "input_space": c.input_space, "ev": "-" if ev is None else f"{ev:.4f}",
        })
        for head, info in sorted(lorsa.catalog.items()):
            notable.append({"ref": f"L{layer}.H{head}", "label": info.get("label", ""), "note": info.get("note", ""),
                            "layer": layer})
    # A detected catalog holds hundreds of heads: the card leads with one row per label.
    counts = Counter((h["layer"], h["label"]) for h in notable if h["label"])
    labels = [{"label": label, "count": n, "selector": f"L{layer}:{label}"}
              for (layer, label), n in sorted(counts.items(), key=lambda item: (item[0][0], -item[1], item[0][1]))]
    training = [(layer, lorsa.training_info) for layer, lorsa in sorted(modules.items()) if lorsa.training_info]
    template = resources.files("lorsa_surgery.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    # Not ModelCard.from_template: its plain jinja2.Template has no hook to escape what it interpolates.
    text = jinja2.Environment(finalize=escape).from_string(template).render(
        card_data=Markup(card_data.to_yaml()),
        title=f"{base_id} with Lorsa at layer{'s' if len(modules) != 1 else ''} {', '.join(map(str, sorted(modules)))}",
        base_id=base_id,
        base_link=f"https://huggingface.co/{on_hub}" if on_hub else None,
        n_layers=len(modules),
        mode=root["mode"],
        layers=layers,
        lm_loss=metrics.get("lm_loss"),
        tokens=metrics.get("tokens"),
        text_source=metrics.get("text_source"),
        training=training,
        notable=notable,
        labels=labels,
        # In a fenced block, where no line of indented JSON can start a closing fence.
        interventions=Markup(json.dumps(interventions.to_dict(), indent=2)) if interventions is not None else None,
        adapter=root.get("adapter"),
        healing=metrics.get("healing"),
        replacement=metrics.get("replacement"),
        repo_hint=repo_id or "NAMESPACE/REPO",
        base_revision=base.get("revision"),
        base_file=base.get("file"),
        base_sha256=base.get("sha256"),
        base_fingerprint=base.get("fingerprint"),
    )
    # Optional sections leave blank lines behind; one blank line between blocks is enough.
    return re.sub(r"\n{3,}", "\n\n", str(ModelCard(text)))
