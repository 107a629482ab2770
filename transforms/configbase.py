"""Building blocks of the typed configuration, shared by every module that declares a config section.

Kept apart from transforms/config.py so that modules defining their own sections (features, online
store, quality) can import these without importing the whole job config (which imports them back).
"""

from __future__ import annotations

import math
import re
import typing
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value) -> float:
    """'90s', '30m', '24h', '7d', '250ms' or a bare number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, not {value!r} (e.g. 90 or '90s')")
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError(
        f"{value!r} is not a duration: use a number of seconds or a string like '250ms', '90s', '30m', '24h', '7d'"
    )


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be a positive duration (zero has no meaning here), e.g. '90s', '30m', '1h'")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
# For durations where zero is meaningless (a window, a gap, a split period): a zero there made the job
# crash with a ZeroDivisionError after start-up instead of stopping at the config.
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _is_bool_field(annotation) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union and bool in typing.get_args(annotation))


class _Section(BaseModel):
    # Not strict as a whole: YAML lists must fill tuples and "90s" must fill durations. Booleans are the
    # exception (below): lax mode would take "yes", "on", 1 or "false"-as-typo for a switch.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_booleans(cls, data):
        """Every boolean key of every section takes only YAML true/false, like pydantic's StrictBool,
        applied here once so that a section added later cannot forget it. A non-boolean is swapped for
        a value no bool validator accepts, so the error still names the key path."""
        if isinstance(data, dict):
            bool_keys = {
                k for name, f in cls.model_fields.items() if _is_bool_field(f.annotation) for k in (name, f.alias) if k
            }
            bad = {k for k in bool_keys & data.keys() if data[k] is not None and not isinstance(data[k], bool)}
            if bad:
                data = {**data, **{k: _NotABool(data[k]) for k in bad}}
        return data


class _NotABool:
    def __init__(self, given):
        self.given = given

    def __repr__(self):
        return repr(self.given)
