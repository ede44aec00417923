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
    "lorsa.model": ["Lorsa", "LorsaCache"],
    "lorsa.config": ["LorsaConfig"],
    "errors": ["LorsaSurgeryError"],
    "host.splicing": ["splice", "unsplice", "Splice"],
    "host.hooks": ["run_with_cache", "hooks", "Cache", "HookPoint", "HeadContext"],
    "host.arch": ["Arch", "register_arch", "exact_copy", "from_host_subspaces", "provenance"],
    "host.models": ["load_model", "generate_text", "base_record", "DEFAULT_MODEL"],
    "publishing.patched": ["save_patched", "load_patched", "export_full", "module_for"],
    "interventions.heads": ["HeadRef", "parse_heads", "resolve_heads"],
    "interventions.edits": ["Ablate", "Steer", "Patch", "InterventionSet", "Recorder", "HeadCache"],
    "interventions.patching": ["cache_run", "sweep", "effect", "LogitDiff", "Probability", "Loss", "RepeatGain", "SweepResult"],
    "host.metrics": ["splice_report", "explained_variance", "lm_loss", "compare", "attention_means", "mean_ablated",
                     "loss_recovered"],
    "training.config": ["TrainConfig", "HealConfig"],
    "training.trainer": ["train", "Trainer", "capture"],
    "host.corpus": ["load_texts", "python_documentation", "prose"],
    "analysis.attribution": ["z_pattern", "logit_attribution"],
    "analysis.scan": ["scan_heads", "mean_activations"],
    "analysis.pages": ["dashboard"],
    "analysis.export": ["export_scan"],
    "analysis.families": ["detect", "FAMILIES", "ioi_pairs", "induction_pairs"],
    "analysis.causal": ["causal_check"],
    "analysis.circuits": ["attribute", "attribute_edges", "prune", "faithfulness", "necessity"],
    "multihop.positional": ["head_scores", "head_geometry", "classify"],
    "io.hub": ["push_folder", "pull"],
    "host.placement": ["infer_device_map", "input_device"],
    "training.healing": ["heal", "add_lora", "load_adapter"],
    "demo.report": ["run_demo"],
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
