"""Durations as people write them in config files: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``,
``"1h30m"`` or a plain number of seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Return seconds for a duration; raise ValueError with a hint when it is not one."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or a number of seconds")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{value} seconds is too long a duration") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"{value!r} is not a duration: use forms like 500ms, 30s, 5m, 1h or seconds"
                ) from None
    else:
        raise ValueError("expected a duration such as 30s, 5m or a number of seconds")
    if math.isnan(seconds):
        raise ValueError("NaN is not a duration: use forms like 500ms, 30s, 5m, 1h or seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of ``1h``, ``5m``, ``30s``, ``250ms`` that states ``seconds`` exactly."""
    for unit in ("h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: accepts the forms above, stores seconds."""
