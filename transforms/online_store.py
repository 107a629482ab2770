"""Online feature store: windowed feature rows -> Redis hashes, newest window wins.

Layout: one hash per (entity_type, window spec, entity_id), key
`{prefix}:{entity_type}:{window}:{entity_id}` (e.g. `feat:user:1h/5m:u42`). Its fields are the row's
feature columns as decimal text plus `_window_start` and `_window_end` (epoch ms). Every accepted write
replaces the whole hash and resets its TTL, so a hash is always exactly one row: a feature that is None
in that row is absent from the hash (the reader leaves it out), never a value left over from another window.

Writes go through a Lua script, so the check and the write are one atomic step on the server: a row
whose window_end is older than the stored `_window_end` is skipped (a late or replayed pane can never
overwrite newer features); an equal window_end overwrites (an updated pane of the same window). Writes
are therefore idempotent, and a bundle retried by the runner rewrites the same values.

The password never travels in the pipeline graph: the config names an environment variable that is
read on the worker in `setup()` (call `make_client(cfg).ping()` on the launcher to fail fast).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from collections.abc import Iterable

import apache_beam as beam
import redis
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue
from pydantic import Field, field_validator

from transforms.configbase import Duration, _Section

__all__ = [
    "OnlineStoreConfig",
    "WriteOnlineFeatures",
    "MissingPasswordError",
    "make_client",
    "feature_key",
    "redis_key",
    "row_to_mapping",
    "read_features",
    "ROW_KEYS",
    "WINDOW_START_FIELD",
    "WINDOW_END_FIELD",
]

METRICS_NS = "feedback.online_store"
DEFAULT_PREFIX = "feat"
ENTITY_TYPES = ("user", "item", "user_category")  # what the feature job emits today; not enforced here
ROW_KEYS = ("entity_type", "entity_id", "window", "window_start", "window_end")  # every other column is a feature
WINDOW_START_FIELD = "_window_start"
WINDOW_END_FIELD = "_window_end"

# Socket timeouts for the worker's client. Connection errors are retried by redis-py's default Retry,
# then raised so the runner retries the bundle.
_SOCKET_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
_INT_RE = re.compile(r"^[+-]?\d+$")
_log = logging.getLogger(__name__)

# KEYS[1] = hash key; ARGV[1] = incoming window_end (ms); ARGV[2] = TTL (ms); ARGV[3..] = field, value, ...
# (the pairs always include _window_end and _window_start). Returns 1 when written, 0 when skipped.
# Epoch milliseconds (< 2^53) are exact in Lua's double-precision numbers.
WRITE_IF_NOT_OLDER_LUA = """
local incoming = tonumber(ARGV[1])
local stored = tonumber(redis.call('HGET', KEYS[1], '_window_end'))
if stored and incoming < stored then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class OnlineStoreConfig(_Section):
    host: str = "localhost"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    key_prefix: str = Field(
        DEFAULT_PREFIX,
        min_length=1,
        description="First part of every key: <prefix>:<entity_type>:<window>:<entity_id>.",
    )
    ttl: Duration = Field(7 * 86400.0, description="Expiry set on every write ('7d', '36h', seconds).")
    password_env: str | None = Field(
        None, description="Environment variable holding the Redis password, read on the worker. None: no AUTH."
    )
    batch_size: int = Field(500, ge=1, description="Rows per pipelined round trip to Redis.")

    @field_validator("ttl")
    @classmethod
    def _ttl_positive(cls, v):
        if v <= 0:
            raise ValueError("ttl must be > 0")
        return v

    @property
    def ttl_ms(self) -> int:
        return max(1, math.ceil(self.ttl * 1000))


class MissingPasswordError(RuntimeError):
    """online_store.password_env names a variable that is not set: do not connect without AUTH."""


def make_client(cfg: OnlineStoreConfig) -> redis.Redis:
    """A client for `cfg`; the password, if any, is read from the environment now (on the worker)."""
    password = None
    if cfg.password_env:
        password = os.environ.get(cfg.password_env) or None
        if password is None:
            raise MissingPasswordError(
                f"online_store.password_env is {cfg.password_env!r}, but that environment variable is not set "
                f"(or is empty) on this machine"
            )
    return redis.Redis(
        host=cfg.host,
        port=cfg.port,
        db=cfg.db,
        password=password,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
    )


# --- pure helpers -----------------------------------------------------------------------------


def feature_key(entity_type: str, window: str, entity_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """'feat:user:1h/5m:u42'. entity_type and window may not contain ':' (entity_id may: it is last)."""
    for name, value in (("entity_type", entity_type), ("window", window), ("entity_id", entity_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string: {value!r}")
    for name, value in (("entity_type", entity_type), ("window", window)):
        if ":" in value:
            raise ValueError(f"{name} must not contain ':': {value!r}")
    return f"{prefix}:{entity_type}:{window}:{entity_id}"


def redis_key(row: dict, prefix: str = DEFAULT_PREFIX) -> str:
    """The hash key of a feature row."""
    try:
        return feature_key(row["entity_type"], row["window"], row["entity_id"], prefix)
    except KeyError as e:
        raise ValueError(f"feature row without {e.args[0]!r}: {row!r}") from None


def _format_number(name: str, value) -> str:
    if isinstance(value, numbers.Integral):  # int, bool, numpy integers
        return str(int(value))
    if isinstance(value, numbers.Real):  # float, numpy floats; repr round-trips exactly
        return repr(float(value))
    raise TypeError(f"feature {name!r} must be a number or None, not {type(value).__name__}: {value!r}")


def _window_ms(row: dict, name: str) -> int:
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"feature row needs {name} as integer epoch ms, got {value!r}")
    return int(value)


def row_to_mapping(row: dict) -> dict[str, str]:
    """The hash fields of a row: each non-None feature as decimal text, plus _window_start/_window_end (ms).

    None features are omitted; since an accepted write replaces the whole hash, they read back as missing.
    """
    start, end = _window_ms(row, "window_start"), _window_ms(row, "window_end")
    if end < start:
        raise ValueError(f"window_end {end} is before window_start {start}")
    mapping = {}
    for name, value in row.items():
        if name in ROW_KEYS or value is None:
            continue
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise ValueError(f"feature names must be non-empty and must not start with '_': {name!r}")
        mapping[name] = _format_number(name, value)
    mapping[WINDOW_START_FIELD] = str(start)
    mapping[WINDOW_END_FIELD] = str(end)
    return mapping


def script_args(row: dict, ttl_ms: int) -> list[str]:
    """ARGV for WRITE_IF_NOT_OLDER_LUA: window_end, TTL in ms, then field/value pairs."""
    mapping = row_to_mapping(row)
    args = [mapping[WINDOW_END_FIELD], str(ttl_ms)]
    for field, value in mapping.items():
        args += (field, value)
    return args


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def parse_number(text: str):
    """'42' -> 42, '0.5' / '1e-07' / 'nan' -> float."""
    return int(text) if _INT_RE.match(text) else float(text)


def read_features(
    client: redis.Redis, entity_type: str, window: str, entity_id: str, prefix: str = DEFAULT_PREFIX
) -> dict | None:
    """The stored row for one entity and window spec, shaped like the written row (features that were
    None are missing), or None when there is no (unexpired) hash. Works with or without decode_responses."""
    raw = client.hgetall(feature_key(entity_type, window, entity_id, prefix))
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    row = {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "window": window,
        "window_start": int(fields.pop(WINDOW_START_FIELD)),
        "window_end": int(fields.pop(WINDOW_END_FIELD)),
    }
    row.update((name, parse_number(text)) for name, text in fields.items())
    return row


# --- the transform ----------------------------------------------------------------------------


class _WriteFeaturesFn(beam.DoFn):
    """Buffers a bundle's rows and writes them in pipelined batches of conditional script calls."""

    def __init__(self, cfg: OnlineStoreConfig):
        self._cfg = cfg
        self._client = None
        self._written = Metrics.counter(METRICS_NS, "written")
        self._skipped = Metrics.counter(METRICS_NS, "skipped_older")

    def setup(self):
        self._client = make_client(self._cfg)
        self._script = self._client.register_script(WRITE_IF_NOT_OLDER_LUA)

    def start_bundle(self):
        self._buffer = []

    def process(self, row: dict, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        # Encode now, so a malformed row fails here, with the row in the error.
        key = redis_key(row, self._cfg.key_prefix)
        self._buffer.append((key, script_args(row, self._cfg.ttl_ms), timestamp, window))
        if len(self._buffer) >= self._cfg.batch_size:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self) -> Iterable[WindowedValue]:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        with self._client.pipeline(transaction=False) as pipe:
            for key, args, _, _ in batch:
                self._script(keys=[key], args=args, client=pipe)
            results = pipe.execute()  # ConnectionError / ResponseError propagate: the bundle is retried
        written = sum(1 for r in results if r)
        self._written.inc(written)
        self._skipped.inc(len(results) - written)
        for (key, _, timestamp, window), result in zip(batch, results):
            yield WindowedValue((key, bool(result)), timestamp, (window,))

    def teardown(self):
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # best effort: the worker is going away
                _log.warning("online_store: closing the Redis client failed", exc_info=True)
            self._client = None


@beam.typehints.with_input_types(dict)
@beam.typehints.with_output_types(tuple[str, bool])
class WriteOnlineFeatures(beam.PTransform):
    """Feature rows -> Redis hashes (see module doc). Returns (key, wrote) per row, in the row's window
    and timestamp: wrote is False when a newer window was already stored. Counters (namespace
    feedback.online_store): written, skipped_older. Connection errors fail the bundle (runner retries)."""

    def __init__(self, cfg: OnlineStoreConfig):
        super().__init__()
        if not isinstance(cfg, OnlineStoreConfig):
            raise TypeError(f"cfg must be an OnlineStoreConfig, not {type(cfg).__name__}")
        self._cfg = cfg

    def expand(self, rows):
        return rows | "WriteToRedis" >> beam.ParDo(_WriteFeaturesFn(self._cfg))
