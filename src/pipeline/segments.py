"""Declarative customer segments: rules over profile facts at an as-of time, loaded from YAML.

A rule file looks like::

    version: 1
    segments:
      - name: cart_abandoners
        description: Added to cart in the last 24 h, cart not empty, no order since.
        all:
          - {field: hours_since_last_cart, op: le, value: 24}
          - {field: cart_items, op: gt, value: 0}
          - {field: ordered_since_last_cart, op: eq, value: false}

A customer is in a segment when every ``all`` condition holds and, if ``any`` is given, at
least one ``any`` condition holds. Conditions read *facts* (:data:`FACTS`): stored profile
fields and values derived at the as-of time (elapsed times, the decayed interaction score).
A comparison with a missing fact (a customer who never added to cart has no
``hours_since_last_cart``) is false; ``is_null``/``not_null`` test for missing facts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.errors import SegmentRuleError
from pipeline.scoring import (
    DAY_MS,
    HOUR_MS,
    Profile,
    ScoringParams,
    affinity_shares,
    intent_stage,
    interaction_score,
)

DEFAULT_SEGMENTS_PATH = Path(__file__).with_name("segments.yaml")
_DEFAULT_SCORING = ScoringParams()

FactKind = Literal["number", "bool", "str"]
FactValue = float | int | bool | str | None
Operator = Literal["lt", "le", "gt", "ge", "eq", "ne", "in", "not_in", "is_null", "not_null"]

_ORDER_OPS = frozenset({"lt", "le", "gt", "ge"})
_EQUALITY_OPS = frozenset({"eq", "ne"})
_MEMBER_OPS = frozenset({"in", "not_in"})
_NULL_OPS = frozenset({"is_null", "not_null"})
_OPS_BY_KIND: dict[FactKind, frozenset[str]] = {
    "number": _ORDER_OPS | _EQUALITY_OPS | _MEMBER_OPS | _NULL_OPS,
    "bool": _EQUALITY_OPS | _NULL_OPS,
    "str": _EQUALITY_OPS | _MEMBER_OPS | _NULL_OPS,
}


@dataclass(frozen=True, slots=True)
class _Context:
    """What a fact is computed from: the profile, the as-of time and the scoring parameters."""

    profile: Profile
    at_ms: int
    scoring: ScoringParams


def _elapsed(ctx: _Context, since_ms: int | None, unit_ms: int) -> float | None:
    """Time from ``since_ms`` to the as-of time in ``unit_ms`` units (never negative)."""
    if since_ms is None:
        return None
    return max(0, ctx.at_ms - since_ms) / unit_ms


def _ordered_since_last_cart(ctx: _Context) -> bool | None:
    p = ctx.profile
    if p.last_cart_ms is None:
        return None
    return p.last_order_ms is not None and p.last_order_ms >= p.last_cart_ms


def _top_category(ctx: _Context) -> str | None:
    shares = affinity_shares(ctx.profile.category_affinity)
    return next(iter(shares), None)


def _first_name(ctx: _Context) -> str | None:
    traits = ctx.profile.traits
    name = traits.get("firstName", traits.get("first_name"))
    return name if isinstance(name, str) and name else None


@dataclass(frozen=True, slots=True)
class Fact:
    """A named value a rule may test: its kind, what it means, and how to compute it."""

    kind: FactKind
    description: str
    compute: Callable[[_Context], FactValue]


FACTS: Mapping[str, Fact] = {
    "cis": Fact(
        "number",
        "Customer Interaction Score (0..100) decayed to the as-of time",
        lambda c: interaction_score(c.profile, c.at_ms, c.scoring).score,
    ),
    "intent_stage": Fact(
        "str",
        "browsing / cart / purchased / lapsed at the as-of time",
        lambda c: intent_stage(c.profile, c.at_ms, c.scoring),
    ),
    "is_anonymous": Fact(
        "bool", "device not yet tied to a customer", lambda c: c.profile.is_anonymous
    ),
    "has_email": Fact(
        "bool",
        "an email trait is known (the customer can be emailed)",
        lambda c: bool(c.profile.traits.get("email")),
    ),
    "first_name": Fact("str", "firstName trait", _first_name),
    "timezone": Fact("str", "IANA time zone", lambda c: c.profile.timezone),
    "event_count": Fact(
        "number", "events folded into the profile", lambda c: c.profile.event_count
    ),
    "sessions": Fact("number", "sessions seen", lambda c: c.profile.sessions),
    "product_views": Fact(
        "number",
        "Product Viewed events ever",
        lambda c: c.profile.counts.get("Product Viewed", 0),
    ),
    "recent_views_count": Fact(
        "number",
        "distinct products in the recently-viewed list (capped by ScoringParams.recent_views_kept)",
        lambda c: len(c.profile.recent_views),
    ),
    "signed_up": Fact(
        "bool", "a Signed Up event was seen", lambda c: c.profile.counts.get("Signed Up", 0) > 0
    ),
    "order_count": Fact("number", "orders ever", lambda c: c.profile.order_count),
    "revenue_total": Fact("number", "revenue ever (EUR)", lambda c: c.profile.revenue_total),
    "cart_items": Fact("number", "units in the cart now", lambda c: sum(c.profile.cart.values())),
    "ordered_since_last_cart": Fact(
        "bool", "an order is no older than the last add-to-cart", _ordered_since_last_cart
    ),
    "top_category": Fact("str", "category with the largest decayed affinity", _top_category),
    "hours_since_last_cart": Fact(
        "number",
        "hours since the last add-to-cart",
        lambda c: _elapsed(c, c.profile.last_cart_ms, HOUR_MS),
    ),
    "hours_since_last_order": Fact(
        "number",
        "hours since the last order",
        lambda c: _elapsed(c, c.profile.last_order_ms, HOUR_MS),
    ),
    "days_since_last_order": Fact(
        "number",
        "days since the last order",
        lambda c: _elapsed(c, c.profile.last_order_ms, DAY_MS),
    ),
    "days_since_last_view": Fact(
        "number",
        "days since the last product view",
        lambda c: _elapsed(c, c.profile.last_view_ms, DAY_MS),
    ),
    "days_since_last_seen": Fact(
        "number",
        "days since the newest event",
        lambda c: _elapsed(c, c.profile.last_seen_ms, DAY_MS),
    ),
    "days_since_first_seen": Fact(
        "number",
        "days since the oldest event",
        lambda c: _elapsed(c, c.profile.first_seen_ms, DAY_MS),
    ),
}


_Test = Callable[[FactValue], bool]
_Step = tuple[str, Callable[["_Context"], FactValue], _Test]  # fact name, how to compute, test
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "eq": operator.eq,
    "ne": operator.ne,
}


def _compile_test(op: Operator, target: Any) -> _Test:
    """The test of one condition as a closure: rules are evaluated on every profile update."""
    if op == "is_null":
        return lambda value: value is None
    if op == "not_null":
        return lambda value: value is not None
    if op == "in":
        return lambda value: value is not None and value in target
    if op == "not_in":
        return lambda value: value is not None and value not in target
    compare = _COMPARE[op]
    return lambda value: value is not None and compare(value, target)


class Condition(BaseModel):
    """One test of a fact: ``field op value``; ``is_null``/``not_null`` take no value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    op: Operator
    value: bool | float | str | list[float] | list[str] | None = None
    _test: _Test = PrivateAttr()

    @model_validator(mode="after")
    def _check(self) -> Condition:
        fact = FACTS.get(self.field)
        if fact is None:
            raise ValueError(
                f"unknown field {self.field!r}; known fields: {', '.join(sorted(FACTS))}"
            )
        if self.op not in _OPS_BY_KIND[fact.kind]:
            allowed = ", ".join(sorted(_OPS_BY_KIND[fact.kind]))
            raise ValueError(
                f"operator {self.op!r} does not apply to {fact.kind} field {self.field!r}; "
                f"use one of {allowed}"
            )
        value = self.value
        if self.op in _NULL_OPS:
            if value is not None:
                raise ValueError(f"operator {self.op!r} takes no value")
        elif self.op in _MEMBER_OPS:
            if not isinstance(value, list) or not value:
                raise ValueError(f"operator {self.op!r} needs a non-empty list value")
            if not all(_fits(fact.kind, v) for v in value):
                raise ValueError(f"{self.field!r} is a {fact.kind}: list {value!r} does not fit")
        elif not _fits(fact.kind, value):
            raise ValueError(f"{self.field!r} is a {fact.kind}: value {value!r} does not fit")
        self._test = _compile_test(self.op, value)
        return self

    def holds(self, value: FactValue) -> bool:
        """Whether the condition is true of ``value``; false for a missing value unless null ops."""
        return self._test(value)


def _fits(kind: FactKind, value: object) -> bool:
    """Whether a rule's literal has the kind of the fact it is compared with."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class SegmentRule(BaseModel):
    """A named segment: all ``all`` conditions and (when given) one of the ``any`` conditions."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    description: str = ""
    label: str | None = None
    all_of: tuple[Condition, ...] = Field(default=(), alias="all")
    any_of: tuple[Condition, ...] = Field(default=(), alias="any")

    @model_validator(mode="after")
    def _not_empty(self) -> SegmentRule:
        if not self.all_of and not self.any_of:
            raise ValueError("a segment needs at least one condition under 'all' or 'any'")
        return self

    @property
    def title(self) -> str:
        """A human label for reports and emails: ``label`` or the name in words."""
        return self.label or self.name.replace("_", " ").capitalize()

    def matches(self, facts: Mapping[str, FactValue]) -> bool:
        """Whether a customer with these facts belongs to the segment."""
        if not all(c.holds(facts[c.field]) for c in self.all_of):
            return False
        return not self.any_of or any(c.holds(facts[c.field]) for c in self.any_of)


class _SegmentFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    segments: list[dict[str, Any]]


def _describe(error: ValidationError) -> str:
    """Pydantic's errors as one line: ``location: message`` joined by semicolons."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] != "value_error" and isinstance(given, str | int | float):
            message = f"{message}, got {given!r}"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_segments(document: object, source: str = "<rules>") -> list[SegmentRule]:
    """Validate a parsed rule document; errors raise :class:`SegmentRuleError` naming the rule."""
    try:
        parsed = _SegmentFile.model_validate(document)
    except ValidationError as exc:
        raise SegmentRuleError(f"{source}: {_describe(exc)}") from None
    rules: list[SegmentRule] = []
    seen: set[str] = set()
    for index, raw in enumerate(parsed.segments):
        name = raw.get("name")
        label = repr(name) if isinstance(name, str) else f"#{index + 1}"
        try:
            rule = SegmentRule.model_validate(raw)
        except ValidationError as exc:
            raise SegmentRuleError(f"{source}: segment {label}: {_describe(exc)}") from None
        if rule.name in seen:
            raise SegmentRuleError(f"{source}: segment {label}: duplicate name")
        seen.add(rule.name)
        rules.append(rule)
    return rules


def load_segments(path: Path | str | None = None) -> list[SegmentRule]:
    """Read and validate a YAML rule file (default: the packaged ``segments.yaml``)."""
    source = DEFAULT_SEGMENTS_PATH if path is None else Path(path)
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SegmentRuleError(f"{source}: cannot read segment rules: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SegmentRuleError(f"{source}: not valid YAML: {exc}") from exc
    return parse_segments(document, str(source))


def profile_facts(
    profile: Profile,
    at_ms: int,
    *,
    fields: Iterable[str] | None = None,
    scoring: ScoringParams | None = None,
) -> dict[str, FactValue]:
    """The facts of ``profile`` at ``at_ms`` (all, or only ``fields``): what rules see."""
    ctx = _Context(profile, at_ms, scoring or _DEFAULT_SCORING)
    names = FACTS if fields is None else fields
    return {name: FACTS[name].compute(ctx) for name in names}


def _steps(conditions: Sequence[Condition]) -> tuple[_Step, ...]:
    return tuple((c.field, FACTS[c.field].compute, c._test) for c in conditions)


class SegmentPlan:
    """Rules compiled once for evaluation on every profile update (the stream's hot path).

    Facts are computed on first use and at most once per evaluation, and a rule stops at its
    first failing ``all`` condition, so most rules read one or two cheap facts.
    """

    __slots__ = ("_plan", "rules")

    def __init__(self, rules: Sequence[SegmentRule]) -> None:
        self.rules = tuple(rules)
        self._plan = tuple((r.name, _steps(r.all_of), _steps(r.any_of)) for r in self.rules)

    def evaluate(
        self, profile: Profile, at_ms: int, *, scoring: ScoringParams | None = None
    ) -> frozenset[str]:
        """Names of the segments ``profile`` belongs to at ``at_ms``."""
        ctx = _Context(profile, at_ms, scoring or _DEFAULT_SCORING)
        facts: dict[str, FactValue] = {}
        members: list[str] = []
        for name, all_of, any_of in self._plan:
            if _all_hold(all_of, ctx, facts) and (not any_of or _any_holds(any_of, ctx, facts)):
                members.append(name)
        return frozenset(members)


def _all_hold(steps: tuple[_Step, ...], ctx: _Context, facts: dict[str, FactValue]) -> bool:
    for name, compute, test in steps:
        value = facts[name] if name in facts else facts.setdefault(name, compute(ctx))
        if not test(value):
            return False
    return True


def _any_holds(steps: tuple[_Step, ...], ctx: _Context, facts: dict[str, FactValue]) -> bool:
    for name, compute, test in steps:
        value = facts[name] if name in facts else facts.setdefault(name, compute(ctx))
        if test(value):
            return True
    return False


def evaluate(
    profile: Profile,
    at_ms: int,
    rules: Sequence[SegmentRule] | SegmentPlan,
    *,
    scoring: ScoringParams | None = None,
) -> frozenset[str]:
    """Names of the segments ``profile`` belongs to at ``at_ms`` (see :class:`SegmentPlan`)."""
    plan = rules if isinstance(rules, SegmentPlan) else SegmentPlan(rules)
    return plan.evaluate(profile, at_ms, scoring=scoring)


def diff(before: frozenset[str], after: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """``(entered, exited)``: segments in ``after`` only, and in ``before`` only."""
    return after - before, before - after
