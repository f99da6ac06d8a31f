"""`pipeline bench --quick --json`: every figure measured, the report consistent with itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench import _http_server
from pipeline.broker import free_port
from pipeline.errors import PipelineError
from pipeline.metrics import CPU_STEPS
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--quick", "--json", "--seed", "3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)

    assert report["config"]["quick"] is True
    floor, topology, proc = report["floor"], report["topology_floor"], report["processor"]
    assert topology["events"] == floor["events"]  # the same keyed messages, both floors
    for figure in (floor, topology, proc):
        assert figure["events"] > 0
        assert figure["seconds"] > 0
        assert figure["events_per_s"] == pytest.approx(
            figure["events"] / figure["seconds"], rel=0.01
        )
    assert proc["events"] == report["config"]["events"]
    assert proc["ratio_to_floor"] == pytest.approx(
        proc["events_per_s"] / floor["events_per_s"], abs=0.001
    )
    # per CPU-second of the measuring process (the broker and the load generator apart)
    for figure in (floor, topology, proc):
        assert figure["cpu_s"] > 0
        assert figure["events_per_cpu_s"] == pytest.approx(
            figure["events"] / figure["cpu_s"], rel=0.01
        )
    assert proc["ratio_to_floor_per_cpu_s"] == pytest.approx(
        proc["events_per_cpu_s"] / floor["events_per_cpu_s"], abs=0.001
    )
    assert proc["ratio_to_topology_floor_per_cpu_s"] == pytest.approx(
        proc["events_per_cpu_s"] / topology["events_per_cpu_s"], abs=0.001
    )
    assert proc["broker_cpu_s"] > 0
    # where the processor's CPU went: each of its own steps ran, and the framework's share is
    # what the process spent beyond them; the parts add up to the total
    per_event = proc["cpu_us_per_event"]
    assert set(per_event) == {*CPU_STEPS, "framework", "total"}
    assert all(per_event[step] > 0 for step in CPU_STEPS), per_event
    assert 0 < per_event["framework"] < per_event["total"]
    assert sum(per_event[s] for s in (*CPU_STEPS, "framework")) == pytest.approx(
        per_event["total"], abs=0.5
    )
    assert per_event["total"] == pytest.approx(1e6 / proc["events_per_cpu_s"], rel=0.01)
    # the loop committed checkpoints and spent part (not all) of its wall time in them
    assert 0 < proc["checkpoint_share"] < 1
    assert 0 < proc["checkpoint_ms"] < 1000 * proc["seconds"]
    # the processor's requests to the broker by client and API, from its statistics reports
    requests = proc["requests_per_1k"]
    assert requests and all(v > 0 for v in requests.values()), requests
    assert {name.split(":")[0] for name in requests} <= {"consumer", "producer"}
    # the garbage collector's pauses in the processor, tuned as the settings say
    assert proc["gc_young_threshold"] == Settings().gc_young_threshold
    assert 0 <= proc["gc_share"] < 1 and proc["gc_longest_ms"] >= 0

    phases = report["latency"]
    assert [p["load_fraction"] for p in phases] == report["config"]["load_fractions"]
    for phase in phases:
        assert phase["offered_eps"] == pytest.approx(
            phase["load_fraction"] * proc["events_per_s"], rel=0.01
        )
        assert phase["events"] == report["config"]["phase_events"]
        assert 0 < phase["events_stored"] <= phase["events"]
        assert phase["start_ms"] <= phase["end_ms"]
        assert 0 <= phase["p50_ms"] <= phase["p95_ms"] <= phase["p99_ms"] <= phase["max_ms"]
        assert phase["processor_cpu_s_per_1k"] > 0 and phase["broker_cpu_s_per_1k"] > 0
        assert 0 < phase["checkpoint_share"] < 1 and phase["checkpoint_ms"] > 0
        assert 0 <= phase["gc_share"] < 1 and phase["gc_longest_ms"] >= 0
        achieved = phase["events"] / phase["produce_s"]
        assert phase["achieved_eps"] == pytest.approx(achieved, rel=1e-3)
        assert phase["kept_pace"] == (achieved >= 0.98 * phase["offered_eps"])

    collector = report["collector"]
    assert collector["events"] > 0 and collector["requests"] > 0
    assert collector["events"] == collector["requests"] * collector["batch"]
    assert collector["events_per_s"] > 0
    assert 0 < collector["ack_ms_p50"] <= collector["ack_ms_p99"]
    # the collector's own garbage-collector pauses under the load, read off its /metrics
    assert 0 <= collector["gc_share"] < 1 and len(collector["gc_collections"]) == 3

    api = report["api"]
    assert api["customers"] > 0
    assert api["http"]["n"] == report["config"]["api_requests"]
    assert 0 < api["http"]["p50_ms"] <= api["http"]["p99_ms"] <= api["http"]["max_ms"]
    assert 0 <= api["gc_share"] < 1 and len(api["gc_collections"]) == 3

    json_path, chart_path = Path(report["files"]["json"]), Path(report["files"]["chart"])
    assert json_path.parent == home / "bench"
    assert json.loads(json_path.read_text())["processor"] == proc
    assert "plotly" in chart_path.read_text()


def test_a_server_that_dies_at_start_up_is_reported_with_its_own_last_words() -> None:
    """The collector and API phases start real servers; one that fails says why, not just that."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    port = free_port()
    with pytest.raises(PipelineError) as caught, _http_server(["no-such-command"], port, env):
        pass
    message = str(caught.value)
    assert f"http://127.0.0.1:{port} exited with 2" in message
    assert "No such command 'no-such-command'" in message
