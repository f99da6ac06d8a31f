"""The case-study notebook measures its figures: they change with the seed, carry confidence
intervals, and the report states the behaviour model that produced them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import orjson
import papermill
import pytest

from pipeline.casestudy import SEED_CLAIMS, SEED_CLAIMS_LABEL
from pipeline.simulate import behaviour

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "02_case_study.ipynb"
SMALL: dict[str, Any] = {
    "events": 2000,
    "days": 7,
    "customers": 150,
    "rate": 500.0,
    "warmup": 200,
    "bootstrap_resamples": 300,
    "hour_sensitivities": [0.0, 1.0],
    "preference_sensitivities": [0.0, 1.0],
}


def run_notebook(folder: Path, seed: int) -> tuple[dict[str, Any], nbformat.NotebookNode]:
    """Execute the notebook into ``folder`` with an explicit results path; JSON and notebook."""
    folder.mkdir()
    results = folder / "results.json"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(folder / NOTEBOOK.name),
        parameters={**SMALL, "seed": seed, "output_json": str(results), "home": str(folder / "h")},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(folder),
    )
    data: dict[str, Any] = orjson.loads(results.read_bytes())
    return data, nbformat.read(folder / NOTEBOOK.name, as_version=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict[str, Any], Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_COMMIT_INTERVAL_S", "0.3")
        mp.delenv("PIPELINE_BROKER", raising=False)
        mp.delenv("PIPELINE_HOME", raising=False)
        root = tmp_path_factory.mktemp("case_study")
        return [run_notebook(root / f"seed{seed}", seed) for seed in (1, 2)]


def _lifts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["metric"]: row for row in data["ab_test"]["lifts"]}


@pytest.mark.timeout(300)
def test_figures_are_computed_and_change_with_the_seed(
    runs: list[tuple[dict[str, Any], Any]],
) -> None:
    (first, _), (second, _) = runs
    assert first["parameters"]["seed"] == 1 and second["parameters"]["seed"] == 2
    assert first["ab_test"] != second["ab_test"]
    assert first["sensitivity"] != second["sensitivity"]
    assert first["latency"]["by_period"] != second["latency"]["by_period"]
    for data in (first, second):
        arms = {row["arm"]: row for row in data["ab_test"]["arms"]}
        assert arms["control"]["sent"] > 0 and arms["treatment"]["sent"] > 0
        assert data["pipeline"]["events_stored"] == data["pipeline"]["events_stored_truth"]
        periods = {row["period"] for row in data["latency"]["by_period"]}
        assert periods == {"peak", "off-peak"}
        assert len(data["latency"]["peak_hours_utc"]) == 4


@pytest.mark.timeout(300)
def test_lifts_carry_confidence_intervals_and_the_seed_claims_are_labelled(
    runs: list[tuple[dict[str, Any], Any]],
) -> None:
    for data, _ in runs:
        lifts = _lifts(data)
        assert set(lifts) == {"open_rate", "ctr", "conversion_rate"}
        opens = lifts["open_rate"]
        for key in ("lift", "ci_low", "ci_high", "katz_ci_low", "katz_ci_high"):
            assert isinstance(opens[key], float), key
        assert opens["ci_low"] <= opens["lift"] <= opens["ci_high"]
        for row in lifts.values():
            assert {"ci_low", "ci_high", "katz_ci_low", "katz_ci_high"} <= set(row)
        assert lifts["ctr"]["seed_claim"] == SEED_CLAIMS["ctr"]
        assert lifts["conversion_rate"]["seed_claim"] == SEED_CLAIMS["conversion_rate"]
        assert data["seed_claims"]["label"] == SEED_CLAIMS_LABEL
        assert "bootstrap" in data["ci_method"]
        cells = {
            (c["hour_sensitivity"], c["preference_sensitivity"]): c for c in data["sensitivity"]
        }
        assert set(cells) == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}
        assert all("ctr_ci_low" in c and "conversion_rate_ci_high" in c for c in cells.values())
        # the behaviour parameters change the figures: opening tied to the hour adds lift
        assert cells[(1.0, 0.0)] != cells[(0.0, 0.0)]


@pytest.mark.timeout(300)
def test_the_report_states_the_behaviour_model(
    runs: list[tuple[dict[str, Any], Any]],
) -> None:
    doc = behaviour.__doc__
    assert doc and "P(open)" in doc and "P(click | open)" in doc
    for data, nb in runs:
        assert data["behaviour_model"] == doc
        shown = [
            o["data"]["text/markdown"]
            for cell in nb.cells
            if cell.cell_type == "code"
            for o in cell.get("outputs", [])
            if "text/markdown" in o.get("data", {})
        ]
        assert doc in shown, "the executed notebook renders the behaviour model's docstring"
        errors = [
            o
            for cell in nb.cells
            if cell.cell_type == "code"
            for o in cell.get("outputs", [])
            if o["output_type"] == "error"
        ]
        assert not errors
