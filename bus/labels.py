"""Label selectors, shared by discovery matchers, agent resource matchers and ``db ls``.

A selector maps label keys to one value or a list of values:

* every key must be present in the labels, and its value must match one of the values;
* ``"*"`` matches any value; ``prod-*`` and ``stag?`` are globs; ``^prod-[0-9]+$`` (starts
  with ``^`` and ends with ``$``) is an anchored regular expression;
* ``{"*": "*"}`` matches everything; an empty selector matches nothing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

Selector = Mapping[str, str | Sequence[str]]

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}$")
"""A valid label key: what AWS tags commonly use, without spaces or control characters."""


def is_valid_label_key(key: str) -> bool:
    """True when ``key`` may be used as a label key."""
    return bool(LABEL_KEY_RE.match(key))


def values_of(value: str | Sequence[str]) -> tuple[str, ...]:
    """A selector value as a tuple: ``"a"`` -> ``("a",)``."""
    return (value,) if isinstance(value, str) else tuple(value)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("^") and pattern.endswith("$"):
        return re.compile(pattern)
    return re.compile(fnmatch.translate(pattern))


def check_selector(selector: Selector) -> None:
    """Raise ValueError naming the bad part of a selector (bad regex, empty list, ...)."""
    for key, raw in selector.items():
        values = values_of(raw)
        if not values:
            raise ValueError(f"label {key!r}: give at least one value (or '*' for any)")
        if key == "*" and values != ("*",):
            raise ValueError("the key '*' only takes the value '*' ({'*': '*'} matches all)")
        for value in values:
            if not isinstance(value, str):
                raise ValueError(f"label {key!r}: values must be strings, got {value!r}")
            try:
                _compile(value)
            except re.error as exc:
                raise ValueError(f"label {key!r}: {value!r} is not a valid regex: {exc}") from None


def value_matches(pattern: str, value: str) -> bool:
    """Whether one selector value matches one label value."""
    if pattern == "*" or pattern == value:
        return True
    return _compile(pattern).fullmatch(value) is not None


def matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy ``selector`` (semantics in the module docstring)."""
    if not selector:
        return False
    for key, raw in selector.items():
        if key == "*":
            continue
        have = labels.get(key)
        if have is None:
            return False
        if not any(value_matches(p, have) for p in values_of(raw)):
            return False
    return True


def parse_label_filter(text: str) -> dict[str, list[str]]:
    """``"env=prod,team=a|b"`` -> ``{"env": ["prod"], "team": ["a", "b"]}`` (for CLIs)."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not KEY=VALUE (example: --labels env=prod,region=us-*)")
        out.setdefault(key.strip(), []).extend(v.strip() for v in value.split("|"))
    check_selector(out)
    return out


# Label keys every process agrees on (agents and roles select on them).
LABEL_ACCOUNT_ID = "account-id"
LABEL_REGION = "region"
LABEL_ENGINE = "engine"
LABEL_ENGINE_VERSION = "engine-version"
LABEL_ENDPOINT_TYPE = "endpoint-type"
LABEL_VPC_ID = "vpc-id"
LABEL_CLOUD = "fleetgate.dev/cloud"
LABEL_ORIGIN = "fleetgate.dev/origin"
LABEL_DISCOVERY_TYPE = "fleetgate.dev/discovery-type"
LABEL_DISCOVERED_NAME = "fleetgate.dev/discovered-name"
LABEL_DISCOVERY_GROUP = "fleetgate.dev/discovery-group"
