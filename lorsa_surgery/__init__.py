"""lorsa-surgery: splice Lorsa (low-rank sparse attention) modules into Hugging Face causal LMs."""

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa import Lorsa, LorsaCache, LorsaConfig

__all__ = ["Lorsa", "LorsaCache", "LorsaConfig", "LorsaSurgeryError"]
