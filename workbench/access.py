"""Cached, read-only access to the warehouse for the workbench pages, and the empty state.

Queries are cached per warehouse path; the handle is one read-only connection per process,
so the pages never block the processor that writes concurrently. The processor's and the
collector's ``/metrics`` are scraped with a short timeout and cached for two seconds.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from pipeline import workbench_data as wd
from pipeline.api.service import CampaignEmail, CampaignRender, PersonalizationService
from pipeline.scoring import ScoringParams
from pipeline.settings import load_settings
from pipeline.stores.local import LocalWarehouse


def warehouse_path() -> str:
    """Absolute path of the warehouse of the configured home (it may not exist yet)."""
    return str(Path(load_settings().warehouse_path).resolve())


def scoring() -> ScoringParams:
    return load_settings().scoring


def _file_id(path: str) -> tuple[int, int] | None:
    """Which file is at ``path`` now (device, inode), or None when there is none."""
    try:
        st_ = os.stat(path)
    except OSError:
        return None
    return st_.st_dev, st_.st_ino


@st.cache_resource(show_spinner=False, max_entries=4)
def _open(path: str, file_id: tuple[int, int]) -> LocalWarehouse:
    return LocalWarehouse(Path(path), read_only=True)


def warehouse(path: str) -> LocalWarehouse | None:
    """The read-only handle, or None while the warehouse file does not exist (not cached).

    Cached per file, not per path: a home deleted and started over while the workbench runs
    gets a new handle (the old one would go on reading the deleted file)."""
    file_id = _file_id(path)
    return None if file_id is None else _open(path, file_id)


@st.cache_data(ttl=2, show_spinner=False)
def has_data(path: str) -> bool:
    return wd.has_data(warehouse(path))


def show_empty_state() -> None:
    """What to do when there is nothing to show yet."""
    st.info(wd.START_HINT, icon=":material/rocket_launch:")
    st.code("pipeline up\n# in a second terminal:\npipeline simulate --events 10000", "bash")


def data_path() -> str | None:
    """The warehouse path when it holds data; otherwise shows the empty state and returns None."""
    path = warehouse_path()
    if not has_data(path):
        show_empty_state()
        return None
    return path


def _wh(path: str) -> LocalWarehouse:
    wh = warehouse(path)
    if wh is None:
        raise FileNotFoundError(path)
    return wh


@st.cache_data(ttl=1, show_spinner=False)
def live(path: str, now_ms: int, minutes: float) -> dict[str, Any]:
    """Everything the Live page shows at ``now_ms`` (cached per second)."""
    wh = _wh(path)
    since = now_ms - int(minutes * 60_000)
    return {
        "totals": wd.totals(wh),
        "rates": wd.rates(wh, now_ms=now_ms),
        "latency_last_minute": wd.latency_summary(wh, since_ms=now_ms - 60_000),
        "steps_last_minute": wd.step_latency(wh, since_ms=now_ms - 60_000),
        "throughput": wd.throughput(wh, now_ms=now_ms, minutes=minutes),
        "latency": wd.latency_over_time(wh, now_ms=now_ms, minutes=minutes),
        "dead_letters": wd.dead_letters_by_reason(wh, since_ms=since),
        "dead_letters_all": wd.dead_letters_by_reason(wh),
    }


def processor_metrics_url() -> str | None:
    settings = load_settings()
    return wd.metrics_url(settings.metrics_host, settings.metrics_port)


def collector_metrics_url() -> str | None:
    cfg = load_settings().collector
    return wd.metrics_url(cfg.host, cfg.port)


@st.cache_data(ttl=2, show_spinner=False)
def processor_scrape(url: str) -> wd.ProcessorScrape | None:
    """The processor's metrics at ``url``, or None when it does not answer with them."""
    text = wd.read_metrics(url)
    try:
        return None if text is None else wd.parse_processor_scrape(text)
    except ValueError:  # something else listens there
        return None


@st.cache_data(ttl=2, show_spinner=False)
def collector_scrape(url: str) -> wd.CollectorScrape | None:
    """The collector's metrics at ``url``, or None when it does not answer with them."""
    text = wd.read_metrics(url)
    try:
        return None if text is None else wd.parse_collector_scrape(text)
    except ValueError:
        return None


@st.cache_resource(show_spinner=False, max_entries=4)
def _member_index(path: str, file_id: tuple[int, int]) -> tuple[wd.MemberIndex, threading.Lock]:
    """The segment rows of one warehouse file, kept by the process and shared by sessions."""
    return wd.MemberIndex(), threading.Lock()


@st.cache_data(ttl=60, show_spinner=False)  # as long as its at_ms bucket: rebuilt once a minute
def members(path: str, at_ms: int, include_anonymous: bool) -> pd.DataFrame:
    """Every live profile scored at ``at_ms``: the profiles stored since the last call are
    read, the others scored again from what the index keeps."""
    file_id = _file_id(path)
    if file_id is None:
        raise FileNotFoundError(path)
    index, lock = _member_index(path, file_id)
    with lock:
        index.refresh(_open(path, file_id))
        return index.members(scoring(), at_ms=at_ms, include_anonymous=include_anonymous)


@st.cache_data(ttl=120, show_spinner=False)
def stage_history(path: str, end_ms: int, days: int, include_anonymous: bool) -> wd.StageHistory:
    return wd.stage_history(
        _wh(path), scoring(), end_ms=end_ms, days=days, include_anonymous=include_anonymous
    )


@st.cache_data(ttl=5, show_spinner=False)
def search(path: str, text: str, at_ms: int) -> pd.DataFrame:
    """Customers matching ``text``, with score and stage as of ``at_ms``."""
    return wd.search_customers(_wh(path), text, params=scoring(), at_ms=at_ms)


def pick_customer(path: str, linked: str, *, key: str, show_match: bool = False) -> str:
    """A search box and a pick list of the customers it finds; the chosen id (the page stops
    when nothing matches). ``linked`` is the id a deep link opened, offered even when a search
    cannot list it (a merged ``anon:...`` profile); ``key`` keeps each page's widgets apart."""
    text = st.text_input(
        "Search by customer id, e-mail or anonymous id",
        value=linked,
        key=f"{key}_search",
        placeholder="cus_000001, anna@example.com, 3f2a…",
    )
    results = search(path, text, bucket(wd.now_ms(), 5))  # score and stage now, as shown beside
    labels = {
        row["customer_id"]: f"{row['customer_id']} · {row['email'] or 'no e-mail'} · "
        f"{row['intent_stage']} · score {row['cis']:.0f}"
        + (f" · {row['matched_by']}" if show_match else "")
        for row in results.to_dict("records")
    }
    options = list(labels)
    if linked and text == linked and linked not in labels:
        options.insert(0, linked)
    if not options:
        st.warning(f"No customer matches {wd.plain(repr(text))}.")
        st.stop()
    chosen: str = st.selectbox(
        "Customer",
        options,
        format_func=lambda c: labels.get(c, c),
        key=f"{key}_pick",
        index=options.index(linked) if linked in options else 0,
    )
    return chosen


@st.cache_data(ttl=5, show_spinner=False)
def customer(path: str, customer_id: str, at_ms: int) -> wd.Customer360:
    return wd.customer_360(_wh(path), customer_id, scoring(), at_ms=at_ms)


@st.cache_data(ttl=10, show_spinner=False)
def quality(path: str) -> dict[str, pd.DataFrame]:
    wh = _wh(path)
    return {
        "by_reason": wd.dead_letters_by_reason(wh),
        "schema_versions": schema_versions(path),
    }


@st.cache_data(ttl=300, show_spinner=False)
def schema_versions(path: str) -> pd.DataFrame:
    """Events per schema version: a scan of every payload (seconds on millions of events),
    so kept for five minutes; versions change with deployments, not by the second."""
    return wd.schema_versions(_wh(path))


@st.cache_data(ttl=10, show_spinner=False)
def dead_letter_samples(path: str, reason: str | None, limit: int) -> pd.DataFrame:
    return wd.dead_letter_samples(_wh(path), reason=reason, limit=limit)


@st.cache_resource(show_spinner=False, max_entries=4)
def _service(path: str, file_id: tuple[int, int] | None) -> PersonalizationService:
    return PersonalizationService(load_settings(), Path(path))


def service(path: str) -> PersonalizationService:
    """The API's personalization service over the warehouse at ``path`` (one per process and
    file, as :func:`warehouse`)."""
    return _service(path, _file_id(path))


def default_campaign() -> str:
    return load_settings().api.default_campaign


@st.cache_data(ttl=10, show_spinner=False)
def campaign_email(path: str, customer_id: str, campaign_id: str, at_ms: int) -> CampaignEmail:
    """The email ``customer_id`` would get in ``campaign_id`` now (``at_ms`` keys the cache)."""
    return service(path).campaign_email(customer_id, campaign_id)


@st.cache_data(ttl=30, show_spinner=False)
def campaign_segments(path: str, at_ms: int) -> pd.DataFrame:
    """The campaign segments (``segments.yaml``) with their member counts."""
    _, sizes = service(path).segment_sizes()
    return pd.DataFrame(
        [
            {
                "segment": rule.name,
                "label": rule.label or rule.name,
                "description": rule.description,
                "members": members,
            }
            for rule, members in sizes
        ],
        columns=["segment", "label", "description", "members"],
    )


@st.cache_data(ttl=30, show_spinner=False)
def campaign_render(
    path: str, campaign_id: str, segment: str, limit: int, at_ms: int
) -> CampaignRender:
    """The emails of up to ``limit`` members of ``segment`` in ``campaign_id``."""
    return service(path).render_campaign(campaign_id, segment, limit)


def recommended_products(path: str, email: CampaignEmail) -> pd.DataFrame:
    """The email's products, in order, with the reason the customer reads and the score."""
    catalog = service(path).catalog
    rows = []
    for rec in email.email.snapshot.get("recommendations", []):
        product = catalog.get(rec["product_id"])
        rows.append(
            {
                "product_id": rec["product_id"],
                "name": product.name if product else None,
                "category": product.category if product else None,
                "reason": rec["reason"],
                "source": rec["source"],
                "score": round(rec["score"], 3),
            }
        )
    columns = ["product_id", "name", "category", "reason", "source", "score"]
    return pd.DataFrame(rows, columns=columns)


def campaign_table(render: CampaignRender) -> pd.DataFrame:
    """One row per rendered member email: recipient, subject, send time and a preview link."""
    rows = [
        {
            "customer_id": e.email.customer_id,
            "to": e.to,
            "subject": e.email.subject,
            "send_at_local": e.send_time.local_time.strftime("%a %Y-%m-%d %H:%M %Z"),
            "send_at_utc": e.send_time.send_at.strftime("%Y-%m-%d %H:%M"),
            "confidence": e.send_time.confidence,
            "fallback": e.send_time.fallback,
            "preview": wd.page_link(
                "email", customer=e.email.customer_id, campaign=render.campaign_id
            ),
        }
        for e in render.emails
    ]
    columns = [
        "customer_id", "preview", "to", "subject", "send_at_local", "send_at_utc",
        "confidence", "fallback",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def bucket(ms: int, seconds: int) -> int:
    """``ms`` rounded down to ``seconds``, so cached results are shared within that bucket."""
    step = seconds * 1000
    return ms // step * step


@st.cache_data(ttl=5, show_spinner=False)
def open_alerts(path: str, window_minutes: int) -> pd.DataFrame:
    return wd.open_alerts(_wh(path), window_ms=window_minutes * 60_000)
