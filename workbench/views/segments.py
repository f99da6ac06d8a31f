"""Segments: intent-stage sizes now and over time, members with their scores, CSV export."""

from __future__ import annotations

import access
import plotly.express as px
import streamlit as st

from pipeline import workbench_data as wd

st.title("Segments")
st.caption(
    "Customers grouped by intent stage, re-evaluated now (a customer without new events drifts "
    "to *lapsed*). Scores are the Customer Interaction Score (0-100) at this moment."
)
path = access.data_path()
if path is None:
    st.stop()

include_anonymous = st.toggle("Include anonymous visitors", value=False, key="seg_anon")
now = access.bucket(wd.now_ms(), 60)
members = access.members(path, now, include_anonymous)
if members.empty:  # the store has data (data_path said so)
    if not include_anonymous and not access.members(path, now, True).empty:
        st.info(
            "No signed-in customers yet: every profile so far is an anonymous visitor. "
            "Turn on *Include anonymous visitors* to see them.",
            icon=":material/person_off:",
        )
    else:  # no profile at all: what came was dead-lettered, or is still being processed
        st.info(
            "No profiles yet: every event stored so far was dead-lettered or is still being "
            "processed. The *Data quality* page shows why events were refused.",
            icon=":material/report:",
        )
    st.stop()

sizes = wd.segment_sizes(members)
cols = st.columns(len(sizes))
for col, row in zip(cols, sizes.to_dict("records"), strict=True):
    col.metric(
        str(row["intent_stage"]).title(),
        f"{row['customers']:,}",
        f"{row['share']:.0%} of customers",
        delta_color="off",
        delta_arrow="off",
    )

left, right = st.columns(2)
left.plotly_chart(
    px.bar(sizes, x="intent_stage", y="customers", color="intent_stage", title="Segment sizes now"),
    key="seg_sizes",
)
history = access.stage_history(path, now, 14, include_anonymous)
right.plotly_chart(
    px.area(
        history.frame,
        x="day_end",
        y="customers",
        color="intent_stage",
        title="Segment sizes, last 14 days",
    ),
    key="seg_history",
)
right.caption(
    f"Rebuilt from stored events for {history.customers:,} of {history.customers_total:,} "
    "customers"
    + (" (a fixed random sample)." if history.customers < history.customers_total else ".")
)

st.subheader("Members")
f1, f2, f3, f4 = st.columns([2, 2, 2, 2])
stages = f1.multiselect(
    "Intent stage", list(wd.STAGES), default=[], key="seg_stages", placeholder="all stages"
)
low, high = f2.slider("Score", 0.0, 100.0, (0.0, 100.0), step=1.0, key="seg_score")
categories = sorted(c for c in members["top_category"].dropna().unique())
picked = f3.multiselect(
    "Top category", categories, default=[], key="seg_categories", placeholder="all categories"
)
text = f4.text_input("Search id, e-mail or name", key="seg_text")
shown = wd.filter_members(
    members, stages=stages, min_score=low, max_score=high, text=text, categories=picked
)
st.caption(f"{len(shown):,} of {len(members):,} customers")
st.download_button(
    "Export CSV",
    data=lambda: wd.members_csv(shown),  # built on the click, not on every rerun
    file_name="segment_members.csv",
    mime="text/csv",
    icon=":material/download:",
    key="seg_export",
)
st.dataframe(
    shown.assign(open=shown["customer_id"].map(lambda c: wd.page_link("customer", customer=c))),
    hide_index=True,
    column_config={
        "score": st.column_config.ProgressColumn(
            "score", min_value=0, max_value=100, format="%.1f"
        ),
        "recency": st.column_config.NumberColumn(format="%.2f"),
        "frequency": st.column_config.NumberColumn(format="%.2f"),
        "monetary": st.column_config.NumberColumn(format="%.2f"),
        "revenue_total": st.column_config.NumberColumn("revenue", format="%.2f"),
        "open": st.column_config.LinkColumn("360", display_text="open"),
    },
    key="seg_members",
)
