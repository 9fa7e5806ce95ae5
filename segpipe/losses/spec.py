"""Loss specifications such as ``dice+boundary`` or ``0.5*ce+dice+boundary``.

Terms are joined by ``+``; each is ``NAME`` or ``WEIGHT*NAME`` with ``WEIGHT`` a plain number. No expression
is evaluated. Names: see :data:`TERMS`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from segpipe.errors import did_you_mean

__all__ = ["BOUNDARY_TERMS", "TERMS", "LossSpec", "Term", "parse_loss_spec"]

TERMS: dict[str, str] = {
    "dice": "soft Dice (foreground classes, batch dice)",
    "gdl": "generalized Dice, weights 1/(ground-truth volume)^2",
    "ce": "cross-entropy",
    "focal": "focal loss (gamma 2)",
    "bitempered": "bi-tempered logistic loss (t1 0.8, t2 1.2), robust to label noise",
    "boundary": "boundary loss on the cached signed distance maps",
}
BOUNDARY_TERMS = frozenset({"boundary"})
_NUMBER = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Term:
    name: str
    weight: float = 1.0

    @property
    def is_boundary(self) -> bool:
        return self.name in BOUNDARY_TERMS


@dataclass(frozen=True)
class LossSpec:
    terms: tuple[Term, ...]

    @property
    def regional(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if not t.is_boundary)

    @property
    def boundary(self) -> Term | None:
        return next((t for t in self.terms if t.is_boundary), None)

    def __str__(self) -> str:
        return "+".join(t.name if t.weight == 1.0 else f"{t.weight:g}*{t.name}" for t in self.terms)


def parse_loss_spec(text: str) -> LossSpec:
    """Parse ``text``; every mistake is a ``ValueError`` that says what was expected."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"loss spec: expected terms joined by '+', e.g. 'dice+boundary'; got {text!r}. Terms: {', '.join(TERMS)}")
    terms: list[Term] = []
    for raw in text.split("+"):
        part = raw.strip()
        if not part:
            raise ValueError(f"loss spec '{text}': empty term (two '+' in a row, or one at an end)")
        weight = 1.0
        if "*" in part:
            w_text, _, name = part.partition("*")
            w_text, name = w_text.strip(), name.strip()
            if not _NUMBER.match(w_text):
                raise ValueError(f"loss spec '{text}': weight '{w_text}' of term '{name}' is not a number; write e.g. 0.5*{name or 'ce'}")
            weight = float(w_text)
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"loss spec '{text}': weight of '{name}' must be a positive number, got {w_text}")
        else:
            name = part
        name = name.lower()
        if name not in TERMS:
            raise ValueError(
                f"loss spec '{text}': unknown term '{name}'{did_you_mean(name, TERMS)}; valid terms: {', '.join(TERMS)}"
            )
        if any(t.name == name for t in terms):
            raise ValueError(f"loss spec '{text}': term '{name}' appears twice; give it once with a weight instead")
        terms.append(Term(name, weight))
    return LossSpec(tuple(terms))
