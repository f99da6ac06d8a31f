"""Alerts: what the stream's anomaly detectors flagged recently (see pipeline.anomaly)."""

from __future__ import annotations

import access
import streamlit as st

from pipeline import workbench_data as wd

st.title("Alerts")
path = access.data_path()
if path is None:
    st.stop()

minutes = st.number_input(
    "Open for (minutes of data time)",
    min_value=1,
    max_value=7 * 24 * 60,
    value=wd.OPEN_ALERT_WINDOW_MS // 60_000,
    step=5,
    key="al_window",
)
alerts = access.open_alerts(path, int(minutes))
if alerts.empty:
    st.success("No open alerts", icon=":material/check_circle:")
else:
    total, critical = st.columns(2)
    total.metric("Open alerts", len(alerts))
    critical.metric("Critical", int((alerts["severity"] == "critical").sum()))
    st.dataframe(
        alerts.drop(columns="at_ms"),
        hide_index=True,
        key="al_table",
        column_config={
            "observed": st.column_config.NumberColumn("observed", format="%.3g"),
            "expected": st.column_config.NumberColumn("expected", format="%.3g"),
            "at": st.column_config.DatetimeColumn("raised at (UTC)"),
            "alerts": st.column_config.NumberColumn("raised", help="times in the window"),
        },
    )
st.caption(
    "Newest alert per kind and subject raised within the window before the newest data time "
    "(broker time of the last messages, not the wall clock). Observed vs expected: events per "
    "bucket for volume spikes and drops (subject `event/source`), dead-letter share for "
    "`dead_letter_rate` (subject: source), events in the window for `bot_identity` (subject: "
    "the identity), median lag in ms for `clock_skew` (subject: source). Figures are one "
    "input partition's."
)
