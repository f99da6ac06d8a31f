"""Email preview: a customer's or a segment's email in a campaign, as the customer would see it."""

from __future__ import annotations

import html
from datetime import UTC, datetime

import access
import streamlit as st

from pipeline import workbench_data as wd
from pipeline.emails import RenderedEmail
from pipeline.errors import ProfileNotFoundError

EMAIL_HEIGHT_PX = 900


def inbox_view(email: RenderedEmail, to: str | None) -> str:
    """The inbox line (subject, preheader, recipient) above the email's HTML, which is framed
    without scripts or same-origin access (links open in a new tab)."""
    font = "font-family:Helvetica,Arial,sans-serif"
    return (
        f'<body style="margin:0;{font}">'
        '<div style="padding:8px 12px;border:1px solid #ddd;border-bottom:0;'
        'border-radius:6px 6px 0 0;background:#fafafa">'
        f'<div style="font-size:12px;color:#6b7280">To: {html.escape(to or "no e-mail address")}'
        "</div>"
        f'<div data-role="subject" style="font-size:16px;font-weight:bold;color:#111827">'
        f"{html.escape(email.subject)}</div>"
        f'<div data-role="preheader" style="font-size:13px;color:#6b7280">'
        f"{html.escape(email.preheader)}</div></div>"
        '<iframe sandbox="allow-popups allow-popups-to-escape-sandbox" title="Rendered email" '
        f'style="width:100%;height:{EMAIL_HEIGHT_PX}px;border:1px solid #ddd;'
        f'border-radius:0 0 6px 6px;box-sizing:border-box" '
        f'srcdoc="{html.escape(email.html, quote=True)}"></iframe></body>'
    )


def show_preview(path: str, customer_id: str, campaign_id: str) -> None:
    """The rendered email of ``customer_id``, its products' reasons, send time and snapshot."""
    try:
        rendered = access.campaign_email(
            path, customer_id, campaign_id, access.bucket(wd.now_ms(), 10)
        )
    except ProfileNotFoundError as exc:
        st.error(str(exc))
        return
    email, send = rendered.email, rendered.send_time
    st.header(wd.plain(email.subject))
    st.caption(f"Preheader: {wd.plain(email.preheader)}")
    as_of = datetime.fromtimestamp(email.snapshot["as_of_ms"] / 1000, UTC)
    key = rendered.idempotency_key or "one per trigger occurrence"
    st.caption(
        wd.plain(
            f"To {rendered.to or 'no e-mail address'} · customer {email.customer_id} · "
            f"campaign {email.campaign_id} · rendered as of {as_of:%Y-%m-%d %H:%M:%S} UTC · "
            f"delivery key {key}"
        )
    )
    local, utc = send.local_time, send.send_at
    row = st.columns(4)
    row[0].metric("Send at (local)", f"{local:%a %H:%M}", help=f"Time zone {send.timezone}")
    row[1].metric("Send at (UTC)", f"{utc:%a %H:%M}")
    row[2].metric(
        "Confidence",
        f"{send.confidence:.0%}",
        help="Share of the estimate from this customer's own activity "
        f"({send.observations:.1f} weighted observations); the rest is the population prior.",
    )
    row[3].metric("Fallback", "yes" if send.fallback else "no")
    st.caption(
        f"Optimized send time: {local:%a %Y-%m-%d %H:%M %Z} in {send.timezone}, "
        f"{utc:%Y-%m-%d %H:%M} UTC"
        + (
            " · fallback: no activity of this customer yet, so the hour comes from the "
            "population's reading hours"
            if send.fallback
            else ""
        )
    )

    left, right = st.columns([3, 2])
    with left:
        st.iframe(inbox_view(email, rendered.to), height=EMAIL_HEIGHT_PX + 90, alt="Email preview")
    with right:
        st.subheader("Why these products")
        products = access.recommended_products(path, rendered)
        st.table(products[["name", "reason", "source"]], hide_index=True, border="horizontal")
    text_tab, snapshot_tab = st.tabs(["Plain-text part", "As-of snapshot"])
    text_tab.code(email.text, language=None, wrap_lines=True)
    snapshot_tab.json(dict(email.snapshot), expanded=2)


st.title("Email preview")
st.caption(
    "The email a customer would get in a campaign if it were rendered now: the same "
    "recommendations, send time and template the API and the delivery job use."
)
path = access.data_path()
if path is None:
    st.stop()

params = st.query_params
campaign = (
    st.text_input(
        "Campaign id",
        value=params.get("campaign", access.default_campaign()),
        key="email_campaign",
    ).strip()
    or access.default_campaign()
)
mode = st.radio(
    "Preview for",
    ["Customer", "Segment"],
    index=1 if params.get("segment") else 0,
    horizontal=True,
    key="email_mode",
)

if mode == "Customer":
    linked = params.get("customer", "")
    chosen = access.pick_customer(path, linked, key="email")
    params.pop("segment", None)
    params.update(customer=chosen, campaign=campaign)
    show_preview(path, chosen, campaign)
else:
    segments = access.campaign_segments(path, access.bucket(wd.now_ms(), 30))
    names = segments["segment"].tolist()
    if not names:
        st.info("No campaign segments are defined (see segments.yaml).")
        st.stop()
    described = {row["segment"]: row for row in segments.to_dict("records")}
    linked_segment = params.get("segment", "")
    segment = st.selectbox(
        "Segment",
        names,
        format_func=lambda s: f"{described[s]['label']} · {described[s]['members']:,}",
        index=names.index(linked_segment) if linked_segment in names else 0,
        key="email_segment",
    )
    st.caption(str(described[segment]["description"]))
    limit = int(st.number_input("Members to render", 1, 500, 25, step=5, key="email_limit"))
    params.pop("customer", None)
    params.update(segment=segment, campaign=campaign)
    render = access.campaign_render(path, campaign, segment, limit, access.bucket(wd.now_ms(), 30))
    if not render.emails:
        st.info(
            f"No customer is in {described[segment]['label']!r} right now: pick another "
            "segment, or send more traffic with `pipeline simulate`."
        )
        st.stop()
    st.caption(f"{len(render.emails):,} of {render.members:,} members rendered")
    st.dataframe(
        access.campaign_table(render),
        hide_index=True,
        column_config={
            "confidence": st.column_config.ProgressColumn(
                "confidence", min_value=0.0, max_value=1.0, format="percent"
            ),
            "preview": st.column_config.LinkColumn("preview", display_text="open"),
        },
        key="email_members",
    )
    member = st.selectbox(
        "Preview a member",
        [e.email.customer_id for e in render.emails],
        key="email_member",
    )
    show_preview(path, member, campaign)
