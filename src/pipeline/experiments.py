"""Driving the real pipeline from notebooks: one simulated run, or paced offered-load phases.

Both run the processor in this process against ``Run``'s broker, like ``pipeline demo``, and
show one tqdm progress bar (plain text, so it also reads well in executed notebooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm import tqdm

from pipeline.loadgen import LoadGenerator, wire_messages
from pipeline.metrics import StreamMetrics, wait_drained
from pipeline.runner import Run, process_until_idle, produce_messages, summarize
from pipeline.simulate import RawMessage, Simulation, SimulationConfig, default_end, simulate

PROGRESS_INTERVAL_S = 0.5
"""Seconds between progress bar redraws: keeps executed notebooks small."""


def _bar(total: int, desc: str, *, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="msg", disable=not enabled, mininterval=PROGRESS_INTERVAL_S
    )


def run_simulation(
    run: Run,
    sim: Simulation,
    *,
    rate: float | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Produce ``sim``'s messages (paced at ``rate`` msg/s if given), process them all, and
    return the run summary next to the simulator's ground truth (``runner.summarize``)."""
    total = len(sim.messages)
    processed = _bar(total, "processed", enabled=progress)
    produce_s: list[float] = []

    def feed() -> None:
        produce_s.append(produce_messages(run.settings, run.address, sim.messages, rate=rate))

    def tick(m: StreamMetrics) -> None:
        processed.update(m.raw_in - processed.n)

    try:
        process_until_idle(run, expected_raw=total, feed=feed, on_tick=tick, timeout_s=timeout_s)
    finally:
        processed.close()
    return summarize(run, sim, produce_s=produce_s[0] if produce_s else float("nan"))


@dataclass(frozen=True)
class LoadPhase:
    """One offered load: its rate, the message ids it sent and how long producing took."""

    phase: int
    offered_rate: float
    messages: int
    message_ids: frozenset[str]
    produce_s: float


def run_load_phases(
    run: Run,
    rates: Sequence[float],
    seconds: float,
    *,
    seed: int = 42,
    warmup: int = 200,
    timeout_s: float = 600.0,
    progress: bool = True,
) -> list[LoadPhase]:
    """Send ``rate * seconds`` messages at each rate in turn through one processor run.

    A warm-up batch goes first and is waited for, so the consumer group's first assignment is
    not counted as latency of the first phase. Each phase uses seed ``seed + phase + 1``.
    """
    end = default_end()
    warm = simulate(SimulationConfig(events=max(1, warmup), seed=seed, end=end), run.catalog)
    plans: list[tuple[float, list[RawMessage]]] = [
        (
            float(rate),
            simulate(
                SimulationConfig(events=max(1, round(rate * seconds)), seed=seed + i + 1, end=end),
                run.catalog,
            ).messages,
        )
        for i, rate in enumerate(rates)
    ]
    phases: list[LoadPhase] = []
    start = run.metrics.raw_in
    # paced from a process of its own with a warm producer, as remote senders would (loadgen)
    load = LoadGenerator(run.address, run.settings.home / "loadgen", topic=run.settings.topics.raw)

    def feed() -> None:
        load.offer(wire_messages(warm.messages), None)  # also warms the sender's producer
        sent = start + len(warm.messages)
        wait_drained(run.metrics, sent, timeout_s=timeout_s)
        for i, (rate, messages) in enumerate(plans):
            took = load.offer(wire_messages(messages), rate)
            sent += len(messages)
            phases.append(
                LoadPhase(
                    phase=i,
                    offered_rate=rate,
                    messages=len(messages),
                    message_ids=frozenset(m.message_id for m in messages if m.message_id),
                    produce_s=took,
                )
            )
            wait_drained(run.metrics, sent, timeout_s=timeout_s)

    total = len(warm.messages) + sum(len(m) for _, m in plans)
    bar = _bar(total, "processed", enabled=progress)

    def tick(m: StreamMetrics) -> None:
        bar.update(m.raw_in - start - bar.n)

    try:
        process_until_idle(
            run, expected_raw=start + total, feed=feed, timeout_s=timeout_s, on_tick=tick
        )
    finally:
        load.close()
        bar.close()
    return phases


def phases_frame(phases: Sequence[LoadPhase]) -> pd.DataFrame:
    """``message_id → phase, offered_rate`` for joining with the warehouse's events."""
    rows = [
        {"message_id": mid, "phase": p.phase, "offered_rate": p.offered_rate}
        for p in phases
        for mid in sorted(p.message_ids)
    ]
    return pd.DataFrame(rows, columns=["message_id", "phase", "offered_rate"])
