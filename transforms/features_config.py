"""Configuration and row schema of the entity features (`transforms.features`): which entities and
sliding windows, the CTR prior, the decay half-life and engagement weights, and the feature row's columns.

Kept apart from the computation and the Parquet sink so that `transforms.config` (the launcher's
config loading) and `pipelines.pit_join` need not import Beam transforms to read it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from transforms import contract
from transforms.configbase import Duration, PositiveDuration, _Section

__all__ = [
    "SlidingWindowSpec",
    "FeaturesConfig",
    "EVENT_TYPES",
    "ENTITY_TYPES",
    "UNKNOWN_CATEGORY",
    "METRICS_NS",
    "KEY_COLUMNS",
    "FEATURE_COLUMNS",
    "ROW_COLUMNS",
    "features_for_entity",
]

METRICS_NS = "feedback.features"
EVENT_TYPES: tuple[str, ...] = tuple(contract.DEFAULT_EVENT_TYPES)
ENTITY_TYPES: tuple[str, ...] = ("user", "item", "user_category")
UNKNOWN_CATEGORY = "unknown"

# Column name -> type ("string", "int64", "float64"); the Parquet schema and pit_join are built from these.
KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("entity_type", "string"),
    ("entity_id", "string"),
    ("window", "string"),
    ("window_start", "int64"),
    ("window_end", "int64"),
)
FEATURE_COLUMNS: tuple[tuple[str, str], ...] = (
    *((f"n_{t}", "int64") for t in EVENT_TYPES),
    ("n_events", "int64"),
    ("ctr", "float64"),  # (clicks + alpha) / (impressions + alpha + beta)
    ("dwell_mean_ms", "float64"),  # None when the window has no dwell_ms value
    ("dwell_p50_ms", "float64"),
    ("dwell_p90_ms", "float64"),
    ("distinct_items", "int64"),  # user and user_category rows; None on item rows
    ("distinct_users", "int64"),  # item rows; None on user and user_category rows
    ("recency_s", "float64"),  # (window_end - last event time) / 1000
    ("decayed_engagement", "float64"),  # sum weight(type) * 0.5 ** ((window_end - t) / half_life)
)
ROW_COLUMNS = KEY_COLUMNS + FEATURE_COLUMNS


def features_for_entity(entity_type: str) -> tuple[str, ...]:
    """The feature columns that can be non-null for an entity type."""
    skip = "distinct_items" if entity_type == "item" else "distinct_users"
    return tuple(n for n, _ in FEATURE_COLUMNS if n != skip)


# --- configuration ---------------------------------------------------------------------------


def _format_ms(ms: int) -> str:
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms % factor == 0:
            return f"{ms // factor}{unit}"
    raise AssertionError(ms)


class SlidingWindowSpec(_Section):
    size: Duration
    period: Duration

    @model_validator(mode="after")
    def _check(self):
        if self.period <= 0:
            raise ValueError("period must be > 0")
        size_ms, period_ms = self.size * 1000, self.period * 1000
        if size_ms != round(size_ms) or period_ms != round(period_ms):
            raise ValueError("size and period must be whole milliseconds")
        if size_ms <= 0 or round(size_ms) % round(period_ms):
            raise ValueError(f"size ({self.size}s) must be a positive multiple of period ({self.period}s)")
        return self

    @property
    def size_ms(self) -> int:
        return round(self.size * 1000)

    @property
    def period_ms(self) -> int:
        return round(self.period * 1000)

    @property
    def label(self) -> str:
        """'1h/5m', '24h/1h': the `window` column of feature rows."""
        return f"{_format_ms(self.size_ms)}/{_format_ms(self.period_ms)}"

    @property
    def slug(self) -> str:
        """The label as an identifier: '1h_5m' (step labels, pit_join column prefixes)."""
        return self.label.replace("/", "_")


class FeaturesConfig(_Section):
    windows: tuple[SlidingWindowSpec, ...] = (
        SlidingWindowSpec(size=3600, period=300),
        SlidingWindowSpec(size=86400, period=3600),
    )
    ctr_prior_alpha: float = Field(1.0, gt=0, description="Beta prior pseudo-clicks.")
    ctr_prior_beta: float = Field(20.0, gt=0, description="Beta prior pseudo-non-clicks.")
    half_life: PositiveDuration = Field(21600.0, description="Half-life of the decayed engagement score.")
    engagement_weights: dict[str, float] = Field(
        default_factory=lambda: {"click": 1.0, "dwell": 0.5, "add_to_cart": 3.0, "purchase": 5.0}
    )
    entities: tuple[Literal["user", "item", "user_category"], ...] = ENTITY_TYPES
    allowed_lateness: Duration = 0.0

    @field_validator("windows")
    @classmethod
    def _unique_windows(cls, v):
        if not v:
            raise ValueError("at least one window is needed")
        labels = [w.label for w in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"window specs must be unique, got {labels}")
        return v

    @field_validator("engagement_weights")
    @classmethod
    def _known_types(cls, v):
        unknown = sorted(set(v) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        if not all(math.isfinite(w) for w in v.values()):
            raise ValueError("weights must be finite")
        return v

    @field_validator("entities")
    @classmethod
    def _unique_entities(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("entities must be non-empty and unique")
        return v
