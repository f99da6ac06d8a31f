"""`pipeline report` parameters and paths (execution itself is in the integration tests)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from pipeline.reports import (
    ReportError,
    parameters_from_args,
    parse_value,
    report_paths,
    run_report,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("0.5", 0.5),
        ("True", True),
        ("None", None),
        ("[500, 1000]", [500, 1000]),
        ("{'a': 1}", {"a": 1}),
        ("'quoted'", "quoted"),
        ("warehouse", "warehouse"),
        ("/tmp/x y", "/tmp/x y"),
        ("", ""),
    ],
)
def test_values_are_python_literals_or_raw_text(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_parameters_from_repeated_p_options() -> None:
    args = ["-p", "events", "1500", "--parameter", "rates", "[1, 2]", "-p", "events", "7"]
    assert parameters_from_args(args) == {"events": 7, "rates": [1, 2]}
    assert parameters_from_args([]) == {}


@pytest.mark.parametrize("args", [["-p", "events"], ["events", "1"], ["-p", "a", "1", "-x"]])
def test_malformed_parameters_are_refused(args: list[str]) -> None:
    with pytest.raises(ValueError):
        parameters_from_args(args)


def test_report_paths_are_dated_and_named_after_the_notebook() -> None:
    executed, html = report_paths(
        Path("notebooks/01_quickstart.ipynb"), Path("out"), date(2026, 3, 4)
    )
    assert executed == Path("out/2026-03-04/01_quickstart.ipynb")
    assert html == Path("out/2026-03-04/01_quickstart.html")


def test_missing_notebook_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no notebook"):
        run_report(tmp_path / "missing.ipynb", {}, tmp_path / "reports")
