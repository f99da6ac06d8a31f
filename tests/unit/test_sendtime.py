"""Unit tests of send-time optimization: the Dirichlet posterior, slot search and time zones."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.scoring import DAY_MS, HOUR_MS, Profile, hour_of_week_bin
from pipeline.sendtime import (
    BINS,
    SendTimeParams,
    best_send_time,
    default_prior,
    histogram,
    local_hour_starts,
    open_slot_ms,
    population_prior,
    posterior,
)
from pipeline.testing import T0_MS

UNIFORM = [1.0 / BINS] * BINS


def customer(hours: dict[str, float], tz: str | None = "UTC") -> Profile:
    return Profile(customer_id="c1", is_anonymous=False, hour_of_week=hours, timezone=tz)


def test_posterior_is_the_dirichlet_mean() -> None:
    counts = [0.0] * BINS
    counts[10] = 6.0
    theta = posterior(counts, UNIFORM, alpha=10.0)
    # (6 + 10/168) / (6 + 10) and (0 + 10/168) / 16
    assert theta[10] == pytest.approx((6 + 10 / 168) / 16)
    assert theta[11] == pytest.approx((10 / 168) / 16)
    assert math.fsum(theta) == pytest.approx(1.0)


def test_best_hour_with_confidence_from_personal_data() -> None:
    # T0 is Monday 00:00 UTC; bin 20 is Monday 20:00.
    sent = best_send_time(customer({"20": 5.0}), UNIFORM, at_ms=T0_MS)
    assert sent.send_at_ms == T0_MS + 20 * HOUR_MS
    assert sent.hour_of_week == 20
    assert sent.timezone == "UTC"
    assert sent.confidence == pytest.approx(5 / (5 + 10))
    assert sent.probability == pytest.approx((5 + 10 / 168) / 15)
    assert sent.observations == 5.0
    assert not sent.fallback
    assert sent.send_at.hour == 20


def test_slot_is_in_the_customers_time_zone() -> None:
    # In January Paris is UTC+1: Monday 20:00 local is 19:00 UTC.
    sent = best_send_time(customer({"20": 5.0}, "Europe/Paris"), UNIFORM, at_ms=T0_MS)
    assert sent.send_at_ms == T0_MS + 19 * HOUR_MS
    assert sent.local_time.hour == 20
    assert sent.local_time.weekday() == 0


def test_a_weekly_send_keeps_its_local_hour_across_daylight_saving() -> None:
    # T0 is Monday 1 January 2024; Paris moves to UTC+2 on 31 March, 13 weeks on is April
    sent = best_send_time(customer({"20": 5.0}, "Europe/Paris"), UNIFORM, at_ms=T0_MS)
    assert sent.weeks_later_ms(0) == sent.send_at_ms
    summer = sent.weeks_later_ms(13)
    assert summer == sent.send_at_ms + 13 * 7 * DAY_MS - HOUR_MS
    assert sent.weeks_later_ms(12) == sent.send_at_ms + 12 * 7 * DAY_MS  # still winter
    assert sent.local_time.hour == 20
    later = best_send_time(customer({"20": 5.0}, "Europe/Paris"), UNIFORM, at_ms=summer - HOUR_MS)
    assert later.send_at_ms == summer  # the slot chosen then is the same local hour


def test_half_hour_zone_slots_start_on_the_local_hour() -> None:
    sent = best_send_time(customer({"30": 2.0}, "Asia/Kolkata"), UNIFORM, at_ms=T0_MS)
    # Tuesday 06:00 in Kolkata (UTC+5:30) is Tuesday 00:30 UTC.
    assert sent.send_at_ms == T0_MS + DAY_MS + 30 * 60_000
    assert sent.local_time.minute == 0


def _ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def test_after_lord_howes_half_hour_shift_slots_still_start_on_the_local_hour() -> None:
    # Lord Howe Island: UTC+10:30, +11 from 02:00 local on Sunday 6 October 2024 (02:00 ->
    # 02:30); a Saturday evening as-of time, the best hour Sunday 20:00, after the change
    zone = ZoneInfo("Australia/Lord_Howe")
    at = _ms("2024-10-05T18:10:00+10:30")
    sent = best_send_time(
        customer({str(6 * 24 + 20): 5.0}, "Australia/Lord_Howe"), UNIFORM, at_ms=at
    )
    assert sent.send_at_ms == _ms("2024-10-06T20:00:00+11:00")
    assert (sent.local_time.hour, sent.local_time.minute) == (20, 0)
    # every slot of the week starts on a local hour but the one the gap cut short, which
    # starts where its hour begins to exist: 02:30
    starts = local_hour_starts(at, "Australia/Lord_Howe", 7 * 24)
    local = [datetime.fromtimestamp(ms / 1000, zone) for ms, _ in starts]
    assert [t.strftime("%a %H:%M") for t in local[5:9]] == [
        "Sun 00:00",
        "Sun 01:00",
        "Sun 02:30",
        "Sun 03:00",
    ]
    assert [t.minute for i, t in enumerate(local) if i != 7] == [0] * (len(local) - 1)
    assert [b for _, b in starts] == [t.weekday() * 24 + t.hour for t in local]


def test_after_lord_howes_half_hour_fall_back_no_slot_lands_on_a_half_hour() -> None:
    # Sunday 7 April 2024, 02:00 +11 -> 01:30 +10:30: local 01:00 lasts ninety minutes
    starts = local_hour_starts(_ms("2024-04-06T23:00:00+11:00"), "Australia/Lord_Howe", 6)
    zone = ZoneInfo("Australia/Lord_Howe")
    local = [datetime.fromtimestamp(ms / 1000, zone) for ms, _ in starts]
    assert [t.strftime("%H:%M") for t in local] == [
        "00:00",
        "01:00",
        "02:00",
        "03:00",
        "04:00",
        "05:00",
    ]
    assert starts[2][0] - starts[1][0] == 90 * 60_000


def test_an_hour_a_gap_cut_short_off_the_hour_starts_where_the_clocks_jumped() -> None:
    # St John's until 2010 jumped at 00:01 local: 00:01 -> 01:01 (2008), and 00:01 -> 02:01
    # in 1988's double daylight time; hour 01 (2008) and hour 02 (1988) begin at :01
    starts = local_hour_starts(_ms("2008-03-08T23:30:00-03:30"), "America/St_Johns", 3)
    assert starts == [
        (_ms("2008-03-09T00:00:00-03:30"), 6 * 24),
        (_ms("2008-03-09T01:01:00-02:30"), 6 * 24 + 1),
        (_ms("2008-03-09T02:00:00-02:30"), 6 * 24 + 2),
    ]
    starts = local_hour_starts(_ms("1988-04-02T23:30:00-03:30"), "America/St_Johns", 3)
    assert starts == [
        (_ms("1988-04-03T00:00:00-03:30"), 6 * 24),
        (_ms("1988-04-03T02:01:00-01:30"), 6 * 24 + 2),  # hour 01 never happened
        (_ms("1988-04-03T03:00:00-01:30"), 6 * 24 + 3),
    ]


def test_a_day_the_clocks_skip_has_no_slots() -> None:
    # Samoa moved across the date line: Thursday 29 December 2011, 23:59 -10:00 was followed
    # by Saturday 31 December, 00:00 +14:00
    starts = local_hour_starts(_ms("2011-12-29T22:30:00-10:00"), "Pacific/Apia", 3)
    assert starts == [
        (_ms("2011-12-29T23:00:00-10:00"), 3 * 24 + 23),
        (_ms("2011-12-31T00:00:00+14:00"), 5 * 24),
        (_ms("2011-12-31T01:00:00+14:00"), 5 * 24 + 1),
    ]


def test_an_hour_the_clocks_skip_is_no_slot_and_a_repeated_one_counts_once() -> None:
    # Paris, Sunday 31 March 2024: 02:00 -> 03:00; Sunday 27 October: 03:00 -> 02:00
    spring = local_hour_starts(_ms("2024-03-31T00:30:00+01:00"), "Europe/Paris", 3)
    assert [ms for ms, _ in spring] == [
        _ms("2024-03-31T01:00:00+01:00"),
        _ms("2024-03-31T03:00:00+02:00"),
        _ms("2024-03-31T04:00:00+02:00"),
    ]
    assert [b % 24 for _, b in spring] == [1, 3, 4]
    autumn = local_hour_starts(_ms("2024-10-27T00:30:00+02:00"), "Europe/Paris", 4)
    assert [ms for ms, _ in autumn] == [
        _ms("2024-10-27T01:00:00+02:00"),
        _ms("2024-10-27T02:00:00+02:00"),  # the first of the two 02:00s
        _ms("2024-10-27T03:00:00+01:00"),
        _ms("2024-10-27T04:00:00+01:00"),
    ]


@settings(max_examples=60, deadline=None)
@given(
    at=st.integers(min_value=T0_MS, max_value=T0_MS + 3 * 365 * DAY_MS),
    tz=st.sampled_from(
        [
            "UTC",
            "Europe/Paris",
            "America/New_York",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "Australia/Lord_Howe",
            "Pacific/Chatham",
            "America/St_Johns",
        ]
    ),
)
def test_every_slot_starts_a_local_hour_after_the_as_of_time(at: int, tz: str) -> None:
    starts = local_hour_starts(at, tz, 48)
    assert len(starts) == 48
    instants = [ms for ms, _ in starts]
    assert instants[0] > at and instants == sorted(set(instants))
    zone = ZoneInfo(tz)
    for ms, b in starts:
        local = datetime.fromtimestamp(ms / 1000, zone)
        assert b == hour_of_week_bin(ms, tz)
        # on the hour, or the first instant of an hour a gap cut short
        before = datetime.fromtimestamp((ms - 1) / 1000, zone)
        assert local.minute == 0 or before.hour != local.hour
    # no local hour start between the as-of time and the last slot is missed (15-min grid)
    first = at - at % (15 * 60_000) + 15 * 60_000
    grid = range(first, instants[-1], 15 * 60_000)
    on_the_hour = {t for t in grid if datetime.fromtimestamp(t / 1000, zone).minute == 0}
    assert on_the_hour <= set(instants) | {
        t for t in on_the_hour if datetime.fromtimestamp(t / 1000, zone).fold == 1
    }


def test_a_passed_slot_moves_to_next_week() -> None:
    at = T0_MS + 21 * HOUR_MS  # Monday 21:00, the Monday 20:00 slot has passed
    sent = best_send_time(customer({"20": 5.0}), UNIFORM, at_ms=at)
    assert sent.send_at_ms == T0_MS + 7 * DAY_MS + 20 * HOUR_MS


def test_the_slot_is_strictly_after_the_as_of_time() -> None:
    at = T0_MS + 20 * HOUR_MS  # exactly Monday 20:00
    sent = best_send_time(customer({"20": 5.0}), UNIFORM, at_ms=at)
    assert sent.send_at_ms == at + 7 * DAY_MS


def test_min_lead_time_is_respected() -> None:
    params = SendTimeParams(min_lead_minutes=90)
    sent = best_send_time(customer({}), UNIFORM, at_ms=T0_MS, params=params)
    assert sent.send_at_ms == T0_MS + 2 * HOUR_MS  # uniform prior: the first slot wins ties


def test_no_personal_data_falls_back_to_the_prior() -> None:
    prior = default_prior()
    sent = best_send_time(customer({}, None), prior, at_ms=T0_MS)
    assert sent.fallback
    assert sent.confidence == 0.0
    assert sent.timezone == "UTC"
    daily = SendTimeParams().default_daily_curve
    assert sent.local_time.hour == daily.index(max(daily))
    assert sent.probability == pytest.approx(max(prior))


def test_strong_prior_outweighs_little_data() -> None:
    prior = [0.0] * BINS
    prior[40] = 1.0
    sent = best_send_time(customer({"20": 1.0}), prior, at_ms=T0_MS)
    # theta_20 = 1 / 11 and theta_40 = 10 / 11
    assert sent.hour_of_week == 40
    assert sent.probability == pytest.approx(10 / 11)


def test_population_prior_counts_each_customer_once() -> None:
    params = SendTimeParams(prior_floor=0.0)
    heavy = customer({"0": 10.0})
    light = customer({"1": 1.0})
    prior = population_prior([heavy, light, customer({})], params)
    assert prior[0] == pytest.approx(0.5)
    assert prior[1] == pytest.approx(0.5)
    assert sum(prior) == pytest.approx(1.0)


def test_population_prior_mixes_in_a_uniform_floor() -> None:
    prior = population_prior([customer({"0": 1.0})], SendTimeParams(prior_floor=0.1))
    assert prior[0] == pytest.approx(0.9 + 0.1 / 168)
    assert prior[5] == pytest.approx(0.1 / 168)


def test_empty_population_gets_the_default_curve() -> None:
    prior = population_prior([])
    assert len(prior) == BINS
    assert math.fsum(prior) == pytest.approx(1.0)
    assert prior == default_prior()
    assert prior[20] > prior[3]  # Monday evening over Monday 03:00


def test_histogram_ignores_malformed_bins() -> None:
    counts = histogram(customer({"5": 2.0, "x": 1.0, "200": 1.0, "6": -1.0}))
    assert counts[5] == 2.0
    assert math.fsum(counts) == 2.0


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        SendTimeParams(alpha=0)
    with pytest.raises(ValidationError):
        SendTimeParams(default_daily_curve=(1.0,) * 23)
    with pytest.raises(ValidationError):
        SendTimeParams(horizons_days=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="167 bins"):
        best_send_time(customer({}), UNIFORM[:-1], at_ms=T0_MS)


ZONES = ["UTC", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]


@settings(max_examples=60, deadline=None)
@given(
    at=st.integers(T0_MS, T0_MS + 3 * 365 * DAY_MS),
    tz=st.sampled_from(ZONES),
    hours=st.dictionaries(st.integers(0, BINS - 1).map(str), st.floats(0.1, 50.0), max_size=6),
)
def test_slot_is_a_local_hour_start_within_the_horizon(
    at: int, tz: str, hours: dict[str, float]
) -> None:
    sent = best_send_time(customer(hours, tz), default_prior(), at_ms=at)
    # the horizon is 168 local hours: one more of UTC when the clocks fall back in it
    assert at < sent.send_at_ms <= at + 7 * DAY_MS + HOUR_MS
    assert sent.local_time.minute == 0
    assert hour_of_week_bin(sent.send_at_ms, tz) == sent.hour_of_week
    assert 0.0 <= sent.confidence < 1.0
    assert sent.fallback == (not hours)


def test_a_send_time_is_kept_while_its_hour_lasts() -> None:
    slot = T0_MS + 20 * HOUR_MS
    assert open_slot_ms(slot, slot - HOUR_MS, "UTC") == slot  # early: the queue holds it
    assert open_slot_ms(slot, slot + HOUR_MS - 1, "UTC") == slot


def test_a_missed_send_time_moves_to_that_local_hour_of_the_next_open_day() -> None:
    slot = T0_MS + 20 * HOUR_MS  # Monday 20:00
    assert open_slot_ms(slot, slot + HOUR_MS, "UTC") == slot + DAY_MS
    assert open_slot_ms(slot, slot + DAY_MS + 30 * 60_000, "UTC") == slot + DAY_MS  # it is on
    assert open_slot_ms(slot, slot + 10 * DAY_MS + 2 * HOUR_MS, "UTC") == slot + 11 * DAY_MS


def test_a_missed_send_time_keeps_its_local_hour_across_daylight_saving() -> None:
    york = ZoneInfo("America/New_York")
    slot = round(datetime(2024, 3, 9, 19, tzinfo=york).timestamp() * 1000)  # the eve of DST
    later = open_slot_ms(slot, slot + 3 * HOUR_MS, "America/New_York")
    assert later == slot + 23 * HOUR_MS  # the clocks sprang forward overnight
    assert datetime.fromtimestamp(later / 1000, york).hour == 19


@settings(max_examples=300, deadline=None)
@given(
    slot_hours=st.integers(0, 24 * 400),
    late_minutes=st.integers(0, 60 * 24 * 30),
    tz=st.sampled_from(["UTC", "Europe/London", "America/New_York", "Australia/Lord_Howe"]),
)
def test_a_moved_send_time_is_the_first_open_one_at_the_same_local_time(
    slot_hours: int, late_minutes: int, tz: str
) -> None:
    zone = ZoneInfo(tz)
    slot = T0_MS + slot_hours * HOUR_MS
    now = slot + late_minutes * 60_000
    moved = open_slot_ms(slot, now, tz)
    assert now < moved + HOUR_MS  # its hour has not ended
    if moved == slot:
        return
    local, before = (datetime.fromtimestamp(t / 1000, zone) for t in (moved, slot))
    days = (local.date() - before.date()).days
    assert days >= 1
    if local.utcoffset() == before.utcoffset():  # (else a gap or a jump moved the wall clock)
        assert (local.hour, local.minute) == (before.hour, before.minute)
    # the day before had ended (or was the missed slot itself)
    previous = round((before + timedelta(days=days - 1)).timestamp() * 1000)
    assert now >= previous + HOUR_MS
