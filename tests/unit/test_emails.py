"""Unit tests of email rendering: content, snapshot, URL checks and escaping of every value."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape

from pipeline.catalog import Catalog, Product
from pipeline.emails import EmailParams, RenderedEmail, render_email
from pipeline.emails.render import one_line
from pipeline.recommend import Recommendation
from pipeline.scoring import DAY_MS, Profile
from pipeline.sendtime import SendTime
from pipeline.testing import T0_MS

NOW = T0_MS + 10 * DAY_MS
SEND = SendTime(
    send_at_ms=NOW + 20 * 3_600_000,
    hour_of_week=20,
    timezone="Europe/Paris",
    confidence=0.8,
    probability=0.05,
    observations=40.0,
    fallback=False,
)


def catalog(name: str = "Linen Midi Dress \u2013 Sage") -> Catalog:
    return Catalog(
        [
            Product("P1", name, "dresses", "Linnea", "Sage", "linen", 89.99, "EUR", 5),
            Product(
                "P2",
                "Silk Camisole \u2013 Ivory",
                "tops",
                "Kestrel",
                "Ivory",
                "silk",
                1250.0,
                "GBP",
                3,
            ),
        ]
    )


def customer(first_name: str | None = "Emma") -> Profile:
    traits = {"email": "emma@example.com"}
    if first_name is not None:
        traits["firstName"] = first_name
    return Profile(
        customer_id="cus_1",
        is_anonymous=False,
        traits=traits,
        timezone="Europe/Paris",
        category_affinity={"dresses": 3.0, "tops": 1.0},
        recent_views=["P1"],
        purchased=["P9"],
        cis=61.5,
        version=7,
    )


RECS = [
    Recommendation("P1", 1.2, "Because you viewed 3 linen dresses this week", "affinity"),
    Recommendation("P2", 0.4, "Popular in Tops right now", "trending"),
]


def render(
    profile: Profile | None = None,
    recs: list[Recommendation] | None = None,
    products: Catalog | None = None,
    **kwargs: object,
) -> RenderedEmail:
    options: dict[str, object] = {
        "campaign_id": "cmp_1",
        "unsubscribe_url": "https://shop.example.com/unsubscribe?u=cus_1&t=abc",
        "as_of_ms": NOW,
    }
    options.update(kwargs)
    return render_email(
        profile or customer(),
        RECS if recs is None else recs,
        SEND,
        products or catalog(),
        **options,  # type: ignore[arg-type]
    )


def test_subject_preheader_and_parts() -> None:
    email = render()
    assert email.subject == "Emma, 2 picks for you, from dresses to tops"
    assert (
        email.preheader == "Because you viewed 3 linen dresses this week. And 1 more pick inside."
    )
    for part in (email.html, email.text):
        assert "Hi Emma," in part
        assert "Popular in Tops right now" in part
        assert "Because you viewed 3 linen dresses this week" in part
    assert "\u20ac89.99" in email.text
    assert "\u00a31,250.00" in email.text
    assert "Linen Midi Dress \u2013 Sage" in email.html
    assert "https://shop.example.com/p/P1?utm_source=email&amp;utm_campaign=cmp_1" in email.html
    assert "https://shop.example.com/p/P1?utm_source=email&utm_campaign=cmp_1" in email.text
    assert 'href="https://shop.example.com/unsubscribe?u=cus_1&amp;t=abc"' in email.html
    assert "Unsubscribe: https://shop.example.com/unsubscribe?u=cus_1&t=abc" in email.text
    assert email.html.startswith("<!DOCTYPE html>")
    assert 'name="viewport"' in email.html
    assert "<style" not in email.html  # inline styles only


def test_without_a_name_or_products() -> None:
    email = render(customer(None), recs=[])
    assert email.subject == "New arrivals picked for you"
    assert "Hi there," in email.html
    assert "Hi there," in email.text
    assert email.preheader == "Fresh finds from the shop this week."


def test_single_category_subject_and_unknown_products_are_skipped() -> None:
    recs = [RECS[0], Recommendation("GONE", 0.3, "x", "popular")]
    email = render(recs=recs)
    assert email.subject == "Emma, new dresses picked for you"
    assert "GONE" not in email.html


def test_snapshot_records_what_produced_the_email() -> None:
    email = render(segments={"vip", "cart_abandoners"}, parameters={"recommend": {"k": 2}})
    snap = email.snapshot
    assert snap["customer_id"] == "cus_1"
    assert snap["campaign_id"] == "cmp_1"
    assert snap["as_of_ms"] == NOW
    assert snap["segments"] == ["cart_abandoners", "vip"]
    assert snap["profile"]["version"] == 7
    assert snap["profile"]["first_name"] == "Emma"
    assert snap["profile"]["category_shares"] == {"dresses": 0.75, "tops": 0.25}
    assert snap["profile"]["purchased"] == ["P9"]
    assert snap["send_time"]["send_at_ms"] == SEND.send_at_ms
    assert [r["reason"] for r in snap["recommendations"]] == [r.reason for r in RECS]
    assert snap["parameters"]["recommend"] == {"k": 2}
    assert snap["parameters"]["email"]["shop_name"] == "Shop"
    json.dumps(snap)  # storable as is


def test_the_snapshots_score_and_stage_are_as_of_the_email_like_its_segments() -> None:
    from pipeline.scoring import ScoringParams, intent_stage, interaction_score

    profile = customer()  # stored at its last event: cis 61.5
    later = NOW + 45 * 86_400_000
    snap = render(profile, as_of_ms=later).snapshot["profile"]
    params = ScoringParams()
    assert snap["cis"] == interaction_score(profile, later, params).score != profile.cis
    assert snap["intent_stage"] == intent_stage(profile, later, params)


def test_unsafe_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="unsubscribe_url"):
        render(unsubscribe_url="javascript:alert(1)")
    with pytest.raises(ValueError, match="unsubscribe_url"):
        render(unsubscribe_url="/relative")
    with pytest.raises(ValueError, match="shop_url"):
        render(params=EmailParams(shop_url="data:text/html,x"))
    assert render(unsubscribe_url="mailto:unsubscribe@example.com").html


def test_markup_in_names_and_reasons_is_escaped() -> None:
    attack = '<script>alert("x")</script>\''
    recs = [Recommendation("P1", 1.0, f"Because {attack}", "affinity")]
    email = render(customer(attack), recs=recs, products=catalog(f"Dress {attack}"))
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#39;" in email.html
    assert attack in email.text  # plain text is not HTML: shown verbatim


def test_line_breaks_cannot_forge_headers_or_lines() -> None:
    email = render(customer("Emma\r\nBcc: all@example.com"))
    assert "\n" not in email.subject and "\r" not in email.subject
    assert email.subject.startswith("Emma Bcc: all@example.com, ")
    assert "Hi Emma Bcc: all@example.com," in email.text


def test_urls_with_whitespace_or_control_characters_are_refused() -> None:
    # urlsplit drops tabs and line breaks before checking, so these used to pass the check and
    # reach the plain-text part with their line breaks.
    for url in (
        "https://shop.example.com/unsubscribe?u=1\r\nBcc: all@example.com",
        "https://shop.example.com/unsub scribe",
        "https://shop.example.com/\tx",
    ):
        with pytest.raises(ValueError, match="unsubscribe_url"):
            render(unsubscribe_url=url)
    with pytest.raises(ValueError, match="shop_url"):
        render(params=EmailParams(shop_url="https://shop.example.com\n/"))


def test_a_trailing_slash_in_the_shop_url_gives_no_double_slash() -> None:
    email = render(params=EmailParams(shop_url="https://shop.example.com/"))
    assert "https://shop.example.com/p/P1?utm_source=email&utm_campaign=cmp_1" in email.text
    assert "//p/" not in email.text and "//p/" not in email.html


def test_bidi_controls_in_a_name_cannot_reverse_the_subject() -> None:
    # U+202E (right-to-left override) would display the rest of the subject reversed.
    email = render(customer("\u202eEmma\u2066"))
    assert email.subject == "Emma, 2 picks for you, from dresses to tops"
    for part in (email.html, email.text):
        assert "\u202e" not in part and "\u2066" not in part
    arabic = render(customer("\u0633\u0627\u0631\u0629"))  # right-to-left text is kept
    assert arabic.subject.startswith("\u0633\u0627\u0631\u0629, ")


def test_a_very_long_first_name_is_left_out_of_the_subject() -> None:
    name = "Emma" * 125  # 500 characters, as the identify schema allows
    email = render(customer(name))
    assert email.subject == "2 picks for you, from dresses to tops"
    assert f"Hi {name}," in email.text  # the greeting still uses it
    assert render(customer("E" * 40)).subject.startswith("E" * 40 + ", ")


def test_a_currency_without_a_symbol_cannot_break_the_text_lines() -> None:
    products = Catalog(
        [Product("P1", "Dress", "dresses", "Linnea", "Sage", "linen", 10.0, "SEK\nX: 1", 5)]
    )
    email = render(recs=[RECS[0]], products=products)
    assert "1. Dress (Linnea, 10.00 SEK X: 1)" in email.text


MARK_OPEN, MARK_CLOSE = "\u27e6", "\u27e7"
texts = st.text(
    alphabet=st.characters(
        blacklist_characters=MARK_OPEN + MARK_CLOSE, blacklist_categories=["Cs"]
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(name=texts, product_name=texts, reason=texts)
def test_rendering_escapes_any_string(name: str, product_name: str, reason: str) -> None:
    values = [f"{MARK_OPEN}{v}{MARK_CLOSE}" for v in (name, product_name, reason)]
    recs = [Recommendation("P1", 1.0, values[2], "affinity")]
    email = render(customer(values[0]), recs=recs, products=catalog(values[1]))
    for value in values:
        shown = one_line(value)
        assert str(escape(shown)) in email.html
        if any(c in shown for c in "<>&\"'"):
            assert shown not in email.html
        assert shown in email.text
    assert "\n" not in email.subject


def test_a_null_or_empty_first_name_does_not_hide_the_other_spelling() -> None:
    from pipeline.emails.render import first_name

    for traits in (
        {"firstName": None, "first_name": "Emma"},
        {"firstName": " ", "first_name": "Emma"},
    ):
        profile = Profile(customer_id="c1", is_anonymous=False, traits=traits)
        assert first_name(profile) == "Emma"
    assert (
        first_name(Profile(customer_id="c1", is_anonymous=False, traits={"firstName": 3})) is None
    )
