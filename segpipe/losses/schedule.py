"""Weight schedules between the regional terms and the boundary term: pure functions of the epoch.

- ``rebalance`` (Kervadec et al., MedIA 2021): ``alpha * regional + (1 - alpha) * boundary``, ``alpha`` starts at
  ``start`` (1) and drops by ``step`` (0.01) per epoch to ``floor`` (0.01).
- ``increase`` (MIDL 2019): ``regional + lam * boundary``, ``lam`` starts at ``start`` (0.01) and rises by ``step``
  (0.01) per epoch up to ``cap`` (no cap by default, as in the paper).
- ``constant``: ``regional + weight * boundary`` (``weight`` 1).

A schedule keeps no counter: ``weights(epoch)`` is all there is, so resuming needs only the epoch, and the
schedule's JSON (``to_json``) travels in the checkpoint. Parsed from the command line as
``NAME[:key=value,...]``, e.g. ``rebalance:step=0.02,floor=0.05``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from segpipe.errors import did_you_mean

__all__ = ["SCHEDULES", "Schedule", "parse_schedule"]

SCHEDULES: dict[str, dict[str, float]] = {
    "rebalance": {"start": 1.0, "step": 0.01, "floor": 0.01},
    "increase": {"start": 0.01, "step": 0.01, "cap": math.inf},
    "constant": {"weight": 1.0},
}


@dataclass(frozen=True)
class Schedule:
    name: str = "rebalance"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(
                f"schedule: unknown name '{self.name}'{did_you_mean(self.name, SCHEDULES)}; choose from {', '.join(SCHEDULES)}"
            )
        defaults = SCHEDULES[self.name]
        merged: dict[str, float] = dict(defaults)
        for key, value in dict(self.params).items():
            if key not in defaults:
                raise ValueError(
                    f"schedule '{self.name}': unknown parameter '{key}'{did_you_mean(key, defaults)}; "
                    f"its parameters are {', '.join(defaults)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"schedule '{self.name}': parameter '{key}' expected a number, got {value!r}")
            merged[key] = float(value)
        object.__setattr__(self, "params", merged)
        p = merged
        if p.get("step", 0.0) < 0:
            raise ValueError(f"schedule '{self.name}': 'step' expected a number >= 0, got {p['step']}")
        if self.name == "rebalance":
            for key in ("start", "floor"):
                if not 0.0 <= p[key] <= 1.0:
                    raise ValueError(f"schedule 'rebalance': '{key}' expected a number in [0, 1], got {p[key]}")
            if p["floor"] > p["start"]:
                raise ValueError(f"schedule 'rebalance': 'floor' ({p['floor']}) must not exceed 'start' ({p['start']})")
        if self.name == "increase":
            if p["start"] < 0:
                raise ValueError(f"schedule 'increase': 'start' expected a number >= 0, got {p['start']}")
            if p["cap"] < p["start"]:
                raise ValueError(f"schedule 'increase': 'cap' ({p['cap']}) must not be below 'start' ({p['start']})")
        if self.name == "constant" and p["weight"] < 0:
            raise ValueError(f"schedule 'constant': 'weight' expected a number >= 0, got {p['weight']}")

    def weights(self, epoch: int) -> tuple[float, float]:
        """``(regional weight, boundary weight)`` at ``epoch`` (0-based)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected a whole number >= 0, got {epoch!r}")
        p = self.params
        if self.name == "rebalance":
            alpha = max(p["start"] - p["step"] * epoch, p["floor"])
            return alpha, 1.0 - alpha
        if self.name == "increase":
            return 1.0, min(p["start"] + p["step"] * epoch, p["cap"])
        return 1.0, p["weight"]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": {k: (None if math.isinf(v) else v) for k, v in self.params.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Schedule:
        params = {k: (math.inf if v is None else v) for k, v in dict(data.get("params", {})).items()}
        return cls(str(data["name"]), params)

    def __str__(self) -> str:
        args = ",".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}:{args}"


def parse_schedule(text: str) -> Schedule:
    """``"rebalance"``, ``"increase:step=0.02,cap=1"``, ``"constant:weight=0.5"`` -> :class:`Schedule`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"schedule: expected NAME[:key=value,...] with NAME one of {', '.join(SCHEDULES)}, got {text!r}")
    name, _, rest = text.strip().partition(":")
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"schedule '{name}': expected key=value, got '{item}'")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"schedule '{name}': parameter '{key.strip()}' expected a number, got '{value}'") from None
    return Schedule(name.strip(), params)
