"""Pipeline tests on real runners: the transforms in a graph, and the batch job end to end."""

import collections
import glob
import gzip
import json
import os
import types

import apache_beam as beam
import fastavro
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from pipelines import batch
from pipelines.graph import GraphSettings
from pipelines.outputs import OutputPaths
from tests.conftest import FN_API_RUNNER, ROOT, write_config
from transforms import contract
from transforms.accounting import Count, Fold, Tallies
from transforms.bots import BotRules, FilterBots
from transforms.config import load_config
from transforms.dedupe import DedupeEvents, DedupeEventsStreaming
from transforms.signals import NEW_USER_WINDOW_MS, QualitySignals, freshness_rows, hour_of

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)


def event(eid, t, user="u1", etype="view", **kw):
    return {"event_id": eid, "event_type": etype, "event_time": t, "user_id": user, **kw}


def stamped(events):
    return [window.TimestampedValue(e, e["event_time"] / 1000) for e in events]


DEDUPE_INPUT = [
    event("a", T0),
    event("a", T0),
    event("b", T0 + 1000),
    event("a", T0 + 5000),
    event("c", T0),
    event("c", T0 + 7_200_000),
]  # c's second copy is beyond a 1 h horizon
DEDUPE_KEPT = ["a", "b", "c", "c"]
DEDUPE_DUPS = ["a", "a"]


def assert_dedupe_ids(out) -> None:
    """The event ids DedupeEvents(Streaming) kept and flagged are DEDUPE_KEPT and DEDUPE_DUPS."""
    assert_that(out.events | "KeptIds" >> beam.Map(lambda e: e["event_id"]), equal_to(DEDUPE_KEPT), label="Kept")
    assert_that(
        out[DedupeEvents.DUPLICATES] | "DupIds" >> beam.Map(lambda e: e["event_id"]),
        equal_to(DEDUPE_DUPS),
        label="Dups",
    )


def test_dedupe_batch():
    with TestPipeline(runner=FN_API_RUNNER) as p:
        out = p | beam.Create(stamped(DEDUPE_INPUT)) | DedupeEvents(horizon_s=3600)
        assert_dedupe_ids(out)


def test_dedupe_batch_hands_kept_events_on_packed():
    """DedupeEvents(emit_packed=True), as the bounded graph hands events to FilterBots: the same
    decisions, the kept events packed; a lone copy leaves as the bytes it came in, never unpacked."""
    from transforms.dedupe import _SplitCopiesFn, split_copies
    from transforms.records import RecordPacker

    packer = RecordPacker(tuple(DEDUPE_INPUT[0]))
    by_id = collections.defaultdict(list)
    for e in DEDUPE_INPUT:
        by_id[e["event_id"]].append(e)
    expected_kept = [e for copies in by_id.values() for e in split_copies(copies, 3_600_000)[0]]
    assert sorted(e["event_id"] for e in expected_kept) == sorted(DEDUPE_KEPT)
    with TestPipeline(runner=FN_API_RUNNER) as p:
        out = p | beam.Create(stamped(DEDUPE_INPUT)) | DedupeEvents(3600, packer, emit_packed=True)
        kept = out.events | "Unpack" >> beam.Map(packer.unpack)
        assert_that(kept, equal_to(expected_kept), label="Kept")
        assert_that(
            out[DedupeEvents.DUPLICATES] | "DupIds" >> beam.Map(lambda e: e["event_id"]),
            equal_to(DEDUPE_DUPS),
            label="Dups",
        )
    fn = _SplitCopiesFn(3600, packer, emit_packed=True)
    lone = packer.pack(DEDUPE_INPUT[0])
    (out,) = fn.process((DEDUPE_INPUT[0]["event_id"], [lone]))
    assert out is lone
    with pytest.raises(ValueError, match="emit_packed needs the packer"):
        _SplitCopiesFn(3600, emit_packed=True)


def test_dedupe_streaming_matches_batch():
    """Same input through TestStream, in arrival order, with the watermark moving past the horizon:
    the expiry timer frees state, and the classification still equals the batch one."""
    stream = TestStream().advance_watermark_to(T0 / 1000)
    for e in DEDUPE_INPUT[:5]:
        stream = stream.add_elements([window.TimestampedValue(e, e["event_time"] / 1000)])
    stream = (
        stream.advance_watermark_to(T0 / 1000 + 7000)
        .add_elements([window.TimestampedValue(DEDUPE_INPUT[5], DEDUPE_INPUT[5]["event_time"] / 1000)])
        .advance_watermark_to(T0 / 1000 + 20000)
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(streaming=True)
    options.view_as(StandardOptions).runner = "BundleBasedDirectRunner"
    with TestPipeline(options=options) as p:
        out = p | stream | DedupeEventsStreaming(horizon_s=3600)
        assert_dedupe_ids(out)


def test_split_copies_is_the_stateful_decision():
    from transforms.dedupe import split_copies

    kept, dups = split_copies([e for e in DEDUPE_INPUT if e["event_id"] == "c"] * 2, 3_600_000)
    assert [e["event_time"] for e in kept] == [T0, T0 + 7_200_000] and len(dups) == 2


@pytest.mark.parametrize("packed", [False, True], ids=["dicts", "packed"])
def test_filter_bots_in_a_pipeline(packed):
    """Bounded FilterBots on dicts, and on events packed as DedupeEvents(emit_packed=True) hands them on."""
    from transforms.records import RecordPacker

    rules = BotRules(True, (), 600.0, 120, 2, 200, 3)
    machine = [event(f"m{i}", T0 + i * 200, user="machine", user_agent=CHROME) for i in range(5 * 180)]
    human = [event(f"h{i}", T0 + i * 2000, user="human", user_agent=CHROME) for i in range(30)]
    crawler = [
        event(
            "c1",
            T0,
            user="crawler",
            user_agent="Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        )
    ]
    packer = RecordPacker(tuple(human[0]))
    events = machine + human + crawler
    with TestPipeline(runner=FN_API_RUNNER) as p:
        if packed:
            events = p | beam.Create([packer.pack(e) for e in events])
        else:
            events = p | beam.Create(stamped(events))
        out = events | FilterBots(rules, packer=packer)
        assert_that(out["humans"] | "Dicts" >> beam.Map(type), equal_to([dict] * len(human)), label="AsDicts")
        assert_that(
            out["humans"] | "HumanIds" >> beam.Map(lambda e: e["event_id"]),
            equal_to([e["event_id"] for e in human]),
            label="Humans",
        )
        assert_that(
            out[FilterBots.BOTS] | "Rules" >> beam.Map(lambda e: e["bot_rule"]) | beam.combiners.Count.PerElement(),
            equal_to([(contract.BOT_RULE_SUSTAINED_RATE, 900), (contract.BOT_RULE_CRAWLER_UA, 1)]),
            label="Bots",
        )


def _latest_per_user(partials: dict, e: dict) -> None:
    partials[e["user_id"]] = max(partials.get(e["user_id"], 0), e["event_time"])


def test_tallies_fill_every_output_of_a_plan():
    """Counts and a fold from one source into three outputs, a second source's counts into one of them."""
    plan = (
        Count("events", "by_type", lambda e: (e["event_type"],)),
        Count("events", "by_user", lambda e: (e["user_id"], "all")),
        Count("labels", "by_type", lambda label: ("label",)),
        Fold("events", "latest", _latest_per_user, max),
    )
    events = [event("a", T0), event("b", T0 + 5, etype="click"), event("c", T0 + 9, user="u2"), event("d", T0 + 1)]
    with TestPipeline(runner=FN_API_RUNNER) as p:
        sources = {"events": p | "Events" >> beam.Create(events), "labels": p | "Labels" >> beam.Create([{}, {}])}
        out = sources | Tallies(plan)
        assert sorted(out) == ["by_type", "by_user", "latest"]
        assert_that(out["by_type"], equal_to([("view", 3), ("click", 1), ("label", 2)]), label="ByType")
        assert_that(out["by_user"], equal_to([("u1", 3), ("u2", 1), ("all", 4)]), label="ByUser")
        assert_that(out["latest"], equal_to([("u1", T0 + 5), ("u2", T0 + 9)]), label="Latest")


def test_tallies_refuse_a_plan_they_cannot_apply():
    def keys(record):
        return ("k",)

    with pytest.raises(ValueError, match="at least one line"):
        Tallies([])
    with pytest.raises(ValueError, match="combine partials differently"):
        Tallies([Count("a", "x", keys), Fold("a", "x", _latest_per_user, max)])
    p = beam.Pipeline(runner=FN_API_RUNNER)
    records = p | beam.Create([event("a", T0)])
    with pytest.raises(ValueError, match="missing from the input"):
        _ = {"a": records} | "Missing" >> Tallies([Count("b", "x", keys)])
    windowed = records | beam.WindowInto(window.FixedWindows(60))
    with pytest.raises(ValueError, match="global window"):
        _ = {"a": windowed} | "Windowed" >> Tallies([Count("a", "x", keys)])


def test_quality_signals_tally_their_own_plan_without_the_graphs():
    """QualitySignals given no tallies applies QualitySignals.TALLIES itself, with the same results."""
    hour = 3_600_000
    valid = [
        event("v1", T0, etype="impression", item_id="i1", position=1, arrival_time=T0 + 300),
        event("v2", T0 + 10, etype="impression", item_id="i2", device_class="mobile"),
        event("v3", T0 + 2 * hour, user="u2", etype="click", item_id="i1"),
        event("v4", T0 - 3 * NEW_USER_WINDOW_MS, user="u3"),
    ]
    bots = [event("b1", T0, user="bot")]
    too_late = [event("t1", T0 - hour)]
    labels = [
        {"label": 1, "impression_time": T0, "item_id": "i1", "position": 1},
        {"label": 0, "impression_time": T0 + 10, "item_id": "i2", "position": None},
    ]
    counters = collections.Counter()
    for line in QualitySignals.TALLIES:
        if isinstance(line, Count) and line.output == QualitySignals.COUNTERS:
            for record in {"valid": valid, "bots": bots, "too_late": too_late, "labels": labels}[line.source]:
                counters.update(line.keys(record))
    first_last = {"u1": (T0, T0 + 10), "u2": (T0 + 2 * hour,) * 2, "u3": (T0 - 3 * NEW_USER_WINDOW_MS,) * 2}
    with TestPipeline(runner=FN_API_RUNNER) as p:
        outputs = types.SimpleNamespace(
            **{
                name: p | name.title() >> beam.Create(records)
                for name, records in {"valid": valid, "bots": bots, "too_late": too_late, "labels": labels}.items()
            }
        )
        signals = p | QualitySignals(outputs)
        assert_that(signals["counters"], equal_to(list(counters.items())), label="Counters")
        assert_that(signals["freshness"], equal_to(list(freshness_rows(list(first_last.values())))), label="Fresh")
        assert_that(
            signals["diversity"] | beam.Map(lambda row: (row["hour"], row["exposure_items"], row["positive_items"])),
            equal_to([(hour_of(T0), 2, 1)]),
            label="Diversity",
        )


def test_batch_graph_reads_each_tallied_collection_once(tmp_path):
    """The accounting and the quality signals tally the valid events and the labels (and every other
    collection) in one per-bundle DoFn each: each reader of a collection costs Beam per element."""
    write_lines(tmp_path / "x.jsonl", [event("e1", T0)])
    settings = GraphSettings.from_config(load_config(write_config(tmp_path)))
    p = beam.Pipeline(runner=FN_API_RUNNER)
    out = batch.build(p, settings, str(tmp_path / "x.jsonl"), OutputPaths(str(tmp_path / "out")))
    readers = collections.defaultdict(list)

    class Readers(PipelineVisitor):
        def visit_transform(self, node):
            for pc in node.inputs:
                readers[pc].append("/".join(node.full_label.split("/")[:2]))  # the step, not its parts

    p.visit(Readers())

    def tallies(pc):
        return [label for label in readers[pc] if label.startswith(("Tallies", "Accounting", "Exposures", "Quality"))]

    assert tallies(out.valid) == ["Tallies/TallyValid"]
    assert tallies(out.labels) == ["Tallies/TallyLabels"]
    tally_steps = [label for labels in readers.values() for label in labels if label.startswith("Tallies/Tally")]
    assert len(tally_steps) == len(set(tally_steps)) == 10  # the inputs and 9 counted collections
    assert sorted(out.tallies) == sorted(["counts", *{line.output for line in QualitySignals.TALLIES}])


def write_lines(path, records, gz=False):
    data = b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in records)
    (gzip.open if gz else open)(path, "wb").write(data)


def read_avro(pattern):
    return [r for f in sorted(glob.glob(pattern)) for r in fastavro.reader(open(f, "rb"))]


def read_jsonl(pattern):
    return [json.loads(l) for f in sorted(glob.glob(pattern)) for l in open(f) if l.strip()]


def write_batch_inputs(inputs) -> None:
    """One file of each format; lines 4 and 5 of a.jsonl, line 3 of b.jsonl.gz and record 2 of c.avro are
    dead letters, the second e2 a duplicate, e3 a bot and e4 consent-dropped."""
    iso = "2026-11-01T10:00:00Z"
    inputs.mkdir()
    write_lines(
        inputs / "a.jsonl",
        [
            event(
                "e1",
                iso,
                etype="impression",
                item_id="i1",
                request_id="r1",
                position=1,
                propensity=0.5,
                ip="203.0.113.7",
                user_agent=CHROME,
                context={"q": "mail bob@example.com"},
            ),
            event("e2", T0 + 5000, user=48213, etype="click", item_id="i1", request_id="r1"),
            event("e2", T0 + 5000, user=48213, etype="click", item_id="i1", request_id="r1"),
            b"[1,2]",
            b'{"event_id": "e6"',
        ],
    )
    write_lines(
        inputs / "b.jsonl.gz",
        [
            event("e3", iso, user="g", user_agent="Googlebot/2.1 (+http://www.google.com/bot.html)"),
            event("e4", iso, user="n", consent=False, ip="198.51.100.1"),
            event("e5", iso, etype="hover", ip="198.51.100.4"),
        ],
        gz=True,
    )
    schema = json.load(open("config/schemas/event.v1.avsc"))
    with open(inputs / "c.avro", "wb") as f:
        fastavro.writer(
            f,
            schema,
            [
                {"event_id": "e7", "event_type": "purchase", "event_time": T0, "user_id": "u7", "value": 12.5},
                {"event_id": "e8", "event_type": "view", "event_time": T0, "user_id": "u8", "propensity": 3.0},
            ],
        )


def test_batch_job_end_to_end(tmp_path):
    inputs = tmp_path / "in"
    write_batch_inputs(inputs)
    items = tmp_path / "items.csv"
    items.write_text("item_id,category\ni1,shoes\n")
    cfg = write_config(tmp_path, f"enrichment: {{items: {{path: {items}, key: item_id}}}}\n")
    out = tmp_path / "out"
    report = batch.run(["--config", cfg, "--input", str(inputs / "*"), "--output", str(out)])

    assert report["accounting"] == {**report["accounting"], "input_records": 10, "holds": True}
    assert report["counts"] == {
        "valid": 3,
        "duplicates": 1,
        "bots": 1,
        "dead_letter": 4,
        "consent_dropped": 1,
        "too_late": 0,
    }
    assert report["dead_letter_by_reason"] == {
        "malformed_json": 1,
        "not_an_object": 1,
        "unknown_event_type": 1,
        "out_of_range": 1,
    }
    valid = {e["event_id"]: e for e in read_avro(str(out / "events" / "*.avro"))}
    assert sorted(valid) == ["e1", "e2", "e7"]
    assert valid["e1"]["item_meta"] == {"category": "shoes"} and valid["e1"]["device_class"] == "desktop"
    assert valid["e7"]["schema_version"] == 1 and valid["e7"]["value"] == 12.5
    assert [b["event_id"] for b in read_avro(str(out / "bots" / "*.avro"))] == ["e3"]
    dead = read_jsonl(str(out / "dead_letter" / "*.jsonl"))
    assert {d["source"].rsplit("/", 1)[1] for d in dead} == {"a.jsonl:4", "a.jsonl:5", "b.jsonl.gz:3", "c.avro#2"}
    assert read_jsonl(str(out / "duplicates" / "*.jsonl"))[0]["event_id"] == "e2"
    assert read_jsonl(str(out / "consent_dropped" / "*.jsonl"))[0]["event_id"] == "e4"
    everything = "".join(
        open(f, "rb").read().decode("latin-1")
        for f in glob.glob(str(out / "**" / "*"), recursive=True)
        if os.path.isfile(f)
    )
    for secret in ("203.0.113.7", "198.51.100", "bob@example.com"):
        assert secret not in everything
    assert json.load(open(out / "report.json"))["counts"] == report["counts"]


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("bots: {max_events_per_minute: 0}\n", "bots.max_events_per_minute"),
        ("privacy: {key_env: NO_SUCH_VAR_FOR_TEST}\n", "no HMAC key"),
        ("enrichment: {items: {path: /nonexistent/items.csv, key: item_id}}\n", "enrichment.items.path"),
    ],
)
def test_batch_job_refuses_bad_config(tmp_path, capsys, extra, expected):
    write_lines(tmp_path / "x.jsonl", [event("e1", T0)])
    rc = batch.main(
        [
            "--config",
            write_config(tmp_path, extra),
            "--input",
            str(tmp_path / "*.jsonl"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert rc == batch.EXIT_CONFIG
    assert expected in capsys.readouterr().err


def test_batch_job_refuses_empty_input(tmp_path, capsys):
    rc = batch.main(
        [
            "--config",
            write_config(tmp_path),
            "--input",
            str(tmp_path / "nothing*.jsonl"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert rc == batch.EXIT_CONFIG and "--input: no file matches" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_iter_lines_reads_to_the_end_in_any_chunking(chunk):
    import io

    from transforms.io import iter_lines

    data = b'{"a":1}\n\n{"b":2}\r\nlast-without-newline'
    assert list(iter_lines(io.BytesIO(data), chunk)) == [
        (1, b'{"a":1}'),
        (2, b""),
        (3, b'{"b":2}'),
        (4, b"last-without-newline"),
    ]
    assert list(iter_lines(io.BytesIO(b"x\n"), chunk)) == [(1, b"x")]


def test_corrupt_avro_file_keeps_what_was_read_and_dead_letters_the_rest(tmp_path):
    import io

    schema = json.load(open("config/schemas/event.v2.avsc"))
    buf = io.BytesIO()
    records = [
        {
            "event_id": f"e{i}",
            "event_type": "view",
            "event_time": T0 + i,
            "user_id": f"u{i}",
            "context": {"pad": "x" * 200},
        }
        for i in range(3000)
    ]
    fastavro.writer(buf, schema, records, sync_interval=16_000)
    data = buf.getvalue()
    (tmp_path / "bad.avro").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    report = batch.run(
        ["--config", write_config(tmp_path), "--input", str(tmp_path / "bad.avro"), "--output", str(out)]
    )
    assert report["accounting"]["holds"]
    assert report["dead_letter_by_reason"] == {"corrupt_file": 1}
    assert 0 < report["counts"]["valid"] < 3000
    dead = read_jsonl(str(out / "dead_letter" / "*.jsonl"))
    assert dead[0]["stage"] == "read" and "unreadable after record" in dead[0]["message"]


# --- the bounded graph's chunked front ----------------------------------------------------------

_COLLECTED: dict = {}


class _Collect(beam.DoFn):
    """Collects an output's elements as sorted-key JSON (FnApiRunner runs the DoFn in this process)."""

    def __init__(self, run: str, name: str):
        self._key = (run, name)

    def process(self, element):
        _COLLECTED.setdefault(self._key, []).append(json.dumps(element, sort_keys=True, default=str))


def _front_records() -> list:
    """RawRecords for every outcome of the front: valid (with PII, metadata hits and misses, a bad IP),
    duplicates, dead letters, a consent stub and a too-late event."""
    late = T0 + 2 * 3_600_000  # arrival two hours after event time: beyond the default 1 h lateness
    payloads = [
        (event("a1", T0, etype="impression", item_id="i1", request_id="r1", position=1, propensity=0.5), None),
        (event("a1", T0, etype="impression", item_id="i1", request_id="r1", position=1, propensity=0.5), None),
        (event("a2", T0 + 10, etype="click", item_id="i9", request_id="r1", ip="203.0.113.7"), None),
        (event("a3", T0 + 20, user="bob@example.com", context={"q": "call +44 20 7946 0958"}), None),
        (event("a4", T0 + 30, ip="not-an-ip", user_agent=CHROME), None),
        (b"[1,2]", None),
        (b'{"event_id": "x"', None),
        (event("a5", T0, consent=False, ip="198.51.100.1"), None),
        (event("a6", T0, etype="nope"), None),
        (event("a7", T0), late),
        (event("a8", T0 + 40, etype="purchase", value=3.5), None),
    ]
    return [
        (f"in.jsonl:{n}", p if isinstance(p, bytes) else orjson.dumps(p), arrival)
        for n, (p, arrival) in enumerate(payloads, 1)
    ]


def _run_graph(run: str, settings, make_input) -> dict:
    from pipelines.graph import build_event_graph

    p = beam.Pipeline(options=PipelineOptions([f"--runner={FN_API_RUNNER}"]))
    out = build_event_graph(make_input(p), settings)
    for name, pc in vars(out).items():
        if isinstance(pc, beam.PCollection):  # not `tallies`, a dict of the tally plan's outputs
            _ = pc | f"Collect{name}" >> beam.ParDo(_Collect(run, name))
    result = p.run()
    result.wait_until_finish()
    counters = {}
    for c in result.metrics().query()["counters"]:
        key = (c.key.metric.namespace, c.key.metric.name)
        counters[key] = counters.get(key, 0) + c.committed
    outputs = {name: sorted(rows) for (r, name), rows in _COLLECTED.items() if r == run}
    return {"outputs": outputs, "counters": counters}


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_chunked_front_gives_the_same_outputs_and_counters(tmp_path, chunk):
    """RawChunks through parse, privacy and enrichment (one element per chunk) end in the same records,
    counts and Beam counters as one element per record."""
    from pipelines.graph import GraphSettings
    from transforms.config import load_config
    from transforms.parse import RawChunk

    items = tmp_path / "items.csv"
    items.write_text("item_id,category\ni1,shoes\n")
    cfg = load_config(write_config(tmp_path, f"enrichment: {{items: {{path: {items}, key: item_id}}}}\n"))
    settings = GraphSettings.from_config(cfg)
    records = _front_records()
    chunks = [RawChunk(records[i : i + chunk]) for i in range(0, len(records), chunk)]
    per_record = _run_graph(f"records{chunk}", settings, lambda p: p | beam.Create(records))
    chunked = _run_graph(f"chunks{chunk}", settings, lambda p: p | beam.Create(chunks).with_output_types(RawChunk))
    assert chunked == per_record
    counts = dict(json.loads(c) for c in per_record["outputs"]["counts"])
    assert counts["input"] == len(records)
    assert {k: counts.get(k, 0) for k in ("valid", "duplicates", "dead_letter", "consent_dropped", "too_late")} == {
        "valid": 5,
        "duplicates": 1,
        "dead_letter": 3,
        "consent_dropped": 1,
        "too_late": 1,
    }
    assert per_record["counters"][("feedback.parse", "valid")] == 6
    assert per_record["counters"][("feedback.enrich", "item_lookup_missing")] == 1


def test_chunked_graph_refuses_counting_per_element(tmp_path):
    """With count_windowing the outcomes are counted one per element, where a chunk would count as one
    input: refused at construction, not a broken accounting identity."""
    from apache_beam.transforms import window

    from pipelines.graph import GraphSettings, build_event_graph
    from transforms.config import load_config
    from transforms.parse import RawChunk

    settings = GraphSettings.from_config(load_config(write_config(tmp_path)))
    p = beam.Pipeline(options=PipelineOptions([f"--runner={FN_API_RUNNER}"]))
    chunks = p | beam.Create([RawChunk(_front_records())]).with_output_types(RawChunk)
    with pytest.raises(ValueError, match="chunked input"):
        build_event_graph(chunks, settings, streaming=False, count_windowing=beam.WindowInto(window.GlobalWindows()))


def test_chunked_graph_refuses_streaming(tmp_path):
    from pipelines.graph import GraphSettings, build_event_graph
    from transforms.config import load_config
    from transforms.parse import RawChunk

    settings = GraphSettings.from_config(load_config(write_config(tmp_path)))
    p = beam.Pipeline(options=PipelineOptions([f"--runner={FN_API_RUNNER}"]))
    chunks = p | beam.Create([RawChunk(_front_records())]).with_output_types(RawChunk)
    with pytest.raises(ValueError, match="bounded"):
        build_event_graph(chunks, settings, streaming=True)


@pytest.mark.parametrize("reshuffle", [True, False])
def test_read_raw_records_gives_raw_chunks(tmp_path, registry, reshuffle):
    """ReadRawRecords' records come as RawChunks of up to PARSE_CHUNK records, every record once, with
    or without the spread."""
    from transforms.io import ReadRawRecords
    from transforms.parse import RawChunk

    n = 2 * ReadRawRecords.PARSE_CHUNK + 7
    write_lines(tmp_path / "a.jsonl", [event(f"e{i}", T0 + i) for i in range(n)])
    with TestPipeline(runner=FN_API_RUNNER) as p:
        read = p | ReadRawRecords(str(tmp_path / "*.jsonl"), registry, reshuffle=reshuffle)
        assert read["records"].element_type is RawChunk
        sizes = read["records"] | "Sizes" >> beam.Map(lambda c: (type(c) is RawChunk, len(c)))
        lines = read["records"] | "Lines" >> beam.FlatMap(lambda c: [s.rsplit(":", 1)[1] for s, _, _ in c])
        size = ReadRawRecords.PARSE_CHUNK
        assert_that(sizes, equal_to([(True, size), (True, size), (True, 7)]), label="ChunkSizes")
        assert_that(lines, equal_to([str(i) for i in range(1, n + 1)]), label="EveryRecordOnce")


def test_per_bundle_lists_refuse_windowed_input():
    """FilterBots, BuildSlates and keyed-window features gather records per bundle for a GroupByKey:
    given windowed input they stop when the graph is built instead of grouping windows together."""
    from transforms.features import ComputeFeatures
    from transforms.labels import BuildSlates

    features = load_config(str(ROOT / "config" / "batch.yaml")).features
    steps = {
        "FilterBots": FilterBots(BotRules(True, (), 600.0, 120, 2, 200, 3)),
        "BuildSlates": BuildSlates(),
        "ComputeFeatures": ComputeFeatures(features, keyed_windows=True),
    }
    for name, step in steps.items():
        p = beam.Pipeline(runner=FN_API_RUNNER)
        created = p | f"Create{name}" >> beam.Create([event("a", T0)])
        windowed = created | beam.WindowInto(window.FixedWindows(60))
        with pytest.raises(ValueError, match=f"{name}.*global window"):
            windowed | step
