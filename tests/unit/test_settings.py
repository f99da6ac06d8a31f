"""Loading settings: unknown or invalid values are refused in one line, a shared .env works."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigurationError
from pipeline.settings import load_settings, unknown_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in ("PIPELINE_BROKER", "PIPELINE_HOME", "PIPELINE_PARTITIONS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_a_misspelt_variable_is_refused_with_the_nearest_setting(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings ignores unknown variables: PIPELINE_BROKERS would silently run the
    embedded broker instead of the cluster."""
    assert unknown_settings({"PIPELINE_BROKERS": "k:9092", "PIPELINE_API__PORT": "1"}) == [
        "PIPELINE_BROKERS (PIPELINE_BROKER?)"
    ]
    assert unknown_settings({"pipeline_partitons": "8", "HOME": "/root"}) == [
        "pipeline_partitons (PIPELINE_PARTITIONS?)"
    ]
    clean_env.setenv("PIPELINE_BROKERS", "kafka:9092")
    with pytest.raises(ConfigurationError, match=r"PIPELINE_BROKERS \(PIPELINE_BROKER\?\)"):
        load_settings()


def test_an_invalid_value_is_one_line_naming_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PIPELINE_PARTITIONS", "abc")
    with pytest.raises(ConfigurationError, match=r"PIPELINE_PARTITIONS: .*\(got 'abc'\)"):
        load_settings()


def test_a_dotenv_shared_with_other_tools_is_read(clean_env: pytest.MonkeyPatch) -> None:
    Path(".env").write_text("GOOGLE_APPLICATION_CREDENTIALS=/x.json\nPIPELINE_PARTITIONS=8\n")
    assert load_settings().partitions == 8
    Path(".env").write_text("PIPELINE_PARTITONS=8\n")  # but a typo of ours is still refused
    with pytest.raises(ConfigurationError, match="PIPELINE_PARTITONS"):
        load_settings()
