"""Model cards for patched models, rendered from the Jinja templates in model_cards/ through huggingface_hub."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from lorsa_surgery.lorsa import Lorsa

TEMPLATE = "patched_model.md"


def _sparsity(lorsa: Lorsa) -> str:
    c = lorsa.cfg
    return f"top-{c.top_k}" if c.act_fn == "topk" else c.act_fn


def render(root: dict[str, Any], modules: dict[int, Lorsa], interventions=None, repo_id: str | None = None) -> str:
    """The README.md of a patched model: YAML metadata plus layer table, metrics, heads and usage."""
    base = root["base_model"]
    base_id = base.get("hub_id") or base["id"]
    metrics = root.get("metrics") or {}
    layer_metrics = metrics.get("layers", {})
    card_data = ModelCardData(
        library_name="lorsa-surgery",
        base_model=base_id if "sha256" not in base or "hub_id" in base else None,
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
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        title=f"{base_id} with Lorsa at layer{'s' if len(modules) != 1 else ''} {', '.join(map(str, sorted(modules)))}",
        base_id=base_id,
        base_link=f"https://huggingface.co/{base_id}",
        n_layers=len(modules),
        mode=root["mode"],
        layers=layers,
        lm_loss=metrics.get("lm_loss"),
        tokens=metrics.get("tokens"),
        text_source=metrics.get("text_source"),
        training=training,
        notable=notable,
        labels=labels,
        interventions=json.dumps(interventions.to_dict(), indent=2) if interventions is not None else None,
        adapter=root.get("adapter"),
        healing=metrics.get("healing"),
        repo_hint=repo_id or "NAMESPACE/REPO",
        base_revision=base.get("revision"),
        base_file=base.get("file"),
        base_sha256=base.get("sha256"),
    )
    # Optional sections leave blank lines behind; one blank line between blocks is enough.
    return re.sub(r"\n{3,}", "\n\n", str(card))
