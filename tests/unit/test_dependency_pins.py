"""Every direct dependency (runtime and dev) is pinned to one exact version in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,.-]+\])?==[0-9][A-Za-z0-9.+!-]*$")


def _requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(r for group in extras.values() for r in group)]


def test_every_direct_dependency_is_pinned_with_double_equals() -> None:
    requirements = _requirements()
    assert len(requirements) > 20
    loose = [r for r in requirements if not PINNED.match(r.replace(" ", ""))]
    assert loose == []


def test_no_dependency_is_listed_twice() -> None:
    names = [
        re.split(r"[\[=<>!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in _requirements()
    ]
    assert len(names) == len(set(names))


def test_pin_pattern_refuses_ranges_and_urls() -> None:
    for loose in (
        "pandas>=2",
        "orjson~=3.1",
        "pkg==1.*",
        "pkg @ https://x/y.whl",
        "pkg",
        "a==1,<2",
    ):
        assert not PINNED.match(loose), loose
    assert PINNED.match("pyjwt[crypto]==2.15.1")
