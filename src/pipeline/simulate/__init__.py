"""Deterministic fashion-retail traffic with ground truth, for tests, notebooks and demos.

``simulate(SimulationConfig(events, end=...), load_catalog())`` returns raw Segment-spec
messages in delivery order (with duplicates, malformed and late ones) and what is true about them.
"""

from pipeline.simulate.model import (
    MALFORMED_REASONS,
    MAX_EVENT_BYTES,
    Device,
    GroundTruth,
    MalformedReason,
    MessageKind,
    PriceBand,
    RawMessage,
    Simulation,
    SimulationConfig,
    TrueCustomer,
    TruePreferences,
    default_end,
    end_of,
)
from pipeline.simulate.population import price_bands
from pipeline.simulate.retail import simulate

__all__ = [
    "MALFORMED_REASONS",
    "MAX_EVENT_BYTES",
    "Device",
    "GroundTruth",
    "MalformedReason",
    "MessageKind",
    "PriceBand",
    "RawMessage",
    "Simulation",
    "SimulationConfig",
    "TrueCustomer",
    "TruePreferences",
    "default_end",
    "end_of",
    "price_bands",
    "simulate",
]
