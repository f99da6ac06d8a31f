"""Live: messages per second in and out, end-to-end latency, dead letters, and from the
processor's and collector's metrics: duplicates, consumer lag, refusals; refreshes itself."""

from __future__ import annotations

import math

import access
import plotly.express as px
import streamlit as st

from pipeline import workbench_data as wd

st.title("Live pipeline")
controls = st.columns([2, 1, 3])
minutes = controls[0].segmented_control(
    "Window (minutes)", options=[1, 5, 15, 60], default=5, key="live_window"
)
auto = controls[1].toggle("Auto-refresh", value=True, key="live_auto")


def _fmt_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f} ms"


def processor_panel() -> None:
    """Duplicates, lag and dead letters from the processor's /metrics; collector refusals."""
    url = access.processor_metrics_url()
    scrape = access.processor_scrape(url) if url else None
    if scrape is None:
        st.caption(
            f"Processor metrics not reachable at {url}."
            if url
            else "Processor metrics port is 0 (any free port): set PIPELINE_METRICS_PORT."
        )
    else:
        row = st.columns(4)
        row[0].metric("Duplicates dropped", f"{scrape.duplicates_dropped:,}")
        row[1].metric(
            "Consumer lag",
            f"{scrape.consumer_lag_total:,}",
            help="messages behind the high watermark, all partitions",
        )
        row[2].metric("Replays dropped", f"{scrape.replays_dropped:,}")
        row[3].metric("Dead-lettered (processor)", f"{sum(scrape.dead_lettered.values()):,}")
        left, right = st.columns(2)
        if scrape.consumer_lag:
            left.dataframe(scrape.lag_table(), hide_index=True)
            left.caption("Consumer lag per partition.")
        else:
            left.caption("No consumer lag reported yet.")
        if scrape.dead_lettered:
            right.dataframe(scrape.dead_letter_table(), hide_index=True)
            right.caption("Dead-lettered by reason since the processor started.")
        if scrape.broker_memory_bytes is not None:
            st.caption(
                f"Embedded broker memory: {scrape.broker_memory_bytes / 2**20:,.0f} MiB. It keeps "
                "every message in memory (about 2 kB per event, all topics together) until "
                "`pipeline up` is started again, which starts from empty topics and stores."
            )
        cpu = scrape.cpu_table()
        if not cpu.empty:
            st.plotly_chart(
                px.bar(
                    cpu,
                    x="us_per_event",
                    y="step",
                    orientation="h",
                    labels={"us_per_event": "CPU µs per raw event", "step": ""},
                    height=260,
                ),
                key="live_processor_cpu",
            )
            st.caption(
                "Where a processor core goes, since the processor started: its own steps, and "
                "the stream framework, Kafka client and serialization (in `pipeline up` the "
                "collector and API share the process)."
            )
        requests = scrape.requests_table()
        if not requests.empty:
            st.dataframe(requests.head(6), hide_index=True)
            st.caption(
                "Requests the processor sent the brokers per 1,000 raw events since it started: "
                "paced traffic takes about one produce request per output partition an event "
                "touches, and each costs the broker CPU whatever it carries."
            )
    collector_url = access.collector_metrics_url()
    collector = access.collector_scrape(collector_url) if collector_url else None
    if collector is None:
        st.caption(
            f"Collector metrics not reachable at {collector_url}."
            if collector_url
            else "Collector port is 0 (any free port): its metrics have no fixed address."
        )
    elif collector.rejected:
        st.dataframe(collector.rejection_table(), hide_index=True)
        st.caption(
            f"Collector: {collector.events_accepted:,} events accepted; refused requests by "
            "status and code."
        )
    else:
        st.caption(f"Collector: {collector.events_accepted:,} events accepted, none refused.")


@st.fragment(run_every=2 if auto else None)
def live_panel() -> None:
    """Re-runs on its own every 2 s; the rest of the page stays put."""
    path = access.data_path()
    if path is None:
        return
    now = wd.now_ms()
    snap = access.live(path, access.bucket(now, 1), float(minutes or 5))
    totals, rates, lat = snap["totals"], snap["rates"], snap["latency_last_minute"]
    row = st.columns(4)
    row[0].metric("Events/s in", f"{rates['in_per_s']:,.1f}", help="last 10 s, by broker time")
    row[1].metric("Events/s out", f"{rates['out_per_s']:,.1f}", help="last 10 s, readable")
    row[2].metric("Latency p95 (1 min)", _fmt_ms(lat["p95"]), help="broker → warehouse")
    row[3].metric("Events stored", f"{totals['events']:,}")
    row = st.columns(4)
    row[0].metric("Customers", f"{totals['customers']:,}")
    row[1].metric("Anonymous profiles", f"{totals['anonymous_profiles']:,}")
    row[2].metric("Dead letters", f"{totals['dead_letters']:,}")
    row[3].metric("Identity links", f"{totals['identity_links']:,}")
    last = totals["last_stored_ms"]
    idle_s = None if last is None else max(0.0, (now - last) / 1000)
    st.caption(
        f"Last write {idle_s:,.1f} s ago · {totals['events_merged']:,} anonymous events merged "
        "into customers · duplicates and consumer lag are not stored: they are read from the "
        "processor's metrics below"
        if idle_s is not None
        else "No writes yet."
    )
    processor_panel()

    left, right = st.columns(2)
    tp = snap["throughput"].melt("time", var_name="flow", value_name="messages/s")
    left.plotly_chart(
        px.line(tp, x="time", y="messages/s", color="flow", title="Throughput per second"),
        key="live_throughput",
    )
    latency = snap["latency"]
    if latency.empty:
        right.info("No events stored in this window.")
    else:
        lat_long = latency.melt(
            ["time", "events"],
            value_vars=["p50", "p95", "p99"],
            var_name="percentile",
            value_name="ms",
        )
        right.plotly_chart(
            px.line(
                lat_long,
                x="time",
                y="ms",
                color="percentile",
                markers=True,
                title="End-to-end latency per 5 s",
            ),
            key="live_latency",
        )
    steps = snap["steps_last_minute"]
    if not steps.empty and steps["n"].sum() > 0:
        long = steps.melt(
            ["step", "n"], value_vars=["p50_ms", "p95_ms"], var_name="percentile", value_name="ms"
        )
        st.plotly_chart(
            px.bar(
                long,
                x="step",
                y="ms",
                color="percentile",
                barmode="group",
                title="Where the time goes (last minute): ms since the previous step",
            ),
            key="live_steps",
        )
        st.caption(
            "Each step counts from the one before, so a stage's bar includes the wait for the "
            "previous stage's commit (exactly-once hops); `pipeline trace MESSAGE_ID` shows one "
            "event's path."
        )
    left, right = st.columns(2)
    window_dl, all_dl = snap["dead_letters"], snap["dead_letters_all"]
    if all_dl.empty:
        left.success("No dead letters.")
    else:
        left.plotly_chart(
            px.bar(all_dl, x="reason", y="dead_letters", title="Dead letters by reason (all time)"),
            key="live_dead_letters",
        )
    right.dataframe(window_dl, hide_index=True)
    right.caption(f"Dead letters in the last {minutes} min.")


live_panel()
