"""`pipeline report` parameters and paths (execution itself is in the integration tests)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from pipeline.reports import (
    ReportError,
    caller_environment,
    parameters_from_args,
    parse_value,
    path_settings,
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
    named = report_paths(Path("n/01_quickstart.ipynb"), Path("out"), date(2026, 3, 4), "big")
    assert named == (Path("out/2026-03-04/big.ipynb"), Path("out/2026-03-04/big.html"))


def test_path_settings_are_read_from_the_settings_model() -> None:
    names = path_settings()
    assert {
        "PIPELINE_HOME",
        "PIPELINE_CATALOG_PATH",
        "PIPELINE_SEGMENTS_PATH",
        "PIPELINE_SSL_CA_LOCATION",
        "PIPELINE_SYNC__CRM_CSV_PATH",
        "PIPELINE_SYNC__CRM_SQLITE_PATH",
    } <= names
    assert "PIPELINE_BROKER" not in names and "PIPELINE_LOG_LEVEL" not in names


def test_the_kernel_gets_relative_paths_made_absolute_against_the_callers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel runs in the report's folder, where a relative path would not resolve."""
    env_file = tmp_path / ".env"
    env_file.write_text("PIPELINE_CATALOG_PATH=data/catalog.csv\nPIPELINE_LOG_LEVEL=ERROR\n")
    monkeypatch.setenv("PIPELINE_SYNC__CRM_CSV_PATH", "crm/customers.csv")
    monkeypatch.setenv("PIPELINE_SEGMENTS_PATH", "/etc/segments.yaml")
    monkeypatch.setenv("PIPELINE_BROKER", "kafka:9092")
    env = caller_environment(Path("home"), env_file, cwd=tmp_path)
    assert env == {
        "PIPELINE_HOME": str(Path("home").resolve()),
        "PIPELINE_CATALOG_PATH": str(tmp_path / "data/catalog.csv"),
        "PIPELINE_LOG_LEVEL": "ERROR",
        "PIPELINE_SYNC__CRM_CSV_PATH": str(tmp_path / "crm/customers.csv"),
    }


def test_missing_notebook_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no notebook"):
        run_report(tmp_path / "missing.ipynb", {}, tmp_path / "reports")


def test_a_retry_that_fails_before_running_never_shows_the_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry of the same day and name whose kernel never starts must not export the
    earlier attempt's notebook as "how far it got"."""
    import nbformat
    import papermill

    notebook = tmp_path / "n.ipynb"
    fresh = nbformat.v4.new_notebook()
    fresh.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(fresh, notebook)
    folder = tmp_path / "reports" / "2026-03-01"
    folder.mkdir(parents=True)
    earlier = nbformat.v4.new_notebook()
    earlier.cells = [nbformat.v4.new_markdown_cell("EARLIER RUN")]
    nbformat.write(earlier, folder / "n.ipynb")
    (folder / "n.html").write_text("EARLIER RUN")

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise RuntimeError("No such kernel named python3")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    with pytest.raises(ReportError, match="RuntimeError: No such kernel") as failed:
        run_report(notebook, {}, tmp_path / "reports", date=date(2026, 3, 1))
    assert "see" not in str(failed.value)
    assert not (folder / "n.ipynb").exists() and not (folder / "n.html").exists()


@pytest.mark.parametrize("text", ["500, 1000", "50,000", "{1, 2}", "b'x'", "1j", "[(1, 2)]"])
def test_values_papermill_would_inject_as_text_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="notebook parameter"):
        parse_value(text)


def _notebook_with_parameters(path: Path, source: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(end)")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "P"}
    nbformat.write(nb, path)
    return path


def test_a_parameter_the_notebook_does_not_take_is_refused(tmp_path: Path) -> None:
    notebook = _notebook_with_parameters(tmp_path / "n.ipynb", 'events = 10\nend = ""')
    with pytest.raises(ReportError, match=r"no parameter named 'event'.*events, end"):
        run_report(notebook, {"event": 5}, tmp_path / "reports")


def test_a_dated_report_covers_the_days_up_to_its_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--date D` alone: the simulated period ends at 00:00 UTC of D + 1 (D included), so a
    retry or a backfill of D simulates the same days whenever it runs; `-p end` still wins."""
    import papermill

    notebook = _notebook_with_parameters(tmp_path / "n.ipynb", 'events = 10\nend = ""')
    seen: list[dict[str, object]] = []

    def execute(*args: object, parameters: dict[str, object], **kwargs: object) -> None:
        seen.append(dict(parameters))
        raise RuntimeError("stop here")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    for params, day in (({}, date(2026, 1, 5)), ({"end": "2025-12-01"}, date(2026, 1, 5))):
        with pytest.raises(ReportError):
            run_report(notebook, params, tmp_path / "reports", date=day)
    with pytest.raises(ReportError):
        run_report(notebook, {}, tmp_path / "reports")  # no date: the notebook's own default
    assert seen == [{"end": "2026-01-06"}, {"end": "2025-12-01"}, {}]
