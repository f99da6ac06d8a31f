"""Scheduled reports: execute a parameterized notebook with papermill into a dated folder.

``pipeline report`` (cron, Airflow) calls :func:`run_report`, which writes
``<output_root>/<YYYY-MM-DD>/<notebook name>.ipynb`` and an HTML export beside it.
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import nbformat
import papermill  # type: ignore[import-untyped]
from dotenv import dotenv_values
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError  # type: ignore[import-untyped]
from pydantic import BaseModel

from pipeline.errors import PipelineError
from pipeline.settings import Settings

KERNEL_NAME = "python3"
LANGUAGE = "python"


class ReportError(PipelineError):
    """A report notebook is missing, or a cell failed while executing it."""


@dataclass(frozen=True)
class ReportResult:
    """Where a report run wrote its executed notebook and its HTML export."""

    notebook: Path
    html: Path
    parameters: dict[str, Any]
    date: date


def parse_value(text: str) -> Any:
    """A ``-p`` value: a Python literal (number, bool, None, list, dict, string) or raw text.

    Raises ValueError for a literal papermill cannot inject as itself (a tuple, a set, bytes,
    a complex number: ``50,000`` is the tuple ``(50, 0)``), which would reach the notebook
    as its text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if not _plain(value):
        raise ValueError(
            f"{text!r} reads as a {type(value).__name__}, which a notebook parameter cannot be: "
            "write a number without separators, a list [a, b], a dict, or quote it as text"
        )
    return value


def _plain(value: Any) -> bool:
    """Whether ``value`` is a value papermill writes into a parameters cell as itself."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def parse_parameters(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``[(name, value), ...]`` from the command line as notebook parameters (last one wins)."""
    return {name: parse_value(value) for name, value in pairs}


def parameters_from_args(args: Sequence[str]) -> dict[str, Any]:
    """Parameters from ``-p NAME VALUE`` / ``--parameter NAME VALUE`` command-line words.

    Raises ValueError on any other word or a pair cut short, naming the offending word.
    """
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        flag = args[i]
        if flag not in ("-p", "--parameter"):
            raise ValueError(f"unexpected argument {flag!r}: parameters are -p NAME VALUE")
        if len(args) - i < 3:
            raise ValueError(f"{flag} needs NAME and VALUE (got {' '.join(args[i + 1 :])!r})")
        pairs.append((args[i + 1], args[i + 2]))
        i += 3
    return parse_parameters(pairs)


def declared_parameters(notebook: Path) -> list[str] | None:
    """The names the notebook's ``parameters`` cell assigns, in order; None without one
    (papermill then injects the parameters at the top, and there is nothing to check)."""
    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            names: list[str] = []
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                names.extend(t.id for t in targets if isinstance(t, ast.Name))
            return names
    return None


def report_paths(
    notebook: Path, output_root: Path, day: date, name: str | None = None
) -> tuple[Path, Path]:
    """The executed notebook's and the HTML export's paths for ``notebook`` run on ``day``,
    named ``name`` (a run with other parameters that must not replace the day's report)."""
    folder = output_root / day.isoformat()
    stem = name or notebook.stem
    return folder / f"{stem}.ipynb", folder / f"{stem}.html"


def export_html(executed: Path, html: Path) -> Path:
    """Write ``executed`` (a notebook with outputs) as a standalone HTML page."""
    node = nbformat.read(executed, as_version=4)  # type: ignore[no-untyped-call]
    body, _ = HTMLExporter().from_notebook_node(node)  # type: ignore[no-untyped-call]
    html.write_text(body, encoding="utf-8")
    return html


def path_settings() -> frozenset[str]:
    """The environment variables of every path-typed setting (``PIPELINE_HOME``,
    ``PIPELINE_CATALOG_PATH``, ``PIPELINE_SYNC__CRM_CSV_PATH``, ...), from the settings model."""

    def walk(model: type[BaseModel], prefix: str) -> Iterator[str]:
        for field, info in model.model_fields.items():
            name = f"{prefix}{field.upper()}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, f"{name}__")
            elif annotation is Path or Path in get_args(annotation):
                yield name

    return frozenset(walk(Settings, "PIPELINE_"))


def caller_environment(
    home: Path, env_file: Path = Path(".env"), *, cwd: Path | None = None
) -> dict[str, str]:
    """What a report's kernel needs to see the caller's settings: it runs in the report's
    folder, where relative paths and the caller's ``.env`` would not resolve. The home,
    absolute; the ``PIPELINE_*`` values of the ``.env`` not already set; and every relative
    path setting, from either, made absolute against ``cwd`` (the caller's directory)."""
    base = (cwd or Path.cwd()).resolve()
    env = {
        key: value
        for key, value in dotenv_values(env_file).items()
        if key.startswith("PIPELINE_") and value is not None and key not in os.environ
    }
    paths = path_settings()
    for key, value in [*os.environ.items(), *env.items()]:
        if key.upper() in paths and value and not Path(value).is_absolute():
            env[key] = str(base / value)
    env["PIPELINE_HOME"] = str(home.resolve())
    return env


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``extra`` set meanwhile (the kernel is started from it)."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_report(
    notebook: Path,
    parameters: Mapping[str, Any],
    output_root: Path,
    *,
    date: date | None = None,
    cwd: Path | None = None,
    progress_bar: bool = False,
    kernel_env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ReportResult:
    """Execute ``notebook`` with ``parameters`` (kernel python3) and export it to HTML;
    ``kernel_env`` is added to the kernel's environment (see :func:`caller_environment`).
    ``date`` names the folder (default: today in UTC), ``name`` the files (default: the
    notebook's); a second run of the same day and name replaces the first (a retry). With a
    ``date`` and no ``end`` among the parameters, a notebook that takes an ``end`` day (its
    simulated period ends at 00:00 UTC of it) gets the day after ``date``: the report filed
    under a day covers the days up to and including it, whichever day it runs (a retry, a
    backfill). A parameter the notebook does not declare is refused (a misspelt name would
    run with the default without a word).

    A failing cell still leaves the executed notebook and its HTML (showing the error) in
    place for whoever reads the report, then raises :class:`ReportError`.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise ReportError(f"report: no notebook at {notebook}")
    declared = declared_parameters(notebook)
    unknown = sorted(set(parameters) - set(declared)) if declared is not None else []
    if unknown:
        raise ReportError(
            f"report {notebook.name}: no parameter named {', '.join(map(repr, unknown))} "
            f"(it takes {', '.join(declared or ()) or 'none'})"
        )
    params = dict(parameters)
    if date is not None and declared and "end" in declared and "end" not in params:
        params["end"] = (date + timedelta(days=1)).isoformat()
    day = date or datetime.now(UTC).date()
    executed, html = report_paths(notebook, Path(output_root), day, name)
    executed.parent.mkdir(parents=True, exist_ok=True)
    for earlier in (executed, html):  # a retry: a failure must not show the earlier run's
        earlier.unlink(missing_ok=True)
    try:
        with _environment(kernel_env or {}):
            papermill.execute_notebook(
                str(notebook),
                str(executed),
                parameters=params,
                kernel_name=KERNEL_NAME,
                language=LANGUAGE,
                progress_bar=progress_bar,
                # relative outputs (a results JSON, a data directory) land beside the report
                cwd=str(cwd if cwd is not None else executed.parent),
            )
    except PapermillExecutionError as exc:
        export_html(executed, html)
        raise ReportError(
            f"report {notebook.name}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue}"
            f" (see {html})"
        ) from exc
    except Exception as exc:  # the kernel died (out of memory), a cell timed out, ...
        where = ""
        if executed.is_file():  # papermill saves after every cell: show how far it got
            with contextlib.suppress(Exception):
                where = f" (see {export_html(executed, html)})"
        raise ReportError(
            f"report {notebook.name}: the run failed with {type(exc).__name__}: {exc}{where}"
        ) from exc
    export_html(executed, html)
    return ReportResult(notebook=executed, html=html, parameters=params, date=day)
