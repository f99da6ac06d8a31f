"""Versioned JSON Schemas (draft 2020-12) of the Segment messages the pipeline accepts.

Files, shipped as package data next to this module:

- ``envelope.v<N>.json``: fields every message carries (ids, timestamp, context).
- ``page/page.v<N>.json``, ``identify/identify.v<N>.json``, ``alias/alias.v<N>.json``:
  what each non-track message type adds.
- ``track/<event>.v<N>.json``: one file per track event; ``title`` is the event name and
  ``<event>`` its snake-case slug (``Product Viewed`` -> ``track/product_viewed.v1.json``).

Per-event files hold no ``$ref``: the registry merges the latest envelope under each of them
in code. ``examples`` in each file is a realistic wire message; tests validate it. A new
version is a new file with ``N + 1``, and it must be backward compatible with version ``N``.
"""

from pipeline.schemas.compatibility import backward_incompatibilities
from pipeline.schemas.registry import (
    SCHEMA_DIR,
    SchemaRegistry,
    ValidationProblem,
    Validator,
    default_registry,
    slug,
)

__all__ = [
    "SCHEMA_DIR",
    "SchemaRegistry",
    "ValidationProblem",
    "Validator",
    "backward_incompatibilities",
    "default_registry",
    "slug",
]
