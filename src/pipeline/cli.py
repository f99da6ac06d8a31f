"""The ``pipeline`` command: demo, up, simulate, profile."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import json
import logging
import signal
import sys
import threading
import warnings
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from pipeline.errors import PipelineError, ProfileNotFoundError, StoreError
from pipeline.events import ms_to_iso
from pipeline.settings import Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Real-time personalization pipeline for email.",
)
console = Console(stderr=True)


def _settings(home: Path | None) -> Settings:
    return load_settings(home=home) if home is not None else load_settings()


def _existing_warehouse(settings: Settings) -> Path:
    """The home's warehouse; a StoreError when there is none, so that a mistyped home in a
    scheduled erasure or retention job fails instead of reporting success on a new empty
    store it would have created."""
    if not settings.warehouse_path.is_file():
        raise StoreError(
            f"no warehouse at {settings.warehouse_path}: check --home / PIPELINE_HOME "
            "(run `pipeline up` or `pipeline demo` first)"
        )
    return settings.warehouse_path


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
        emit_triggers,
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
        emit_triggers(run)
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
def up(
    collector: Annotated[
        bool, typer.Option(help="Also serve the HTTP collector (PIPELINE_COLLECTOR__PORT).")
    ] = True,
    workbench: Annotated[
        bool, typer.Option(help="Also serve the Streamlit workbench (PIPELINE_WORKBENCH_PORT).")
    ] = True,
    api: Annotated[
        bool, typer.Option("--api/--no-api", help="Also serve the API (PIPELINE_API__PORT).")
    ] = True,
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processor replicas; above 1 each is a `pipeline process` child in one group "
            "(the embedded broker dying then stops `up` instead of restarting it).",
        ),
    ] = 1,
    triggers: Annotated[
        bool,
        typer.Option(
            "--triggers/--no-triggers",
            help="Run the trigger scan and email delivery here; --no-triggers where `pipeline "
            "follow --triggers` runs them on a copy of every partition "
            "(PIPELINE_TRIGGERS__BESIDE_PROCESSOR).",
        ),
    ] = True,
    home: HomeOption = None,
) -> None:
    """Run broker (embedded unless PIPELINE_BROKER is set), processor, collector, API and
    workbench until Ctrl-C."""
    from pipeline.runner import Run, serve

    settings = _settings(home)
    if not triggers:
        quiet = settings.triggers.model_copy(update={"beside_processor": False})
        settings = settings.model_copy(update={"triggers": quiet})
    services: list[Any] = []
    if collector:
        from pipeline.collector.server import serve_in_thread

        def start_collector(run: Run) -> Any:
            running = serve_in_thread(run.settings, run.address)
            console.print(f"collector: {running.url}/v1/batch")
            return running

        services.append(start_collector)

    def start_metrics(run: Run) -> Any:
        from pipeline.observability import start_metrics_server

        embedded = run.broker.embedded
        running = start_metrics_server(
            run.metrics,
            run.settings.metrics_host,
            run.settings.metrics_port,
            broker_pid=embedded.process.pid if embedded is not None else None,
        )
        console.print(f"metrics: {running.url}")
        return running

    services.append(start_metrics)
    if api:
        from pipeline.api.server import serve_api_in_thread

        def start_api(run: Run) -> Any:
            running = serve_api_in_thread(run.settings)
            console.print(f"api: {running.url}/docs")
            return running

        services.append(start_api)
    if workbench:

        def start_workbench(run: Run) -> Any:
            from pipeline.workbench_process import start_workbench

            stop, url = start_workbench(run.settings)
            console.print(f"workbench: {url}")
            return stop

        services.append(start_workbench)
    if replicas > 1:  # the replicas serve their own metrics, the parent has none
        from pipeline.replicas import serve_replicas

        parent_services = [s for s in services if s is not start_metrics]
        serve_replicas(settings, replicas, announce=console.print, services=parent_services)
    else:
        serve(settings, announce=lambda line: console.print(line), services=services)
    console.print("stopped")


@app.command()
def simulate(
    events: Annotated[int, typer.Option("--events", "-n", min=1)] = 10_000,
    seed: Annotated[int, typer.Option()] = 42,
    rate: Annotated[float, typer.Option(min=0, help="messages/s, 0 = as fast as possible")] = 0.0,
    via_http: Annotated[
        str | None,
        typer.Option(help="Send through a collector (e.g. http://127.0.0.1:8088), not to Kafka."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Send simulated traffic to a running `pipeline up` (Kafka, or its collector over HTTP)."""
    from pipeline.catalog import load_catalog
    from pipeline.runner import produce_messages, simulate_for

    settings = _settings(home)
    sim = simulate_for(settings, events, seed, load_catalog(settings.catalog_path))
    if via_http is not None:
        from pipeline.collector.client import send_via_http

        key = next(iter(settings.collector.write_keys.values())).get_secret_value()
        report = send_via_http(sim.messages, via_http, key)
        console.print(
            f"sent {events} messages to {via_http}: {report.accepted} accepted, "
            f"rejected by reason: {report.rejected_by_code() or 'none'}"
        )
        return
    from pipeline.broker import broker_address

    address = broker_address(settings)
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


@app.command()
def trace(
    message_id: Annotated[str, typer.Argument(help="The event's messageId.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: HomeOption = None,
) -> None:
    """Show one stored event's path (collect → broker → stages → store) with durations."""
    from pipeline.lineage import COLUMNS, path, total_ms
    from pipeline.stores.local import LocalWarehouse

    settings = _settings(home)
    with LocalWarehouse(settings.warehouse_path, read_only=True) as wh:
        rows = wh.query(
            f"SELECT customer_id, event_name, {', '.join(COLUMNS)} FROM events "
            "WHERE message_id = ?",
            (message_id,),
        )
    if rows.empty:
        console.print(f"[red]no stored event with messageId {message_id!r}[/]")
        raise typer.Exit(1)
    row = {str(k): v for k, v in rows.iloc[0].items()}
    steps = path(row)
    if as_json:
        out = {
            "message_id": message_id,
            "customer_id": row["customer_id"],
            "event": row["event_name"],
            "total_ms": total_ms(steps),
            "steps": [
                {"step": s.name, "at_ms": s.at_ms, "duration_ms": s.duration_ms} for s in steps
            ],
        }
        typer.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(
        title=f"{row['event_name']} {message_id} → {row['customer_id']} "
        f"({total_ms(steps)} ms end to end)"
    )
    table.add_column("step")
    table.add_column("finished at (UTC)")
    table.add_column("+ms", justify="right")
    for step in steps:
        at = ms_to_iso(step.at_ms)
        table.add_row(step.name, at, "" if step.duration_ms is None else f"{step.duration_ms:,}")
    Console().print(table)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Parameters: -p NAME VALUE (repeatable, as in papermill); VALUE is read as a Python "
    "literal (42, 0.5, True, [500, 1000], 'text') or else taken as raw text.",
)
def report(
    ctx: typer.Context,
    notebook: Annotated[
        Path, typer.Argument(help="Notebook to run, e.g. notebooks/01_quickstart.ipynb.")
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", help="Reports folder; a dated subfolder is made.")
    ] = Path("reports"),
    day: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            help="The report's day, naming its folder (Airflow: --date {{ ds }}); "
            "default: today in UTC.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="File name for the executed notebook and its HTML (default: the notebook's); "
            "a run of the same day and name replaces the earlier one.",
        ),
    ] = None,
) -> None:
    """Execute a notebook with papermill into OUTPUT_DIR/<YYYY-MM-DD>/ and export it as HTML."""
    from pipeline.reports import caller_environment, parameters_from_args, run_report

    try:
        parameters = parameters_from_args(ctx.args)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx) from exc
    if name is not None and (not name or Path(name).name != name or name.startswith(".")):
        raise typer.BadParameter(f"--name {name!r}: a plain file name, without folders", ctx=ctx)
    # the kernel runs in the report's folder: it gets this process's home, .env settings and
    # relative paths made absolute, and so does a relative `home` parameter of the notebook
    home = parameters.get("home")
    if isinstance(home, str) and home and not Path(home).is_absolute():
        parameters["home"] = str(Path(home).resolve())
    kernel_env = caller_environment(_settings(None).home)
    result = run_report(
        notebook,
        parameters,
        output_dir,
        date=day.date() if day is not None else None,
        kernel_env=kernel_env,
        name=name,
    )
    console.print(f"report written: {result.notebook}\n                {result.html}")


@app.command()
def collect(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default: settings, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: settings, 8088).")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Run the HTTP collector (Segment tracking API) in front of `pipeline up`'s broker."""
    from pipeline.broker import broker_address
    from pipeline.collector.server import serve

    settings = _settings(home)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        collector = settings.collector.model_copy(update=overrides)
        settings = settings.model_copy(update={"collector": collector})
    address = broker_address(settings)
    cfg = settings.collector
    console.print(
        f"[bold]pipeline collect[/]: http://{cfg.host}:{cfg.port}/v1/batch -> broker {address}, "
        f"topic {settings.topics.raw}; sources: {', '.join(sorted(cfg.write_keys)) or 'none'}"
    )
    serve(settings, address)


def _bigquery(settings: Settings) -> Any:
    """The BigQuery warehouse when enabled in settings, else None."""
    if not settings.bigquery.enabled:
        return None
    from pipeline.stores.bigquery import BigQueryWarehouse

    return BigQueryWarehouse(settings.bigquery)


@app.command()
def retention(home: HomeOption = None) -> None:
    """Delete expired raw events, dead letters and sent e-mails; set BigQuery partition expiry."""
    from datetime import UTC, datetime

    from pipeline.retention import apply_retention
    from pipeline.stores.local import LocalWarehouse

    settings = _settings(home)
    now = datetime.now(UTC)
    with LocalWarehouse(_existing_warehouse(settings)) as wh:
        deleted = apply_retention(wh, settings, now)
    console.print(f"local warehouse, rows deleted: {deleted}")
    bq = _bigquery(settings)
    if bq is not None:
        with bq:
            days = apply_retention(bq, settings, now)
            console.print(f"BigQuery partition expiration (days): {days}")


@app.command()
def forget(
    customer_id: Annotated[str, typer.Argument(help="Customer id to forget (GDPR erasure).")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Only show the rows left about the customer.")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Suppress a customer, delete them from every store and write an audit record.

    Prints the rows left about them as JSON and exits 1 when any are left or they are not
    suppressed, so a scheduled erasure job sees an incomplete one; ``--verify`` only checks.
    """
    from pipeline.gdpr import forget as forget_customer
    from pipeline.gdpr import is_suppressed, load_suppressed, verify_forgotten
    from pipeline.stores.local import LocalWarehouse

    settings = _settings(home)
    bq = _bigquery(settings)
    with LocalWarehouse(_existing_warehouse(settings)) as wh:
        if not verify:
            report = forget_customer(customer_id, settings, warehouse=wh, bigquery=bq)
            console.print(
                f"forgot {customer_id}: {report.devices} devices, deleted {report.deleted}; "
                f"processor state: {report.processor_state}"
            )
        left = verify_forgotten(customer_id, settings, warehouse=wh, bigquery=bq)
    suppressed = is_suppressed(load_suppressed(settings), customer_id=customer_id)
    typer.echo(json.dumps({"customer_id": customer_id, "suppressed": suppressed, "rows": left}))
    if any(left.values()) or not suppressed:
        if not verify:  # e.g. BigQuery rows still in the streaming buffer: run it again later
            what = "rows left" if any(left.values()) else "not suppressed"
            console.print(f"[red]{what}[/red] for {customer_id}: run `pipeline forget` again")
        raise typer.Exit(1)


@app.command("sync-crm")
def sync_crm_command(home: HomeOption = None) -> None:
    """Import new and changed CRM customers (CSV, SQLite) onto the crm.customers topic."""
    from pipeline.broker import broker_address
    from pipeline.sync import KafkaRecordProducer, sync_crm

    settings = _settings(home)
    producer = KafkaRecordProducer(settings, broker_address(settings))
    for result in sync_crm(settings, producer):
        console.print(f"{result.source}: {result.produced} records, watermark {result.watermark}")
        for problem in result.rejected:
            console.print(f"  [yellow]skipped[/yellow] {problem}")


@app.command("api")
def api(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default: settings, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: settings, 8090).")
    ] = None,
    follow: Annotated[
        bool | None,
        typer.Option(
            "--follow/--no-follow",
            help="Keep this API's own copy of the store from the processor's output topics "
            "(PIPELINE_API__FOLLOW_TOPICS; for an API that does not share the processor's home).",
        ),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Serve profiles, recommendations, send times and email previews over HTTP (FastAPI)."""
    from pipeline.api.server import serve_api

    settings = _settings(home)
    overrides = {
        k: v
        for k, v in (("host", host), ("port", port), ("follow_topics", follow))
        if v is not None
    }
    if overrides:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update=overrides)})
    cfg = settings.api
    if cfg.follow_topics:  # fail here in one line, not in the server's start-up traceback
        from pipeline.broker import broker_address

        broker_address(settings)
    console.print(
        f"[bold]pipeline api[/]: http://{cfg.host}:{cfg.port}/docs over {settings.warehouse_path}; "
        f"clients: {', '.join(sorted(cfg.api_keys)) or 'none'}"
        + ("; JWT bearer tokens accepted" if cfg.jwt.enabled else "")
        + ("; kept from the output topics" if cfg.follow_topics else "")
    )
    serve_api(settings)


@app.command()
def follow(
    seed: Annotated[
        Path | None,
        typer.Option(
            help="A snapshot (`pipeline snapshot`) to start from when there is no copy yet "
            "(PIPELINE_REPLICA_SEED): the copy then holds more than the topics retain.",
        ),
    ] = None,
    triggers: Annotated[
        bool,
        typer.Option(
            help="Also run the trigger scan and email delivery on this copy, once it has "
            "caught up: it holds every partition's profiles, where each processor replica "
            "keeps its own (run those with `up --no-triggers`).",
        ),
    ] = False,
    home: HomeOption = None,
) -> None:
    """Keep PIPELINE_HOME's serving store (the warehouse the API and workbench read) from the
    processor's output topics until Ctrl-C or SIGTERM: for a machine or pod that does not
    share the processor's home, e.g. beside the workbench in Kubernetes."""
    from pipeline.broker import broker_address
    from pipeline.runner import start_copy_scan
    from pipeline.stores.follow import follow_topics

    settings = _settings(home)
    if seed is not None:
        settings = settings.model_copy(update={"replica_seed": seed})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    follower = follow_topics(settings, settings.warehouse_path)
    console.print(f"[bold]pipeline follow[/]: keeping {settings.warehouse_path} from the topics")
    scan = (
        start_copy_scan(settings, broker_address(settings), follower.caught_up, stop)
        if triggers
        else None
    )
    try:
        reported = False
        while not stop.wait(0.5):
            if not reported and follower.caught_up.is_set():
                console.print(f"caught up: {follower.applied} records applied")
                reported = True
    finally:
        if scan is not None:
            scan.join(30)
        follower.close()
    console.print(
        f"stopped: {follower.applied} records applied, {follower.dropped} dropped, "
        f"{follower.retries} retries"
    )


@app.command()
def snapshot(
    out: Annotated[Path, typer.Argument(help="Where to write it (replaced once it is whole).")],
    home: HomeOption = None,
) -> None:
    """Write a consistent copy of PIPELINE_HOME's store (a serving replica's, with its saved
    positions, or the processor's own) for new replicas to start from (`follow --seed`)."""
    from pipeline.stores.local import LocalWarehouse

    settings = _settings(home)
    with LocalWarehouse(settings.warehouse_path, read_only=True) as wh:
        wh.snapshot(out)
        positions = len(wh.replica_positions())
    size_mb = out.stat().st_size / 2**20
    console.print(f"snapshot: {out} ({size_mb:,.1f} MB, {positions} saved topic positions)")


@app.command()
def bench(
    events: Annotated[
        int | None,
        typer.Option("--events", "-n", min=100, help="Backlog for the throughput phases."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 42,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes (tests, smoke).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    scaleout: Annotated[
        bool,
        typer.Option(
            "--scaleout",
            help="Also run the backlog through 1 and 2 `pipeline process` replicas, twice "
            "(on topics with a partition per replica at least): events/s of each and "
            "per-customer results compared.",
        ),
    ] = False,
    replicas: Annotated[
        str,
        typer.Option(
            help="Replica counts for --scaleout, comma-separated (the topics get at least as "
            "many partitions as the largest)."
        ),
    ] = "1,2",
    scaleout_only: Annotated[
        bool,
        typer.Option(
            "--scaleout-only",
            help="Only the scale-out measurement (no floor, latency, collector or API): "
            "writes HOME/bench/<timestamp>-scaleout.json.",
        ),
    ] = False,
    home: HomeOption = None,
) -> None:
    """Benchmark on a fresh embedded broker: bare counter floor, full processor path, latency
    at 25/50/75% of max, collector and API; writes HOME/bench/<timestamp>.json and .html."""
    from pipeline.bench_scaleout import scaleout as measure_scaleout

    settings = _settings(home)
    try:
        counts = [int(n) for n in replicas.split(",") if n.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"not a list of numbers: {replicas!r}", param_hint="--replicas"
        ) from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter("replica counts must be positive", param_hint="--replicas")
    if scaleout_only:
        from pipeline.bench_scaleout import scaleout_summary, write_scaleout

        n = events or (2_000 if quick else 50_000)
        out = measure_scaleout(settings, n, counts, seed=seed, rounds=1 if quick else 2)
        path = write_scaleout(out, settings.home)
        typer.echo(json.dumps(out, indent=2) if as_json else scaleout_summary(out))
        if not as_json:
            typer.echo(f"written: {path}")
        if out["failed_runs"]:
            raise typer.Exit(1)
        return
    from pipeline.bench import BenchConfig, run_bench, write_results

    if quick:
        config = BenchConfig.quick_config(seed=seed, events=events)
    else:
        config = BenchConfig(seed=seed) if events is None else BenchConfig(seed=seed, events=events)
    report = run_bench(settings, config)
    if scaleout:
        report["scaleout"] = measure_scaleout(
            settings, config.events, counts, seed=config.seed, rounds=1 if config.quick else 2
        )
    json_path, html_path = write_results(report, settings.home)
    # a replica run that failed is in the report; the exit code says so too (schedulers)
    failed = 1 if scaleout and report["scaleout"]["failed_runs"] else 0
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        raise typer.Exit(failed)
    floor, proc = report["floor"], report["processor"]
    console.print(
        f"floor {floor['events_per_s']:,.0f} ev/s · full path {proc['events_per_s']:,.0f} ev/s "
        f"(ratio {proc['ratio_to_floor']}) · collector {report['collector']['events_per_s']:,.0f}"
        f" ev/s · API p50/p99 {report['api']['http']['p50_ms']}/{report['api']['http']['p99_ms']}"
        " ms"
    )
    console.print(
        f"  per CPU-second: floor {floor['events_per_cpu_s'] or 0:,.0f} · full path "
        f"{proc['events_per_cpu_s'] or 0:,.0f} events (ratio {proc['ratio_to_floor_per_cpu_s']});"
        f" broker used {proc['broker_cpu_s']} CPU-s beside the processor's {proc['cpu_s']}"
    )
    servers = [(name, report[key]) for name, key in (("collector", "collector"), ("API", "api"))]
    if all(part.get("gc_share") is not None for _, part in servers):
        console.print(
            "  GC pauses under load: "
            + ", ".join(
                f"{name} {part['gc_share']:.1%} of the time"
                f" ({part['gc_collections'][-1]} full collections)"
                for name, part in servers
            )
        )
    for p in report["latency"]:
        console.print(
            f"  load {p['load_fraction']:.0%} ({p['offered_eps']:,.0f} ev/s): "
            f"p50 {p['p50_ms']} · p95 {p['p95_ms']} · p99 {p['p99_ms']} ms · CPU-s per 1k "
            f"events: processor {p['processor_cpu_s_per_1k']}, broker {p['broker_cpu_s_per_1k']}"
            + (
                f" · loop committing {p['checkpoint_share']:.0%} of the time"
                f" ({p['checkpoint_ms']} ms a commit)"
                if p.get("checkpoint_share") is not None and p.get("checkpoint_ms") is not None
                else ""
            )
            + (
                f" · GC pauses {p['gc_share']:.1%} of the time (longest {p['gc_longest_ms']} ms)"
                if p.get("gc_share") is not None
                else ""
            )
            + ("" if p["kept_pace"] else f" · [yellow]sent only {p['achieved_eps']:,.0f}[/]")
        )
        if p.get("requests_per_1k"):
            top = list(p["requests_per_1k"].items())[:4]
            console.print(
                "    broker requests per 1k events: "
                + ", ".join(f"{name} {count:,.0f}" for name, count in top)
            )
    if scaleout:
        from pipeline.bench_scaleout import scaleout_summary

        console.print("  " + scaleout_summary(report["scaleout"]))
    console.print(f"written: {json_path}\n         {html_path}")
    raise typer.Exit(failed)


@app.command()
def process(
    instance_id: Annotated[
        str | None,
        typer.Option(help="Replica id, unique in the group (default: PIPELINE_INSTANCE_ID)."),
    ] = None,
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="Stop when this process is gone.")
    ] = None,
    start_after: Annotated[
        Path | None, typer.Option(hidden=True, help="Join the group once this file exists.")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Run only the stream processor, one replica of the consumer group, against PIPELINE_BROKER
    (or a running `pipeline up`'s broker) until SIGTERM or Ctrl-C."""
    from pipeline.replicas import run_replica

    settings = _settings(home)
    if instance_id is not None:
        settings = settings.model_copy(update={"instance_id": instance_id})
    run_replica(
        settings,
        announce=lambda line: console.print(line),
        parent_pid=parent_pid,
        start_after=start_after,
    )
    console.print("stopped")


def main() -> None:
    # a transitive import (quixstreams -> authlib) warns on every start: not ours to fix, only
    # noise. authlib puts an "always" filter for its warnings first when it is imported, which
    # would override ours: so it is imported before ours goes in.
    with contextlib.suppress(ImportError):
        importlib.import_module("authlib.deprecate")
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    # `kill -USR1 PID` prints every thread's stack to stderr: how to see where a run hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except PipelineError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
