"""What lorsa-surgery keeps on a host model: one attribute, `model._lorsa`, holding a `HostState`.

Everything the toolkit has to find from the model object alone lives there, each part set and cleared by the code
that owns it:

- `base`: the base-model record `lorsa_surgery.host.models.load_model` attaches (`base_record`); splices of the
  model and exact copies of its layers record it.
- `splice`: the `Splice` of the Lorsa modules spliced into the model, set by `splice()` and cleared by `unsplice()`.
- `prompts`: the prompt tracker that every intervention set applied to the model shares (each row's prompt length,
  for prompt-relative positions), set while at least one is applied or attached (`lorsa_surgery.interventions.edits`).

The attribute appears with the first part set and goes with the last one cleared, so a model the toolkit has let go
of carries nothing of it. (While a prompt tracker is active, generate() is also wrapped on the instance; see
`edits._Prompts` for why a hook cannot do that job.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

ATTRIBUTE = "_lorsa"

Part = Literal["base", "splice", "prompts"]


@dataclass
class HostState:
    """The toolkit's state on one host model (see the module docstring)."""

    base: dict | None = None
    """The base-model record, when `load_model` loaded the model."""
    splice: Any = None
    """The `lorsa_surgery.host.splicing.Splice` in place, or None."""
    prompts: Any = None
    """The `lorsa_surgery.interventions.edits._Prompts` tracker while interventions are applied, or None."""


def get(model: Any, part: Part) -> Any:
    """One part of the model's state, or None."""
    state = model.__dict__.get(ATTRIBUTE)
    return None if state is None else getattr(state, part)


def put(model: Any, part: Part, value: Any) -> None:
    """Set (or, with None, clear) one part; the attribute is created on demand and removed once every part is None."""
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        if value is None:
            return
        state = model.__dict__[ATTRIBUTE] = HostState()
    setattr(state, part, value)
    if all(getattr(state, f.name) is None for f in fields(state)):
        del model.__dict__[ATTRIBUTE]
