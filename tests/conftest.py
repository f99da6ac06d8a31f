"""Shared fixtures: settings isolated in a temporary data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Embedded-broker settings writing under a fresh directory; quick commits for tests."""
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    for key in ("PIPELINE_BROKER", "PIPELINE_HOME"):
        monkeypatch.delenv(key, raising=False)
    yield Settings(home=tmp_path / "home", partitions=4, commit_interval_s=0.3)
