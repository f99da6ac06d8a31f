"""Data quality: dead letters by reason with samples, schema versions seen."""

from __future__ import annotations

import access
import plotly.express as px
import streamlit as st

st.title("Data quality")
path = access.data_path()
if path is None:
    st.stop()

data = access.quality(path)
by_reason = data["by_reason"]
st.subheader("Dead letters")
if by_reason.empty:
    st.success("No message has been dead-lettered.")
else:
    left, right = st.columns([2, 3])
    left.plotly_chart(
        px.bar(by_reason, x="dead_letters", y="reason", orientation="h", title="By reason"),
        key="dq_reasons",
    )
    right.dataframe(by_reason, hide_index=True, key="dq_reason_table")
    reason = st.selectbox(
        "Samples of reason", ["all", *by_reason["reason"].tolist()], key="dq_reason"
    )
    limit = st.slider("Samples", 10, 500, 50, step=10, key="dq_limit")
    samples = access.dead_letter_samples(path, None if reason == "all" else reason, limit)
    st.dataframe(samples, hide_index=True, key="dq_samples")

st.subheader("Schema versions seen")
st.dataframe(data["schema_versions"], hide_index=True, key="dq_schemas")
st.caption("Stored events per envelope type, event name and `context.schemaVersion`.")
