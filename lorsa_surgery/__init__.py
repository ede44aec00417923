"""lorsa-surgery: splice Lorsa (low-rank sparse attention) modules into Hugging Face causal LMs.

    import lorsa_surgery as ls

    model, tok = ls.load_model("smollm2")
    with ls.splice(model, {3: ls.Lorsa.from_pretrained("org/repo:layer_3")}, mode="exact") as handle:
        with ls.InterventionSet([ls.Ablate("L3:induction")]).applied(handle):
            model.generate(...)

Everything the README shows is reachable from here. Names are imported on first use, so `import lorsa_surgery`
stays as quick as importing torch and a command that needs only one part does not load the others.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "lorsa": ["Lorsa", "LorsaCache", "LorsaConfig"],
    "errors": ["LorsaSurgeryError"],
    "splicing": ["splice", "unsplice", "Splice", "HeadContext"],
    "arch": ["Arch", "register_arch", "exact_copy", "from_host_subspaces", "provenance"],
    "models": ["load_model", "generate_text", "base_record", "DEFAULT_MODEL"],
    "patched": ["save_patched", "load_patched", "export_full", "module_for"],
    "heads": ["HeadRef", "parse_heads", "resolve_heads"],
    "interventions": ["Ablate", "Steer", "Patch", "InterventionSet", "Recorder", "HeadCache"],
    "patching": ["cache_run", "sweep", "effect", "LogitDiff", "Probability", "Loss", "SweepResult"],
    "metrics": ["splice_report", "explained_variance", "lm_loss"],
    "training": ["train", "Trainer", "TrainConfig", "capture"],
    "corpus": ["load_texts", "python_documentation", "prose"],
    "analysis": ["scan_heads", "mean_activations", "z_pattern", "logit_attribution", "dashboard"],
    "families": ["detect", "FAMILIES"],
    "causal": ["causal_check"],
    "positional": ["head_scores", "head_geometry", "classify"],
    "hub": ["push_folder", "pull"],
    "placement": ["infer_device_map", "input_device"],
    "healing": ["heal", "HealConfig", "add_lora", "load_adapter"],
    "demo": ["run_demo"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lorsa_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lorsa_surgery.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
