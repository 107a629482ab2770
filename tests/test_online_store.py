import random
import threading
import time
import uuid

import apache_beam as beam
import pydantic
import pytest
import redis
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from tests.conftest import FN_API_RUNNER
from tests.redis_server import (
    REDIS_TEST_PASSWORD,
    redis_server,  # noqa: F401  (fixtures)
    redis_server_with_password,  # noqa: F401  (fixture)
)
from transforms.online_store import (
    METRICS_NS,
    MissingPasswordError,
    OnlineStoreConfig,
    WriteOnlineFeatures,
    _WriteFeaturesFn,
    feature_key,
    make_client,
    parse_number,
    read_features,
    redis_key,
    row_to_mapping,
    script_args,
)

HOUR_MS = 3_600_000


def row(entity_id="u1", window_end=10 * HOUR_MS, entity_type="user", window="1h/5m", **features):
    features = features or {"clicks": 3, "ctr": 0.25, "dwell_p50": None}
    return {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "window": window,
        "window_start": window_end - HOUR_MS,
        "window_end": window_end,
        **features,
    }


def stored(r):
    """What read_features returns for a written row: the row without its None features."""
    return {k: v for k, v in r.items() if v is not None}


# --- pure helpers ------------------------------------------------------------------------------


def test_key_layout():
    assert redis_key(row(), "feat") == "feat:user:1h/5m:u1"
    assert (
        redis_key(row(entity_type="user_category", entity_id="u1|shoes:red"), "p:q")
        == "p:q:user_category:1h/5m:u1|shoes:red"
    )
    with pytest.raises(ValueError, match="must not contain ':'"):
        feature_key("user", "1h:5m", "u1")
    with pytest.raises(ValueError, match="non-empty"):
        redis_key(row(entity_id=""))
    with pytest.raises(ValueError, match="without 'window'"):
        redis_key({"entity_type": "user", "entity_id": "u1"})


def test_row_to_mapping_decimal_text_none_omitted():
    m = row_to_mapping(row(clicks=3, ctr=0.1, big=1e20, flag=True, missing=None, neg=-7))
    assert m == {
        "clicks": "3",
        "ctr": "0.1",
        "big": "1e+20",
        "flag": "1",
        "neg": "-7",
        "_window_start": str(9 * HOUR_MS),
        "_window_end": str(10 * HOUR_MS),
    }
    assert {k: parse_number(v) for k, v in m.items()} == {
        "clicks": 3,
        "ctr": 0.1,
        "big": 1e20,
        "flag": 1,
        "neg": -7,
        "_window_start": 9 * HOUR_MS,
        "_window_end": 10 * HOUR_MS,
    }
    assert isinstance(parse_number("3"), int) and isinstance(parse_number("3.0"), float)
    args = script_args(row(), ttl_ms=5000)
    assert args[:2] == [str(10 * HOUR_MS), "5000"] and len(args) % 2 == 0


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"ctr": "0.5"}, TypeError),  # text is not a feature value
        ({"_window_end": 1}, ValueError),  # reserved field names
        ({"window_end": "123"}, ValueError),
        ({"window_end": None}, ValueError),
        ({"window_start": 11 * HOUR_MS}, ValueError),  # ends before it starts
    ],
)
def test_row_to_mapping_rejects(bad, error):
    with pytest.raises(error):
        row_to_mapping({**row(), **bad})


def test_config():
    cfg = OnlineStoreConfig()
    assert (cfg.host, cfg.port, cfg.db, cfg.key_prefix, cfg.ttl, cfg.password_env, cfg.batch_size) == (
        "localhost",
        6379,
        0,
        "feat",
        7 * 86400.0,
        None,
        500,
    )
    assert OnlineStoreConfig(ttl="36h").ttl_ms == 36 * 3600 * 1000
    assert OnlineStoreConfig(ttl=0.0001).ttl_ms == 1
    for bad in (
        {"ttl": 0},
        {"ttl": "0s"},
        {"port": 0},
        {"port": 70000},
        {"batch_size": 0},
        {"key_prefix": ""},
        {"db": -1},
        {"hots": "x"},
    ):
        with pytest.raises(pydantic.ValidationError):
            OnlineStoreConfig(**bad)
    with pytest.raises(pydantic.ValidationError):
        cfg.port = 1
    with pytest.raises(TypeError, match="OnlineStoreConfig"):
        WriteOnlineFeatures({"host": "localhost"})


# --- against a real redis-server ---------------------------------------------------------------


@pytest.fixture
def cfg(redis_server):
    host, port = redis_server
    # A prefix of its own per test: the server is shared by the session, so no FLUSHDB.
    return OnlineStoreConfig(host=host, port=port, key_prefix=f"t{uuid.uuid4().hex[:8]}", batch_size=7)


@pytest.fixture
def client(cfg):
    c = make_client(cfg)
    yield c
    c.close()


def write(cfg, rows, batch_size=None):
    """Rows through the DoFn (setup, bundle, teardown), as a runner would; returns [(key, wrote)]."""
    fn = _WriteFeaturesFn(cfg if batch_size is None else cfg.model_copy(update={"batch_size": batch_size}))
    fn.setup()
    try:
        fn.start_bundle()
        out = []
        for r in rows:
            out += fn.process(r, timestamp=Timestamp(0), window=window.GlobalWindow())
        out += fn.finish_bundle()
        return [wv.value for wv in out]
    finally:
        fn.teardown()


def test_newer_then_older_window_is_skipped(cfg, client):
    newer, older = row(window_end=10 * HOUR_MS, clicks=5, ctr=0.5), row(window_end=9 * HOUR_MS, clicks=1, ctr=0.1)
    key = redis_key(newer, cfg.key_prefix)
    assert write(cfg, [newer]) == [(key, True)]
    assert write(cfg, [older]) == [(key, False)]
    assert read_features(client, "user", "1h/5m", "u1", cfg.key_prefix) == stored(newer)
    # in one batch, too: the script runs in order on the server
    assert write(cfg, [older, newer, older]) == [(key, False), (key, True), (key, False)]
    assert read_features(client, "user", "1h/5m", "u1", cfg.key_prefix) == stored(newer)


def test_equal_window_overwrites_and_replaces_the_whole_hash(cfg, client):
    first = row(clicks=5, ctr=0.5, dwell_p50=1200)
    update = row(clicks=6, ctr=0.4, dwell_p50=None)  # a later pane of the same window
    assert write(cfg, [first, update]) == [(redis_key(first, cfg.key_prefix), True)] * 2
    got = read_features(client, "user", "1h/5m", "u1", cfg.key_prefix)
    assert got == stored(update) and "dwell_p50" not in got  # no value left over from the first pane
    # a newer window replaces every field too
    newer = row(window_end=11 * HOUR_MS, clicks=1, ctr=None)
    write(cfg, [newer])
    assert read_features(client, "user", "1h/5m", "u1", cfg.key_prefix) == stored(newer)


def test_ttl_set_on_every_write(cfg, client):
    cfg = cfg.model_copy(update={"ttl": 3600.0})
    key = redis_key(row(), cfg.key_prefix)
    write(cfg, [row()])
    assert 3590_000 < client.pttl(key) <= 3600_000
    client.pexpire(key, 1000)
    write(cfg, [row(clicks=9)])  # equal window: written, TTL renewed
    assert client.pttl(key) > 3590_000
    client.pexpire(key, 1000)
    write(cfg, [row(window_end=HOUR_MS)])  # older: skipped, TTL untouched
    assert 0 < client.pttl(key) <= 1000


def test_expired_hash_accepts_any_window(cfg, client):
    write(cfg.model_copy(update={"ttl": 0.05}), [row(window_end=10 * HOUR_MS)])
    time.sleep(0.2)
    assert read_features(client, "user", "1h/5m", "u1", cfg.key_prefix) is None
    assert write(cfg, [row(window_end=HOUR_MS)])[0][1] is True


def test_reader(cfg, redis_server):
    assert read_features(make_client(cfg), "user", "1h/5m", "nobody", cfg.key_prefix) is None
    r = row(entity_type="user_category", entity_id="u1|shoes", clicks=2, ctr=0.125)
    write(cfg, [r])
    decoding = redis.Redis(*redis_server, decode_responses=True)
    got = read_features(decoding, "user_category", "1h/5m", "u1|shoes", cfg.key_prefix)
    assert got == stored(r) and isinstance(got["clicks"], int) and isinstance(got["window_end"], int)
    # the layout, as other readers (e.g. a serving API) see it
    assert decoding.hgetall(f"{cfg.key_prefix}:user_category:1h/5m:u1|shoes") == {
        "clicks": "2",
        "ctr": "0.125",
        "_window_start": str(9 * HOUR_MS),
        "_window_end": str(10 * HOUR_MS),
    }


def test_malformed_row_fails_the_bundle(cfg):
    with pytest.raises(TypeError, match="'ctr' must be a number"):
        write(cfg, [row(ctr="high")])


def test_connection_error_raises(cfg):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(redis.ConnectionError):
        write(cfg.model_copy(update={"port": port}), [row()])


def test_password_from_environment(redis_server_with_password, monkeypatch):
    host, port = redis_server_with_password
    cfg = OnlineStoreConfig(host=host, port=port, password_env="TEST_ONLINE_STORE_PW", key_prefix="pw")
    monkeypatch.delenv("TEST_ONLINE_STORE_PW", raising=False)
    with pytest.raises(MissingPasswordError, match="TEST_ONLINE_STORE_PW"):
        make_client(cfg)
    with pytest.raises(redis.AuthenticationError):
        write(cfg.model_copy(update={"password_env": None}), [row()])
    monkeypatch.setenv("TEST_ONLINE_STORE_PW", REDIS_TEST_PASSWORD)
    assert write(cfg, [row()]) == [("pw:user:1h/5m:u1", True)]
    assert "password" not in repr(cfg).lower().replace("password_env", "")


def test_concurrent_writers_end_with_the_newest(cfg):
    """Two writers send interleaved windows (odd ones, even ones; ascending, so each write races the
    other writer's neighbouring window) for the same keys while a reader polls: the newest window wins,
    and the reader never sees a window go backwards or a half-written hash. A check-then-write done in
    the client instead of in the Lua script fails this test."""
    keys, n = 3, 400
    rows_by_writer = [[], []]
    for w in range(1, n + 1):
        for k in range(keys):
            rows_by_writer[w % 2].append(row(entity_id=f"u{k}", window_end=w * HOUR_MS, a=w, b=-w))
    start, done, errors, seen = threading.Barrier(3), threading.Event(), [], []

    def writer(rows):
        try:
            start.wait()
            write(cfg, rows, batch_size=1)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    def reader():
        c = make_client(cfg)
        last = {}
        start.wait()
        while not done.is_set():
            for k in range(keys):
                got = read_features(c, "user", "1h/5m", f"u{k}", cfg.key_prefix)
                if got is None:
                    continue
                w = got["window_end"] // HOUR_MS
                seen.append((got["a"] == w and got["b"] == -w, w >= last.get(k, 0)))
                last[k] = w
        c.close()

    threads = [threading.Thread(target=writer, args=(rows,)) for rows in rows_by_writer]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(60)
    done.set()
    threads[2].join(10)
    assert not errors, errors
    assert seen and all(consistent and monotonic for consistent, monotonic in seen)
    c = make_client(cfg)
    for k in range(keys):
        assert read_features(c, "user", "1h/5m", f"u{k}", cfg.key_prefix) == row(
            entity_id=f"u{k}", window_end=n * HOUR_MS, a=n, b=-n
        )


def test_pipeline_writes_2000_rows(cfg, client):
    """2,000 rows over three entity types, in hourly event-time windows; 150 keys already hold a newer
    window, so exactly those are skipped. Outputs keep each row's window."""
    rng = random.Random(3)
    rows = []
    for i in range(2000):
        entity_type = ("user", "item", "user_category")[i % 3]
        rows.append(
            row(
                entity_id=f"e{i}",
                entity_type=entity_type,
                window_end=rng.randint(1, 48) * HOUR_MS,
                window=("1h/5m", "24h/1h")[i % 2],
                clicks=rng.randint(0, 100),
                ctr=rng.random(),
                dwell=rng.choice([None, rng.random() * 1e4]),
            )
        )
    pre_newer = {
        i: {**rows[i], "window_end": 100 * HOUR_MS, "window_start": 99 * HOUR_MS, "clicks": -1}
        for i in rng.sample(range(2000), 150)
    }
    write(cfg, pre_newer.values())
    cfg = cfg.model_copy(update={"batch_size": 64})

    def key_wrote_window(kv, w=beam.DoFn.WindowParam):
        return kv[0], kv[1], int(w.start.micros // 1000)

    p = beam.Pipeline(options=PipelineOptions(runner=FN_API_RUNNER))
    out = (
        p
        | beam.Create(rows)
        | "Stamp" >> beam.Map(lambda r: window.TimestampedValue(r, r["window_end"] / 1000 - 1))
        | "Hourly" >> beam.WindowInto(window.FixedWindows(3600))
        | WriteOnlineFeatures(cfg)
        | "WithWindow" >> beam.Map(key_wrote_window)
    )
    assert_that(
        out,
        equal_to([(redis_key(r, cfg.key_prefix), i not in pre_newer, r["window_start"]) for i, r in enumerate(rows)]),
    )
    result = p.run()
    result.wait_until_finish()

    def counter(name):
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NS).with_name(name))["counters"]
        return sum(c.committed for c in found)

    assert (counter("written"), counter("skipped_older")) == (1850, 150)
    for i, r in enumerate(rows):
        expected = stored(pre_newer.get(i, r))
        assert read_features(client, r["entity_type"], r["window"], r["entity_id"], cfg.key_prefix) == expected
        assert client.pttl(redis_key(r, cfg.key_prefix)) > 0
