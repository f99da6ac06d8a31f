"""Abandonment triggers: due in event time, once per arming event, only for known customers."""

from __future__ import annotations

from pipeline.scoring import Profile, new_profile
from pipeline.testing import T0_MS
from pipeline.triggers import MINUTE_MS, TriggerParams, due_triggers, expired

P = TriggerParams(cart_abandonment_minutes=60, browse_abandonment_minutes=240, grace_minutes=5)


def carted(**kw: object) -> Profile:
    p = new_profile("cus_1", is_anonymous=False)
    p.last_cart_ms = T0_MS
    p.cart = {"P1": 2}
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_cart_abandonment_is_due_after_delay_plus_grace_only() -> None:
    p = carted()
    # due at T0 + 60 min; the watermark must pass it by the 5 min grace
    assert due_triggers(p, T0_MS + 64 * MINUTE_MS, P) == []
    [t] = due_triggers(p, T0_MS + 65 * MINUTE_MS, P)
    assert t.trigger == "cart_abandonment"
    assert t.due_ms == T0_MS + 60 * MINUTE_MS
    assert t.trigger_id == f"cus_1:cart_abandonment:{T0_MS}"
    assert t.context == {"cart": {"P1": 2}}


def test_an_order_after_the_last_add_cancels_cart_abandonment() -> None:
    p = carted(last_order_ms=T0_MS + MINUTE_MS)
    assert due_triggers(p, T0_MS + 10 * 60 * MINUTE_MS, P) == []


def test_a_new_add_to_cart_arms_a_new_trigger_id() -> None:
    first = due_triggers(carted(), T0_MS + 2 * 60 * MINUTE_MS, P)
    later = carted(last_cart_ms=T0_MS + 30 * MINUTE_MS)
    second = due_triggers(later, T0_MS + 3 * 60 * MINUTE_MS, P)
    assert first[0].trigger_id != second[0].trigger_id


def test_browse_abandonment_needs_views_after_cart_and_order() -> None:
    p = new_profile("cus_2", is_anonymous=False)
    p.last_view_ms = T0_MS
    p.recent_views = ["P9", "P8"]
    assert due_triggers(p, T0_MS + 244 * MINUTE_MS, P) == []
    [t] = due_triggers(p, T0_MS + 245 * MINUTE_MS, P)
    assert (t.trigger, t.context) == ("browse_abandonment", {"viewed": ["P9", "P8"]})
    p.last_cart_ms = T0_MS + 1  # added to cart after viewing: not a browse abandonment
    assert [x.trigger for x in due_triggers(p, T0_MS + 10**9, P)] == []


def test_anonymous_and_merged_profiles_are_not_emailable() -> None:
    anon = new_profile("anon:d1", is_anonymous=True)
    anon.last_cart_ms, anon.cart = T0_MS, {"P1": 1}
    assert due_triggers(anon, T0_MS + 10**9, P) == []
    merged = carted(merged_into="cus_9")
    assert due_triggers(merged, T0_MS + 10**9, P) == []


def test_a_cart_left_behind_is_one_email_not_two() -> None:
    """Added to cart, then viewed something else: the cart trigger, not a browse one too."""
    p = carted(last_view_ms=T0_MS + 10 * MINUTE_MS, recent_views=["P2"])
    assert [t.trigger for t in due_triggers(p, T0_MS + 10**9, P)] == ["cart_abandonment"]
    p.cart = {}  # emptied by hand: the views after it are a browse abandonment again
    assert [t.trigger for t in due_triggers(p, T0_MS + 10**9, P)] == ["browse_abandonment"]


def test_a_browse_email_names_no_product_already_bought() -> None:
    p = new_profile("cus_3", is_anonymous=False)
    p.last_order_ms, p.purchased = T0_MS - 1, ["P9"]
    p.last_view_ms, p.recent_views = T0_MS, ["P9", "P8", "P7"]
    [t] = due_triggers(p, T0_MS + 10**9, P)
    assert t.context == {"viewed": ["P8", "P7"]}
    p.recent_views = ["P9"]  # only what they bought: nothing to remind them of
    assert due_triggers(p, T0_MS + 10**9, P) == []


def test_a_trigger_expires_max_age_after_it_fell_due() -> None:
    params = P.model_copy(update={"max_age_hours": 72})
    due_at = T0_MS + 60 * MINUTE_MS
    [t] = due_triggers(carted(), due_at + 72 * 60 * MINUTE_MS + 5 * MINUTE_MS, params)
    assert not expired(t, due_at + 72 * 60 * MINUTE_MS + 5 * MINUTE_MS, params)  # (grace)
    assert expired(t, due_at + 72 * 60 * MINUTE_MS + 5 * MINUTE_MS + 1, params)
