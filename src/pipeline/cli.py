"""The ``pipeline`` command: demo, up, simulate, profile."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from pipeline.errors import PipelineError, ProfileNotFoundError
from pipeline.settings import Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Real-time personalization pipeline for email.",
)
console = Console(stderr=True)


def _settings(home: Path | None) -> Settings:
    return load_settings(home=home) if home is not None else load_settings()


HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Data directory (default: $PIPELINE_HOME or ./.pipeline)."),
]


@app.command()
def demo(
    events: Annotated[
        int, typer.Option("--events", "-n", min=1, help="Raw messages to simulate.")
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 42,
    rate: Annotated[
        float, typer.Option(help="Offered load in messages/s (0 = as fast as possible).", min=0)
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    home: HomeOption = None,
) -> None:
    """Simulate a fashion retailer, run it through broker, processor and stores, and summarize."""
    from pipeline.runner import (
        pipeline_run,
        process_until_idle,
        produce_messages,
        simulate_for,
        summarize,
        write_ground_truth,
    )

    settings = _settings(home)
    quiet = as_json or not sys.stderr.isatty()
    with pipeline_run(settings) as run:
        sim = simulate_for(settings, events, seed, run.catalog)
        write_ground_truth(settings, sim)
        produced = tqdm(total=events, desc="produced ", unit="msg", disable=quiet, position=0)
        processed = tqdm(total=events, desc="processed", unit="msg", disable=quiet, position=1)
        produce_s: list[float] = []

        def feed() -> None:
            produce_s.append(
                produce_messages(
                    settings,
                    run.address,
                    sim.messages,
                    rate=rate or None,
                    on_progress=produced.update,
                )
            )

        def tick(m: Any) -> None:
            processed.update(m.raw_in - processed.n)

        process_until_idle(run, expected_raw=events, feed=feed, on_tick=tick)
        produced.close()
        processed.close()
        summary = summarize(run, sim, produce_s=produce_s[0] if produce_s else float("nan"))
    summary["home"] = str(settings.home)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="pipeline demo", show_lines=False)
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("ground truth", justify="right")
    for key, value in summary.items():
        if key.endswith("_truth") or isinstance(value, dict):
            continue
        truth = summary.get(f"{key}_truth")
        table.add_row(key, str(value), "" if truth is None else str(truth))
    lat = summary["latency_ms"]
    table.add_row("latency p50/p95/p99 ms", f"{lat['p50']} / {lat['p95']} / {lat['p99']}", "")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary["dead_letters_by_reason"].items()))
    table.add_row("dead letters by reason", reasons or "-", "")
    Console().print(table)


@app.command()
def up(home: HomeOption = None) -> None:
    """Run broker (embedded unless PIPELINE_BROKER is set) and processor until Ctrl-C."""
    from pipeline.runner import pipeline_run
    from pipeline.schemas import SchemaRegistry
    from pipeline.stream.topology import build_application

    settings = _settings(home)
    with pipeline_run(settings) as run:
        console.print(
            f"[bold]pipeline up[/]: broker {run.address} "
            f"({'embedded' if settings.embedded else 'external'}), home {settings.home}\n"
            f"send traffic: PIPELINE_BROKER={run.address} pipeline simulate --events 10000\n"
            "Ctrl-C stops cleanly."
        )
        application = build_application(
            settings,
            run.address,
            catalog=run.catalog,
            registry=SchemaRegistry.load(),
            warehouse=run.warehouse,
            metrics=run.metrics,
        )
        application.run()
    console.print("stopped")


@app.command()
def simulate(
    events: Annotated[int, typer.Option("--events", "-n", min=1)] = 10_000,
    seed: Annotated[int, typer.Option()] = 42,
    rate: Annotated[float, typer.Option(min=0, help="messages/s, 0 = as fast as possible")] = 0.0,
    home: HomeOption = None,
) -> None:
    """Send simulated traffic to the broker of a running `pipeline up` (or PIPELINE_BROKER)."""
    from pipeline.catalog import load_catalog
    from pipeline.runner import BROKER_FILE, produce_messages, simulate_for

    settings = _settings(home)
    address = settings.broker
    if address is None:
        marker = settings.home / BROKER_FILE
        if not marker.exists():
            raise PipelineError("no broker: start `pipeline up` first or set PIPELINE_BROKER")
        address = json.loads(marker.read_text())["address"]
    sim = simulate_for(settings, events, seed, load_catalog(settings.catalog_path))
    with tqdm(total=events, desc="produced", unit="msg", disable=not sys.stderr.isatty()) as bar:
        seconds = produce_messages(
            settings, address, sim.messages, rate=rate or None, on_progress=bar.update
        )
    console.print(f"sent {events} messages to {address} in {seconds:.1f}s")


@app.command()
def profile(
    customer_id: Annotated[str, typer.Argument(help="Customer id (or anon:<anonymousId>).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: HomeOption = None,
) -> None:
    """Print one customer's stored profile."""
    from pipeline.stores.local import LocalWarehouse

    settings = _settings(home)
    with LocalWarehouse(settings.warehouse_path, read_only=True) as wh:
        try:
            data = wh.get_profile(customer_id)
        except ProfileNotFoundError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
    if as_json:
        typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(title=f"profile {customer_id}")
    table.add_column("field")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, str(value)[:200])
    Console().print(table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except PipelineError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
