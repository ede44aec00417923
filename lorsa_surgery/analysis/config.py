"""The settings of a head-scan export (`ExportConfig`), importable without torch so that the command line generated
from them (`lorsa-surgery heads export`) answers --help at once."""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("neuronpedia", "headvis")
"""What `export_scan` writes: Neuronpedia's import bundle, or HeadVis's per-head data tree."""


@dataclass
class ExportConfig:
    """Names the hosting site files the export under; the defaults suit a first import and can be renamed there."""

    model_id: str = ""
    """The host's id on the site ("": the scanned model's name, lower-cased, in letters, digits, - and _)."""
    source_set: str = "lorsa"
    """Neuronpedia source set; each layer's source is `<layer>-<source_set>`, as their exports name sources."""
    release: str = "lorsa-surgery"
    """Neuronpedia release the source set belongs to."""
    creator_id: str = "lorsa-surgery"
    """Neuronpedia user id recorded as creator and author (the site needs one of its users here)."""
    creator_name: str = "lorsa-surgery"
    """Creator name shown on the release and source set."""
