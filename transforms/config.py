"""Typed job configuration, loaded and validated once on the launcher.

The YAML file maps onto the frozen pydantic models below. Unknown keys, wrong types and bad values
stop the job at start-up with the key path, what was given and what is allowed. Workers never read
the file: transforms receive the (picklable) models or plain values taken from them.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import typing
from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from transforms import contract
from transforms.configbase import Duration, PositiveDuration, _Section, parse_duration  # noqa: F401 - re-exported
from transforms.evaluation import EvaluationConfig, load_position_weights
from transforms.features_config import FeaturesConfig
from transforms.kafka_io import KafkaConfig
from transforms.online_store import OnlineStoreConfig
from transforms.quality import QualityConfig


class SchemaConfig(_Section):
    directory: str = Field("schemas", description="Folder of event.v<N>.avsc files, relative to the config file.")
    default_version: int = Field(2, ge=1, description="Version implied by an event without schema_version.")
    unknown_fields: Literal["reject", "ignore"] = "reject"


class ValidationConfig(_Section):
    event_types: tuple[str, ...] = contract.DEFAULT_EVENT_TYPES
    max_event_bytes: int = Field(32768, ge=256)
    min_event_time: str = Field("2000-01-01T00:00:00+00:00", description="Earliest plausible event time (ISO-8601).")
    max_clock_skew: Duration = Field(86400.0, description="How far in the future (vs job start) an event may be.")
    naive_timestamps: Literal["reject", "utc"] = Field(
        "reject", description="An ISO time without offset: reject it, or read it as UTC."
    )

    @field_validator("min_event_time")
    @classmethod
    def _iso_time(cls, v):
        from transforms.parse import parse_event_time

        try:
            parse_event_time(v, naive_as_utc=False)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not an ISO-8601 time with offset ({e}); use e.g. '2020-01-01T00:00:00Z'") from None
        return v

    @field_validator("event_types")
    @classmethod
    def _non_empty_unique(cls, v):
        if not v:
            raise ValueError("at least one event type is needed")
        if len(set(v)) != len(v):
            raise ValueError("event types must be unique")
        return v


class PrivacyConfig(_Section):
    key_env: str = Field("FEEDBACK_HMAC_KEY", description="Environment variable holding the HMAC key.")
    key_file: str | None = Field(None, description="File holding the HMAC key (e.g. a mounted secret).")
    allow_demo_key: StrictBool = Field(False, description="Use a built-in key when none is set. Local demos only.")
    pseudonymise_fields: tuple[Literal["user_id", "session_id", "request_id", "item_id"], ...] = (
        "user_id",
        "session_id",
    )
    ipv4_prefix: int = Field(24, ge=0, le=32)
    ipv6_prefix: int = Field(48, ge=0, le=128)


class LookupConfig(_Section):
    path: str | None = Field(None, description="CSV, JSONL or Avro file(s) (glob) of metadata rows.")
    key: str = Field(..., description="Column holding the join key.")


class EnrichmentConfig(_Section):
    items: LookupConfig = LookupConfig(key="item_id")
    users: LookupConfig = LookupConfig(key="user_id")
    experiments: LookupConfig = LookupConfig(key="experiment_id")


class DedupeConfig(_Section):
    horizon: PositiveDuration = Field(
        86400.0, description="Copies of an event_id this close in event time are duplicates."
    )


class BotConfig(_Section):
    crawler_user_agents: StrictBool = Field(True, description="Flag user agents matching the crawler-user-agents list.")
    extra_crawler_patterns: tuple[str, ...] = ()
    session_gap: Duration = Field(600.0, description="Inactivity gap that ends a user's activity run.")
    max_events_per_minute: int = Field(120, ge=1)
    sustained_minutes: int = Field(2, ge=1, description="Consecutive minutes above the rate that flag a run.")
    min_click_latency_ms: int = Field(
        200, ge=0, description="A click faster than this after its impression is superhuman."
    )
    min_superhuman_clicks: int = Field(3, ge=1, description="Superhuman clicks in one run that flag it.")
    cadence_max_cv: float = Field(
        0.2,
        gt=0,
        description="machine_cadence: a run whose inter-event intervals have a "
        "coefficient of variation below this is machine-steady.",
    )
    cadence_min_events: int = Field(60, ge=3, description="machine_cadence: events a run needs to be judged.")
    cadence_min_rate_per_s: float = Field(0.5, gt=0, description="machine_cadence: mean events/s a run needs.")
    cadence_min_duration: Duration = Field(120.0, description="machine_cadence: event-time span a run needs.")
    max_run_duration: Duration = Field(
        7200.0,
        description="A user's activity run (and session) is cut this long after its first event, so a "
        "streaming job holds a bounded run in state; batch cuts the same way. Bounds how far "
        "behind the watermark judged events are (max_run_duration + time.lateness).",
    )
    max_user_events: int = Field(
        100_000,
        ge=1000,
        description="Bound for huge users: a user with more events than this (batch: in the "
        "input; streaming: in one open run) is flagged sustained_rate by volume, "
        "without sorting its events.",
    )

    @field_validator("extra_crawler_patterns")
    @classmethod
    def _compiles(cls, v):
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {i} ({pattern!r}) is not a valid regular expression: {e}") from e
        return v

    @field_validator("session_gap")
    @classmethod
    def _gap_positive(cls, v):
        if v < 60:
            raise ValueError("session_gap must be at least 60s")
        return v

    @model_validator(mode="after")
    def _run_cap_holds_a_run(self):
        if self.max_run_duration < self.session_gap or self.max_run_duration < self.cadence_min_duration:
            raise ValueError("max_run_duration must be at least session_gap and cadence_min_duration")
        return self


class TimeConfig(_Section):
    lateness: PositiveDuration = Field(
        3600.0, description="An event arriving more than this after its event time is too_late."
    )
    arrival_field: str | None = Field(
        None,
        description="Batch input: top-level field holding the arrival time (an envelope field, removed "
        "before validation). Streaming uses the Pub/Sub publish time.",
    )
    event_time_attribute: str | None = Field(
        None, description="Streaming: Pub/Sub attribute holding the event time (default: the event_time field)."
    )
    early_firing: PositiveDuration | None = Field(None, description="Early panes every N seconds of processing time.")
    late_firings: StrictBool = True
    accumulation: Literal["accumulating", "discarding"] = "accumulating"
    output_window: WindowSpec = Field(default_factory=lambda: WindowSpec(), description="Windows of file outputs.")


class WindowSpec(_Section):
    type: Literal["fixed", "sliding", "session"] = "fixed"
    size: PositiveDuration = 300.0
    period: PositiveDuration | None = Field(None, description="sliding only")
    gap: PositiveDuration | None = Field(None, description="session only")

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "sliding" and not self.period:
            raise ValueError("a sliding window needs period")
        if self.type == "session" and not self.gap:
            raise ValueError("a session window needs gap")
        return self


class SessionConfig(_Section):
    gap: PositiveDuration = Field(
        1800.0, description="Inactivity gap that ends a session (session_id assigned where missing)."
    )
    split_every: PositiveDuration = Field(
        3600.0,
        description="Sessions and bot runs are also cut at these fixed event-time boundaries, so a streaming "
        "job can close them (like analytics tools' midnight split).",
    )


class LabelsConfig(_Section):
    window: PositiveDuration = Field(1800.0, description="Attribution window after the impression.")
    clock_skew: Duration = Field(
        5.0, description="An outcome with the exposure's request_id may precede it by this much."
    )
    outcome_types: tuple[str, ...] = ("click", "view", "dwell", "add_to_cart", "purchase", "skip")
    positive: dict[str, float] = Field(default_factory=lambda: {"purchase": 5.0, "add_to_cart": 3.0, "click": 1.0})
    negative: dict[str, float] = Field(default_factory=lambda: {"skip": 1.0})
    default_negative_weight: float = Field(1.0, ge=0)
    min_click_dwell_ms: int = Field(0, ge=0, description="A click with less dwell than this is not a positive.")
    position_weights: str | None = Field(
        None,
        description="position_weights.json (python -m pipelines.evaluate): positive labels' weight is "
        "multiplied by the inverse examination propensity of their position.",
    )

    @field_validator("position_weights")
    @classmethod
    def _weights_readable(cls, v):
        if v is not None:
            load_position_weights(v)  # ValueError names the file and the bad entry
        return v

    @model_validator(mode="after")
    def _types_are_outcomes(self):
        for name in (*self.positive, *self.negative):
            if name not in self.outcome_types:
                raise ValueError(f"{name!r} is weighted but not in outcome_types {list(self.outcome_types)}")
        return self


class OutputConfig(_Section):
    num_shards: int = Field(0, ge=0, description="Files per output; 0 lets the runner choose.")


TimeConfig.model_rebuild()


class JobConfig(_Section):
    schema_: SchemaConfig = Field(SchemaConfig(), alias="schema")
    validation: ValidationConfig = ValidationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    enrichment: EnrichmentConfig = EnrichmentConfig()
    dedupe: DedupeConfig = DedupeConfig()
    bots: BotConfig = BotConfig()
    time: TimeConfig = TimeConfig()
    sessions: SessionConfig = SessionConfig()
    labels: LabelsConfig = LabelsConfig()
    features: FeaturesConfig | None = Field(None, description="Windowed feature aggregates (off when absent).")
    online_store: OnlineStoreConfig | None = Field(None, description="Redis for online features (streaming).")
    kafka: KafkaConfig | None = Field(None, description="Kafka as the streaming job's source (instead of Pub/Sub).")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="SLO gates and drift.")
    output: OutputConfig = OutputConfig()
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="pipelines.evaluate: OPE, position bias, experiments, cold start."
    )
    # Where the file was read from; relative paths inside it resolve against this folder.
    base_dir: str = Field(".", exclude=True)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_position_weights(cls, data):
        # labels.position_weights is read while the labels section is validated, before resolve() exists:
        # make a relative path relative to the config file's folder here.
        labels = data.get("labels") if isinstance(data, dict) else None
        path = labels.get("position_weights") if isinstance(labels, dict) else None
        if isinstance(path, str) and "://" not in path and not os.path.isabs(path):
            data = {**data, "labels": {**labels, "position_weights": str(Path(data.get("base_dir", "."), path))}}
        return data

    def resolve(self, path: str | None) -> str | None:
        """A path from the file, made absolute against the config file's folder (URLs untouched)."""
        if path is None or "://" in path or os.path.isabs(path):
            return path
        return str(Path(self.base_dir, path))

    @property
    def schema(self) -> SchemaConfig:  # noqa: D401 - the YAML key is "schema"
        return self.schema_


class ConfigError(ValueError):
    """Bad configuration: says which key, what was wrong and what to do."""


def _format_errors(err: pydantic.ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            lines.append(f"  {path}: unknown key. Allowed here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        elif e["type"] == "bool_type":
            lines.append(f"  {path}: must be true or false (a YAML boolean, unquoted) (given: {given!r})")
        else:
            lines.append(f"  {path}: {e['msg']} (given: {given!r})")
    return "\n".join(lines)


def _allowed_keys(loc) -> list[str]:
    model = JobConfig
    for part in loc:
        field = None
        for name, f in model.model_fields.items():
            if part in (name, f.alias):
                field = f
        annotation = field.annotation if field is not None else None
        # Optional[Section] -> Section
        candidates = [annotation, *typing.get_args(annotation)]
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return sorted(f.alias or n for n, f in model.model_fields.items() if n != "base_dir")


def _model_in(annotation):
    """The config section (a pydantic model) an annotation holds, if any (Optional[Section] -> Section)."""
    for c in (annotation, *typing.get_args(annotation)):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _leaf_types(annotation) -> set:
    """The plain types an annotation accepts (Annotated, Optional and unions unwrapped)."""
    if annotation is None:
        return set()
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def _item_annotation(annotation, container: type):
    """The annotation of a dict's values or a tuple's/list's items, if the annotation says."""
    for c in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(c)
        if container is dict and origin is dict:
            return typing.get_args(c)[1]
        if container is list and origin in (tuple, list) and typing.get_args(c):
            return typing.get_args(c)[0]
    return None


def _value_problems(value, annotation, path: str, out: list) -> None:
    """The checks every value of the file gets, in one place, whatever section declares it: a float
    must be finite (YAML .nan / .inf), and a boolean is not a number (`num_shards: true`)."""
    if isinstance(value, float) and not math.isfinite(value):
        out.append((path, f"must be a finite number (given: {value!r})"))
    elif isinstance(value, bool):
        types = _leaf_types(annotation)
        if bool not in types and types & {int, float}:
            out.append((path, f"must be a number, not a boolean (given: {value!r})"))
    elif isinstance(value, dict):
        model = _model_in(annotation)
        for k, v in value.items():
            sub = None
            if model is not None:
                sub = next((f.annotation for n, f in model.model_fields.items() if k in (n, f.alias)), None)
            else:
                sub = _item_annotation(annotation, dict)
            _value_problems(v, sub, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        sub = _item_annotation(annotation, list)
        for i, v in enumerate(value):
            _value_problems(v, sub, f"{path}.{i}", out)


def _check_start(cfg: JobConfig, now: dt.datetime) -> list:
    """Values that make no sense at the job's start: an earliest plausible event time after it would
    make every event bad_timestamp."""
    from transforms.parse import parse_event_time

    problems = []
    if parse_event_time(cfg.validation.min_event_time, naive_as_utc=False) > now.timestamp() * 1000:
        problems.append(
            (
                "validation.min_event_time",
                f"is after the job's start ({now.isoformat(timespec='seconds')}): every event would be "
                f"bad_timestamp (given: {cfg.validation.min_event_time!r})",
            )
        )
    return problems


def config_from_dict(
    data: dict, source: str = "<dict>", base_dir: str = ".", now: dt.datetime | None = None
) -> JobConfig:
    """Validates a config mapping; raises ConfigError naming every bad key path. `now`: the job's start
    (default: the current time), for checks relative to it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration in {source}: the top level must be a mapping, got {type(data).__name__}"
        )
    problems: list = []
    _value_problems(data, JobConfig, "", problems)
    try:
        cfg = JobConfig.model_validate({**data, "base_dir": base_dir})
    except pydantic.ValidationError as e:
        message = _format_errors(e, source)
        reported = {".".join(str(p) for p in err["loc"]) for err in e.errors()}
        # pydantic's own line for a key stays (e.g. a duration's), except for a boolean given for a
        # number, which pydantic reads as 0/1 and judges as such ("should be >= 1 (given: False)").
        extra = [f"  {path}: {what}" for path, what in problems if path not in reported or "not a boolean" in what]
        raise ConfigError("\n".join([message, *extra])) from None
    problems += _check_start(cfg, now or dt.datetime.now(dt.timezone.utc))
    if problems:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *(f"  {p}: {w}" for p, w in problems)]))
    return cfg


class _StrictBoolLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2). PyYAML follows YAML 1.1, where unquoted yes,
    no, on, off, y and n are booleans too: `allow_demo_key: yes` or a list item `on` silently became
    True. Here they stay strings, and a boolean key given one is refused with its key path."""


_StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictBoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_config(path: str, now: dt.datetime | None = None) -> JobConfig:
    """Read and validate a YAML config file; raises ConfigError with the key path on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist (pass --config config/batch.yaml or another file)")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictBoolLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return config_from_dict(data, source=str(path), base_dir=str(p.parent.resolve()), now=now)
