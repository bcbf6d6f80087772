"""Prometheus text exposition format 0.0.4, written from plain values (sans-io).

A `Family` is one metric: name, type, help and its samples (label set → value). `render`
turns families into the text a Prometheus server scrapes. Label values may come from
peers (an error code, a model name), so they are escaped and cut to
`MAX_LABEL_VALUE_CHARS`; names are checked against the format's grammar.

Not verified here: that a counter only grows (the caller reads monotonic counters), and
that label cardinality stays bounded (the caller only labels with bounded sets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Label values are codes and names; a longer one is peer junk and is cut, not exported whole.
MAX_LABEL_VALUE_CHARS = 64
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: tuple[tuple[tuple[tuple[str, str], ...], float], ...] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"bad metric name {self.name!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        for labels, _ in self.samples:
            for key, _value in labels:
                if not _LABEL.match(key) or key.startswith("__"):
                    raise ValueError(f"bad label name {key!r} in {self.name}")


def family(
    name: str,
    kind: Kind,
    help_text: str,
    value: float | None = None,
    *,
    by: str | None = None,
    values: Mapping[str, float] | None = None,
) -> Family:
    """One unlabelled sample (`value`), or one sample per key of `values` labelled `by`."""
    samples: list[tuple[tuple[tuple[str, str], ...], float]] = []
    if value is not None:
        samples.append(((), float(value)))
    if values is not None:
        if by is None:
            raise ValueError("labelled values need the label name (by=...)")
        for key in sorted(values):
            samples.append((((by, key),), float(values[key])))
    return Family(name, kind, help_text, tuple(samples))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    text = text[:MAX_LABEL_VALUE_CHARS]
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family], common: Mapping[str, str] | None = None) -> str:
    """The exposition text; `common` labels (e.g. role) are added to every sample."""
    base = tuple(sorted((common or {}).items()))
    lines: list[str] = []
    seen: set[str] = set()
    for fam in families:
        if fam.name in seen:
            raise ValueError(f"metric {fam.name} given twice")
        seen.add(fam.name)
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            pairs = base + labels
            text = ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs)
            lines.append(f"{fam.name}{{{text}}} {_number(value)}" if text
                         else f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"
