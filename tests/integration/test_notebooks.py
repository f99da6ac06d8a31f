"""Every notebook executes headless with small parameters, is committed clean, and
`pipeline report` writes dated reports: the notebooks are the data scientists' front door."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
import papermill
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# Small values for any notebook that has the parameter; a notebook's own entry wins.
SMALL: dict[str, Any] = {"events": 1500, "days": 7}
SMALL_BY_NOTEBOOK: dict[str, dict[str, Any]] = {
    "02_case_study": {
        "customers": 150,
        "rate": 500.0,
        "warmup": 200,
        "bootstrap_resamples": 200,
        "hour_sensitivities": [0.0, 1.0],
        "preference_sensitivities": [0.0, 1.0],
    },
    "03_scoring_lab": {"affinity_half_lives": [7.0, 30.0]},
    "04_pipeline_benchmark": {"rates": [200, 400], "seconds": 1.5},
}


def small_parameters(notebook: Path, **extra: Any) -> dict[str, Any]:
    declared = papermill.inspect_notebook(str(notebook))
    params = {k: v for k, v in SMALL.items() if k in declared}
    params.update(SMALL_BY_NOTEBOOK.get(notebook.stem, {}))
    params.update(extra)
    unknown = set(params) - set(declared)
    assert not unknown, f"{notebook.name} has no parameters {unknown}"
    return params


@pytest.fixture
def pipeline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory for the kernel (it inherits the environment); no external broker."""
    home = tmp_path / "home"
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    monkeypatch.setenv("PIPELINE_COMMIT_INTERVAL_S", "0.3")
    monkeypatch.delenv("PIPELINE_BROKER", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def execute(notebook: Path, out_dir: Path, **parameters: Any) -> nbformat.NotebookNode:
    out = out_dir / notebook.name
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters=small_parameters(notebook, **parameters),
        kernel_name="python3",
        progress_bar=False,
        cwd=str(out_dir),
    )
    return nbformat.read(out, as_version=4)


def outputs(nb: nbformat.NotebookNode) -> list[dict[str, Any]]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def test_there_are_notebooks() -> None:
    assert {"01_quickstart", "03_scoring_lab", "04_pipeline_benchmark"} <= {
        n.stem for n in NOTEBOOKS
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_headless(notebook: Path, pipeline_env: Path, tmp_path: Path) -> None:
    nb = execute(notebook, tmp_path)
    outs = outputs(nb)
    assert not [o for o in outs if o["output_type"] == "error"]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outs), (
        f"{notebook.name} drew no plotly figure"
    )


@pytest.mark.timeout(300)
def test_scoring_lab_rescores_what_the_quickstart_recorded(
    pipeline_env: Path, tmp_path: Path
) -> None:
    by_stem = {n.stem: n for n in NOTEBOOKS}
    execute(by_stem["01_quickstart"], tmp_path)
    assert (pipeline_env / "warehouse.sqlite").exists()
    assert (pipeline_env / "ground_truth" / "customers.jsonl").exists()
    lab = execute(by_stem["03_scoring_lab"], tmp_path, source="warehouse")
    printed = "".join(o.get("text", "") for o in outputs(lab) if o["output_type"] == "stream")
    assert "source: warehouse" in printed
    assert "best: affinity half-life" in printed


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_parameterized(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    kernelspec = nb.metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "python3"
    assert kernelspec.get("language") == "python"
    assert nb.metadata.get("language_info", {}).get("name") == "python"

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.get("outputs") == [], f"{notebook.name}: outputs committed"
        assert cell.get("execution_count") is None, f"{notebook.name}: execution count committed"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: needs exactly one cell tagged 'parameters'"

    assignments = ast.parse(tagged[0].source).body
    assert assignments
    for stmt in assignments:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
        assert isinstance(stmt.targets[0], ast.Name)
        ast.literal_eval(stmt.value)  # plain values only: raises on anything computed

    declared = papermill.inspect_notebook(str(notebook))
    names = [s.targets[0].id for s in assignments if isinstance(s.targets[0], ast.Name)]
    assert list(declared) == names, "papermill must see every parameter"
    one_line = {
        s.targets[0].id
        for s in assignments
        if isinstance(s.targets[0], ast.Name) and s.lineno == s.end_lineno
    }
    for name, info in declared.items():
        ast.literal_eval(info["default"])
        # papermill reads the help comment of one-line assignments only
        if name in one_line:
            assert info["help"], f"{notebook.name}: parameter {name} needs a comment on its line"

    for cell in code:
        tree = ast.parse(cell.source)
        defined = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defined, f"{notebook.name}: functions belong in the pipeline package"


def _report_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_HOME"] = str(home)
    return env


def _report(
    tmp_path: Path, *args: str, timeout: float = 110, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`pipeline report ARGS` run from ``tmp_path`` as a scheduler would, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "report", *args],
        cwd=tmp_path,
        env=env if env is not None else _report_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _utc_days() -> set[str]:
    return {datetime.now(UTC).date().isoformat()}


@pytest.mark.timeout(300)
def test_pipeline_report_writes_dated_notebook_and_html(tmp_path: Path) -> None:
    notebook = REPO / "notebooks" / "03_scoring_lab.ipynb"
    days = _utc_days()
    done = _report(
        tmp_path,
        str(notebook),
        *("-p", "events", "800"),
        *("-p", "affinity_half_lives", "[7.0, 30.0]"),
        *("-p", "source", "simulation"),
        *("--output-dir", "reports"),
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    days |= _utc_days()
    folders = [tmp_path / "reports" / d for d in days if (tmp_path / "reports" / d).is_dir()]
    assert len(folders) == 1
    executed = folders[0] / "03_scoring_lab.ipynb"
    html = folders[0] / "03_scoring_lab.html"
    assert executed.is_file() and html.is_file()
    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "events = 800" in injected[0].source
    assert "affinity_half_lives = [7.0, 30.0]" in injected[0].source
    assert 'source = "simulation"' in injected[0].source
    page = html.read_text(encoding="utf-8")
    assert "Top-1 hit rate per setting" in page
    assert "Plotly.newPlot" in page, "charts are embedded in the HTML report"


@pytest.mark.timeout(120)
def test_pipeline_report_of_a_failing_run_keeps_the_html_and_exits_nonzero(
    tmp_path: Path,
) -> None:
    notebook = REPO / "notebooks" / "03_scoring_lab.ipynb"
    done = _report(tmp_path, str(notebook), "-p", "source", "nowhere")
    assert done.returncode == 2
    assert "ValueError" in done.stderr
    assert list((tmp_path / "reports").glob("*/03_scoring_lab.html"))


DATED_AND_NAMED = ("--date", "2026-03-01", "--name", "seen-run")


@pytest.mark.timeout(120)
def test_a_reports_kernel_sees_the_callers_home_and_env_file(tmp_path: Path) -> None:
    """The kernel runs in the report's folder: a relative PIPELINE_HOME and the caller's .env
    would resolve there (no warehouse found) unless the CLI hands them over."""
    notebook = tmp_path / "seen.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("label = 'x'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from pathlib import Path\n"
            "from pipeline.settings import Settings\n"
            "s = Settings()\n"
            "Path('seen.txt').write_text(f'{s.home}|{s.log_level}|{s.catalog_path}')"
        ),
    ]
    nbformat.write(nb, notebook)
    (tmp_path / ".env").write_text(
        "PIPELINE_HOME=.pipeline\nPIPELINE_LOG_LEVEL=ERROR\nPIPELINE_CATALOG_PATH=data/c.csv\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    done = _report(tmp_path, str(notebook), *DATED_AND_NAMED, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "reports" / "2026-03-01"  # the scheduler's day, e.g. Airflow's {{ ds }}
    assert (folder / "seen-run.ipynb").is_file() and (folder / "seen-run.html").is_file()
    home, level, catalog = (folder / "seen.txt").read_text().split("|")
    assert (home, level) == (str((tmp_path / ".pipeline").resolve()), "ERROR")
    assert catalog == str(tmp_path.resolve() / "data" / "c.csv")


@pytest.mark.timeout(120)
def test_a_report_whose_kernel_dies_exits_2_with_one_line_and_keeps_what_ran(
    tmp_path: Path,
) -> None:
    """A kernel killed mid-run (the out-of-memory killer on a big run) is a failed report,
    said in one line, with the cells that ran kept in the HTML."""
    notebook = tmp_path / "dies.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("events = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('ran before the kill')"),
        nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    nbformat.write(nb, notebook)
    done = _report(tmp_path, str(notebook))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "DeadKernelError" in done.stderr and "Traceback" not in done.stderr, done.stderr
    [html] = list((tmp_path / "reports").glob("*/dies.html"))
    assert "ran before the kill" in html.read_text(encoding="utf-8")
