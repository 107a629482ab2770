"""Plain-Python reference of the batch job's per-event work: one process, no Beam runner.

    python benchmarks/reference.py --config config/batch.yaml --input events.jsonl --output /tmp/ref

It runs the project's own stage code on every record, in the job's order: read lines, parse and
validate, pseudonymise (HMAC) and redact, enrich (ua-parser, cached), crawler user agents, dedupe
per event_id, per-user bot runs and sessions with the labels of each user's (user, item) keys,
slates per request, features (the bounded job's per-entity path: inputs gathered per entity, then
`entity_rows`), outcome counters and quality signals, and it writes the same kinds of files with the
job's writers' settings (Avro with the job's codec for events, bots, labels and slates; JSON lines for
the rest; Parquet for features, through the job's sink). Each stage's DoFn is driven directly
(`setup()`, then `process()` per element), so the decisions are the job's; what is left out is
exactly Beam's part: element wrapping, coders, shuffles, bundle handling.
`benchmarks/batch_throughput.py` compares the job's CPU per event with this one's. It prints its
outcome counts as JSON (they must equal the job's report).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apache_beam.pvalue import TaggedOutput  # noqa: E402
from apache_beam.transforms.window import TimestampedValue  # noqa: E402

from pipelines.graph import GraphSettings  # noqa: E402
from transforms import contract  # noqa: E402
from transforms.accounting import INPUT, summarise  # noqa: E402
from transforms.avro_codec import AvroFileWriter  # noqa: E402
from transforms.bots import FilterBots, _CrawlerFn, _UserRunsBatchFn  # noqa: E402
from transforms.config import load_config  # noqa: E402
from transforms.dedupe import DedupeEvents, _SplitCopiesFn  # noqa: E402
from transforms.enrich import _EnrichFn  # noqa: E402
from transforms.features import FeatureParams, entity_rows, gather_entity_inputs  # noqa: E402
from transforms.features_sink import _ParquetSink  # noqa: E402
from transforms.io import AVRO_CODEC, AVRO_DEFLATE_LEVEL, iter_lines, to_json_line  # noqa: E402
from transforms.labels import LABEL_SCHEMA, SLATE_SCHEMA, JoinLabels, is_exposure, make_slate  # noqa: E402
from transforms.parse import ParseEvents, _ParseFn  # noqa: E402
from transforms.privacy import _ProtectFn  # noqa: E402
from transforms.signals import event_counters, label_counters  # noqa: E402


def _route(outputs, main: list, tagged: dict) -> None:
    """A DoFn's yields -> `main` and `tagged[tag]` (values unwrapped from TimestampedValue)."""
    for out in outputs:
        if isinstance(out, TaggedOutput):
            tag, out = out.tag, out.value
        else:
            tag = None
        if isinstance(out, TimestampedValue):
            out = out.value
        (main if tag is None else tagged.setdefault(tag, [])).append(out)


def _run(fn, elements) -> tuple[list, dict]:
    fn.setup()
    fn.start_bundle()
    main, tagged = [], {}
    for el in elements:
        _route(fn.process(el), main, tagged)
    _route(fn.finish_bundle() or (), main, tagged)
    return main, tagged


def _write_avro(path: Path, schema: dict, records: list) -> None:
    with open(path, "wb") as f:  # the job's writer (transforms/io.py _WriteBundleFileFn)
        writer = AvroFileWriter(f, schema, codec=AVRO_CODEC, compression_level=AVRO_DEFLATE_LEVEL)
        for record in records:
            writer.write(record)
        writer.flush()


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(to_json_line(r) + "\n")


def _read_raw(input_path: str) -> list:
    raw = []
    with open(input_path, "rb") as f:
        for n, line in iter_lines(f):
            raw.append((f"{input_path}:{n}", line, None))
    return raw


def _group(records, key) -> dict:
    """Records -> {key(record): [records...]} in first-seen order (what a GroupByKey hands the next DoFn)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return groups


def _clean_events(s: GraphSettings, raw: list) -> dict:
    """Parse, protect, enrich, dedupe and bot stages (labels settled in the per-user groups, as the job
    does) -> their outputs and side outputs."""
    parsed, parse_tags = _run(_ParseFn(s.validation, s.key_source), raw)
    protected, _ = _run(_ProtectFn(s.privacy, s.key_source), parsed)
    enriched, _ = _run(_EnrichFn(), protected)

    by_id = _group(enriched, lambda e: e["event_id"])
    deduped, dedupe_tags = _run(_SplitCopiesFn(s.dedupe_horizon_s), by_id.items())

    rest, crawler_tags = _run(_CrawlerFn(s.bots), deduped)
    by_user = _group(rest, lambda e: e["user_id"])
    per_user = ((user, [events]) for user, events in by_user.items())  # one list per user, as one bundle gives
    humans, user_tags = _run(_UserRunsBatchFn(s.bots, s.session_gap_s, labels=s.labels), per_user)
    bots = crawler_tags.get(FilterBots.BOTS, []) + user_tags.get(FilterBots.BOTS, [])
    return {
        "humans": humans,
        "bots": bots,
        "labels": user_tags.get(contract.TAG_LABELS, []),
        "label_tags": {tag: user_tags.get(tag, []) for tag in (JoinLabels.ORPHANS, JoinLabels.LATE_OUTCOMES)},
        "parse_tags": parse_tags,
        "dedupe_tags": dedupe_tags,
    }


def _slates(labels: list) -> list:
    by_request = _group((label for label in labels if label["request_id"] is not None), lambda r: r["request_id"])
    return [make_slate(r, ls) for r, ls in by_request.items()]


def _features(humans: list, cfg) -> list:
    """The bounded job's feature path: each entity's inputs gathered, then all its rows (`entity_rows`)."""
    params = FeatureParams.from_config(cfg)
    specs = tuple((spec.label, spec.size_ms, spec.period_ms) for spec in cfg.windows)
    entities = tuple(cfg.entities)
    by_entity: dict = {}
    for e in humans:
        gather_entity_inputs(by_entity, e, entities)
    return [row for (et, eid), values in by_entity.items() for row in entity_rows(et, eid, values, specs, params)]


def _counters(raw: list, outcomes: dict, labels: list, label_tags: dict) -> collections.Counter:
    humans, bots = outcomes[contract.OUTCOME_VALID], outcomes[contract.OUTCOME_BOT]
    counters = collections.Counter(
        {
            INPUT: len(raw),
            "exposures": sum(1 for e in humans if is_exposure(e)),
            "labels": len(labels),
            "orphans": len(label_tags.get(JoinLabels.ORPHANS, [])),
            "late_outcomes": len(label_tags.get(JoinLabels.LATE_OUTCOMES, [])),
        }
    )
    for name, records in outcomes.items():
        counters[name] += len(records)
    counters.update(f"{contract.OUTCOME_DEAD_LETTER}.{r['reason']}" for r in outcomes[contract.OUTCOME_DEAD_LETTER])
    counters.update(f"{contract.OUTCOME_BOT}.{r['bot_rule']}" for r in bots)
    counters.update(f"{contract.OUTCOME_VALID}.{r['event_type']}" for r in humans)
    counters.update(f"labels.{'positive' if r['label'] else 'negative'}" for r in labels)
    return counters


def _signals(humans: list, bots: list, labels: list) -> collections.Counter:
    signals = collections.Counter()
    for e in humans:
        signals.update(event_counters(e, contract.OUTCOME_VALID))
    for e in bots:
        signals.update(event_counters(e, contract.OUTCOME_BOT))
    for label in labels:
        signals.update(label_counters(label))
    return signals


def _write_outputs(
    out: Path,
    s: GraphSettings,
    outcomes: dict,
    labels: list,
    label_tags: dict,
    slates: list,
    signals: collections.Counter,
    features: list,
) -> None:
    _write_avro(out / "events.avro", s.clean_schema, outcomes[contract.OUTCOME_VALID])
    _write_avro(out / "bots.avro", s.clean_schema, outcomes[contract.OUTCOME_BOT])
    _write_avro(out / "labels.avro", LABEL_SCHEMA, labels)
    _write_avro(out / "slates.avro", SLATE_SCHEMA, slates)
    _write_jsonl(
        out / "dead_letter.jsonl", outcomes[contract.OUTCOME_DEAD_LETTER] + outcomes[contract.OUTCOME_TOO_LATE]
    )
    _write_jsonl(out / "duplicates.jsonl", outcomes[contract.OUTCOME_DUPLICATE])
    _write_jsonl(out / "consent_dropped.jsonl", outcomes[contract.OUTCOME_CONSENT_DROPPED])
    _write_jsonl(out / "orphans.jsonl", label_tags.get(JoinLabels.ORPHANS, []))
    _write_jsonl(out / "late_outcomes.jsonl", label_tags.get(JoinLabels.LATE_OUTCOMES, []))
    _write_jsonl(out / "signals.jsonl", [{"counter": k, "count": n} for k, n in sorted(signals.items())])
    if features:
        sink = _ParquetSink(str(out))
        with open(out / "features.parquet", "wb") as f:
            sink.open(f)
            for row in features:
                sink.write(row)
            sink.flush()


def run(config: str, input_path: str, output: str) -> dict:
    cfg = load_config(config)
    s = GraphSettings.from_config(cfg, dt.datetime.now(dt.timezone.utc))
    if s.lookups:
        raise SystemExit("reference.py: metadata tables are not supported (the shipped config has none)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    raw = _read_raw(input_path)

    clean = _clean_events(s, raw)
    humans, bots = clean["humans"], clean["bots"]
    labels, label_tags = clean["labels"], clean["label_tags"]
    slates = _slates(labels)
    features = _features(humans, s.features) if s.features is not None else []

    parse_tags = clean["parse_tags"]
    outcomes = {
        contract.OUTCOME_VALID: humans,
        contract.OUTCOME_BOT: bots,
        contract.OUTCOME_DUPLICATE: clean["dedupe_tags"].get(DedupeEvents.DUPLICATES, []),
        contract.OUTCOME_DEAD_LETTER: parse_tags.get(ParseEvents.DEAD_LETTER, []),
        contract.OUTCOME_CONSENT_DROPPED: parse_tags.get(ParseEvents.CONSENT_DROPPED, []),
        contract.OUTCOME_TOO_LATE: parse_tags.get(ParseEvents.TOO_LATE, []),
    }
    counters = _counters(raw, outcomes, labels, label_tags)
    signals = _signals(humans, bots, labels)
    _write_outputs(out, s, outcomes, labels, label_tags, slates, signals, features)
    summary = summarise(dict(counters))
    return {
        "counts": summary["counts"],
        "accounting_holds": summary["accounting"]["holds"],
        "labels": len(labels),
        "slates": len(slates),
        "feature_rows": len(features),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "batch.yaml"))
    ap.add_argument("--input", required=True, help="a JSON-lines file (plain)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("FEEDBACK_HMAC_KEY", "benchmark-key")
    summary = run(args.config, args.input, args.output)
    (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
