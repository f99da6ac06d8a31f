"""Per-event latency lineage: where an event's time went between collection and the warehouse.

Every clean event carries the time each step finished with it: the collector received it
(``collected_ms``, when it came through the collector), the broker appended it
(``ingested_ms``), stage 0 validated and enriched it (``parsed_ms``), stage 1 deduplicated and
stitched it (``stitched_ms``), stage 2 scored it into the profile (``scored_ms``) and the sink
made it readable (``stored_ms``). A step's duration is the time since the previous known
step, so it includes the wait for the previous stage's commit (the hop) as well as the work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

# (step name, the column holding the time the step finished)
STEPS: tuple[tuple[str, str], ...] = (
    ("collect", "collected_ms"),
    ("broker", "ingested_ms"),
    ("validate + enrich", "parsed_ms"),
    ("dedupe + stitch", "stitched_ms"),
    ("score + segments", "scored_ms"),
    ("store", "stored_ms"),
)
COLUMNS: tuple[str, ...] = tuple(column for _, column in STEPS)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of an event's path: when it finished and how long since the step before."""

    name: str
    at_ms: int
    duration_ms: int | None  # None for the first known step


def path(row: Mapping[str, Any]) -> list[Step]:
    """The known steps of one event (an ``events`` row or record), in pipeline order.

    Steps without a time (an event produced straight to the broker has no collect time;
    rows stored before lineage existed have only broker and store) are skipped.
    """
    steps: list[Step] = []
    previous: int | None = None
    for name, column in STEPS:
        value = row.get(column)
        if value is None or value != value:  # None or NaN (pandas)
            continue
        at = int(value)
        steps.append(Step(name, at, None if previous is None else at - previous))
        previous = at
    return steps


def durations(row: Mapping[str, Any], stored_ms: int | None = None) -> list[tuple[str, int]]:
    """(step, ms since the previous known step) for each known step after the first.

    ``stored_ms`` stands in for the row's own store time (a record on its way into the sink
    has none yet). Hot path: no objects beyond the tuples.
    """
    out: list[tuple[str, int]] = []
    previous: int | None = None
    for name, column in STEPS:
        at = stored_ms if column == "stored_ms" and stored_ms is not None else row.get(column)
        if at is None:
            continue
        if previous is not None:
            out.append((name, at - previous))
        previous = at
    return out


def total_ms(steps: Iterable[Step]) -> int | None:
    """First known step to the last: the event's end-to-end latency as far as it was traced."""
    ats = [s.at_ms for s in steps]
    return ats[-1] - ats[0] if len(ats) >= 2 else None


def step_latency(
    events: pd.DataFrame, quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> pd.DataFrame:
    """Per step, quantiles of the milliseconds spent reaching it from the step before.

    ``events`` holds the lineage columns (missing ones are treated as unknown); each row of
    the result is a step with ``n`` (events traced through it) and one column per quantile.
    """
    rows = []
    for i, (name, column) in enumerate(STEPS[1:], start=1):
        if column not in events:
            continue
        # the previous known step for each event: the nearest earlier non-null column
        before = pd.Series(float("nan"), index=events.index)
        for _, earlier in reversed(STEPS[:i]):
            if earlier in events:
                before = before.fillna(events[earlier].astype("float64"))
        spent = (events[column].astype("float64") - before).dropna()
        row: dict[str, Any] = {"step": name, "n": int(spent.size)}
        for q in quantiles:
            row[f"p{round(q * 100)}_ms"] = float(spent.quantile(q)) if spent.size else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
