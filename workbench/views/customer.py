"""Customer 360: search a customer; profile, scores, affinities, timeline and identity graph."""

from __future__ import annotations

import access
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from pipeline import workbench_data as wd
from pipeline.errors import ProfileNotFoundError

st.title("Customer 360")
path = access.data_path()
if path is None:
    st.stop()

linked = st.query_params.get("customer", "")
chosen = access.pick_customer(path, linked, key="cust", show_match=True)
if chosen != linked:
    st.query_params["customer"] = chosen

try:
    view = access.customer(path, chosen, access.bucket(wd.now_ms(), 5))
except ProfileNotFoundError as exc:
    st.error(str(exc))
    st.stop()

profile = view.profile
traits = profile.get("traits") or {}
name = " ".join(str(traits[k]) for k in ("firstName", "lastName") if traits.get(k))
st.header(wd.plain(name or view.customer_id))
st.caption(
    wd.plain(
        f"{view.customer_id} · {traits.get('email') or 'no e-mail'} · timezone "
        f"{profile.get('timezone') or 'unknown'}"
    )
    + (
        f" · opened via {wd.plain(view.requested_id)}"
        if view.requested_id != view.customer_id
        else ""
    )
    + (" · anonymous visitor" if profile.get("is_anonymous") else "")
)
row = st.columns(6)
row[0].metric("Interaction score", f"{view.score.score:.1f}")
row[1].metric("Intent stage", view.intent_stage)
row[2].metric("Revenue", f"{profile.get('revenue_total', 0):,.2f}")
row[3].metric("Orders", f"{profile.get('order_count', 0):,}")
row[4].metric("Events", f"{profile.get('event_count', 0):,}")
row[5].metric("Sessions", f"{profile.get('sessions', 0):,}")

left, mid, right = st.columns(3)
parts = wd.score_contributions(view.score, access.scoring())
left.plotly_chart(
    px.bar(
        parts,
        x="component",
        y="points",
        hover_data=["value", "weight"],
        title="Score breakdown (points)",
    ),
    key="cust_score",
)
for col, frame, label, key in (
    (mid, view.category_affinity, "category", "cust_cat"),
    (right, view.brand_affinity, "brand", "cust_brand"),
):
    if frame.empty:
        col.info(f"No {label} affinity yet.")
    else:
        col.plotly_chart(
            px.bar(
                frame.head(10),
                x="share",
                y=label,
                orientation="h",
                title=f"{label.title()} affinity",
            ).update_yaxes(autorange="reversed"),
            key=key,
        )

st.subheader("Event timeline")
timeline = view.timeline
if timeline.empty:
    st.info("No stored events.")
else:
    st.plotly_chart(
        px.scatter(
            timeline,
            x="time",
            y="event_name",
            color="device_type",
            hover_data=["product_id", "category", "brand", "revenue", "merged_from"],
        ),
        key="cust_timeline",
    )
    st.dataframe(timeline, hide_index=True, key="cust_timeline_table")

st.subheader("Identity graph")
nodes, edges = wd.identity_graph(view)
if view.identities.empty:
    st.info("No devices linked: every event came with the customer id (server-side).")
else:
    pos = nodes.set_index("id")
    fig = go.Figure()
    for edge in edges.to_dict("records"):
        a, b = pos.loc[edge["source"]], pos.loc[edge["target"]]
        fig.add_trace(
            go.Scatter(
                x=[a["x"], b["x"]],
                y=[a["y"], b["y"]],
                mode="lines",
                line={"color": "#bbb"},
                hoverinfo="text",
                text=edge["label"],
                showlegend=False,
            )
        )
    for kind, group in nodes.groupby("kind"):
        fig.add_trace(
            go.Scatter(
                x=group["x"],
                y=group["y"],
                mode="markers+text",
                text=group["label"],
                textposition="top center",
                hovertext=group["id"],
                name=str(kind),
                marker={"size": 18},
            )
        )
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=420)
    st.plotly_chart(fig, key="cust_graph")
    st.dataframe(view.identities, hide_index=True, key="cust_identities")
st.caption(wd.plain(f"Devices seen: {profile.get('devices') or {}}"))

with st.expander("Traits and stored profile"):
    st.json(traits, expanded=True)
    st.json(profile, expanded=False)
