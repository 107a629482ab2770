"""Batch job: archives of events (JSON lines, plain or gzip, and Avro) -> classified outputs + report.

    python -m pipelines.batch --config config/batch.yaml --input 'data/*.jsonl.gz' --output out/

Any Beam pipeline option may follow (e.g. --runner=PrismRunner --prism_location=...). Without
--runner the job runs on FnApiRunner, named explicitly: a bare DirectRunner first tries to download
Prism and, for stateful pipelines, silently switches runners (see shared/BEAM-NOTES.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions

from pipelines import runfolder
from pipelines.cli import EXIT_ACCOUNTING, EXIT_CONFIG, add_overwrite_flag, pipeline_options, run_main  # noqa: F401
from pipelines.graph import GraphOutputs, GraphSettings, build_event_graph
from transforms.accounting import AccountingError, summarise
from transforms.config import ConfigError, load_config
from transforms.features import WriteOfflineFeatures
from transforms.signals import QualitySignals, stats_from_parts
from transforms.quality import breaches, drift_report, evaluate_slos, privacy_stats, quality_summary, slo_exit_code
from pipelines.baseline import load_baseline
from pipelines.report_html import render_report, write_report_html
from pipelines.outputs import AVRO, BATCH_OUTPUTS, Output, OutputPaths, output_collections
from transforms.io import DAMAGE_FIELDS, ReadRawRecords, WriteAvroEvents, WriteJsonLines, WriteWindowedFiles, read_all

DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
DAMAGED_FILES = "damaged_files"   # report.json key: files read only up to a damage (see README, Dead letters)
_log = logging.getLogger("pipelines.batch")


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags (Beam pipeline options are passed through). Also read by the Flex
    Template metadata test, which checks templates/*/metadata.json against it."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config, e.g. config/batch.yaml")
    parser.add_argument("--input", required=True, help="File glob of JSONL (.jsonl, .jsonl.gz) and/or Avro (.avro) archives")
    parser.add_argument("--output", required=True, help="Output folder (local path or gs://...)")
    parser.add_argument("--baseline", help="baseline.json (python -m pipelines.baseline) to measure drift against; "
                                           "default: quality.baseline in the config")
    parser.add_argument("--warn-only", action="store_true", help="Report SLO breaches without failing (exit 0)")
    add_overwrite_flag(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


def build(p: beam.Pipeline, settings: GraphSettings, input_glob: str, paths: OutputPaths) -> GraphOutputs:
    """Sources -> shared graph -> sinks. Returns the graph's outputs (for tests)."""
    read = p | "ReadArchives" >> ReadRawRecords(input_glob, settings.validation.registry)
    out = build_event_graph(read["records"], settings, upstream_dead_letters=[read[ReadRawRecords.CORRUPT]])
    build_outputs(out, settings, paths)
    _ = (read[ReadRawRecords.CORRUPT]
         | "DamagedFilesToJson" >> beam.Map(lambda d: json.dumps({k: d[k] for k in DAMAGE_FIELDS}))
         | "WriteDamagedFiles" >> beam.io.WriteToText(paths.quality_part(DAMAGED_FILES), file_name_suffix=".jsonl",
                                                      num_shards=1))
    write_quality_signals(p, out, paths)
    return out


def write_quality_signals(p, out: GraphOutputs, paths: OutputPaths) -> None:
    signals = p | "QualitySignals" >> QualitySignals(out)
    _ = (signals["counters"]
         | "SignalsToJson" >> beam.MapTuple(lambda k, n: json.dumps({"counter": k, "count": n}))
         | "WriteSignals" >> beam.io.WriteToText(paths.quality_part("counters"), file_name_suffix=".jsonl", num_shards=1))
    for name in ("diversity", "freshness"):
        _ = (signals[name]
             | f"{name.title()}ToJson" >> beam.Map(json.dumps)
             | f"Write{name.title()}" >> beam.io.WriteToText(paths.quality_part(name), file_name_suffix=".jsonl",
                                                            num_shards=1))


def read_jsonl_glob(pattern: str) -> list:
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows += [json.loads(line) for line in read_all(f).decode().splitlines() if line.strip()]
    return rows


def quality_stats(paths: OutputPaths, summary: dict) -> dict:
    counters = {}
    for row in read_jsonl_glob(paths.quality_part("counters") + "*"):
        counters[row["counter"]] = counters.get(row["counter"], 0) + row["count"]
    return stats_from_parts(summary, counters, read_jsonl_glob(paths.quality_part("diversity") + "*"),
                            read_jsonl_glob(paths.quality_part("freshness") + "*"))


def _sink(output: Output, prefix: str, schema, shards: int, deterministic: bool) -> beam.PTransform:
    if deterministic:
        folder, name = prefix.rsplit("/", 1)
        return WriteWindowedFiles(folder, name, output.fmt, schema, max(1, shards))
    if output.fmt == AVRO:
        return WriteAvroEvents(prefix, schema, shards)
    return WriteJsonLines(prefix, shards)


def build_outputs(out: GraphOutputs, settings: GraphSettings, paths: OutputPaths, deterministic: bool = False) -> None:
    """The batch sinks (BATCH_OUTPUTS, features, counters). `deterministic`: sorted records in fixed-name
    files (replays rewrite the same bytes) instead of runner-sharded writes."""
    pcolls = output_collections(out, BATCH_OUTPUTS)
    for o in BATCH_OUTPUTS:
        _ = pcolls[o.name] | o.write_label >> _sink(o, paths.of(o), o.schema_for(settings.clean_schema),
                                                     settings.num_shards, deterministic)
    if out.features is not None:
        _ = out.features | "WriteFeatures" >> WriteOfflineFeatures(paths.features)
    _ = (out.counts
         | "CountsToJson" >> beam.MapTuple(lambda k, n: json.dumps({"counter": k, "count": n}))
         | "WriteCounts" >> beam.io.WriteToText(paths.counts, file_name_suffix=".jsonl", num_shards=1))


def read_counters(paths: OutputPaths) -> dict:
    counters = {}
    for row in read_jsonl_glob(paths.counts + "*"):
        counters[row["counter"]] = counters.get(row["counter"], 0) + row["count"]
    return counters


def beam_counters(result) -> dict:
    """The job's own Beam counters (namespace feedback.*), as the runner reports them (attempted)."""
    try:
        counters = result.metrics().query()["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # a runner without metrics support
        return {}
    totals: dict = {}
    for c in counters:
        if c.key.metric.namespace.startswith("feedback."):
            name = f"{c.key.metric.namespace}.{c.key.metric.name}"
            totals[name] = totals.get(name, 0) + (c.committed if c.committed is not None else c.attempted)
    return dict(sorted(totals.items()))


def write_json(path: str, data: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=False).encode() + b"\n")


def write_report(paths: OutputPaths, report: dict) -> None:
    write_json(paths.report, report)


def run(argv=None) -> dict:
    """Runs the job; returns the report. Raises ConfigError / AccountingError."""
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    job_start = dt.datetime.now(dt.timezone.utc)
    settings = GraphSettings.from_config(cfg, job_start)
    if not FileSystems.match([args.input])[0].metadata_list:
        raise ConfigError(f"--input: no file matches {args.input!r}")
    options = pipeline_options(beam_args, DEFAULT_RUNNER)
    # Preflight before the pipeline is built: a used, foreign or unwritable --output stops here (exit 2).
    folder = runfolder.prepare(args.output, "batch", args.overwrite)
    paths = OutputPaths(folder.staging)       # everything is written to staging, published at the end
    final = OutputPaths(args.output)
    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build(p, settings, args.input, paths)
    result = p.run()
    result.wait_until_finish()
    elapsed = time.monotonic() - started
    summary = summarise(read_counters(paths))
    report = {
        "job": "batch",
        "input": args.input,
        "output": args.output,
        "run_id": folder.run_id,
        "config": args.config,
        "runner": str(options.view_as(StandardOptions).runner),
        "beam_version": beam.__version__,
        "started_at": job_start.isoformat(),
        "elapsed_seconds": round(elapsed, 3),
        **summary,
        DAMAGED_FILES: sorted(read_jsonl_glob(paths.quality_part(DAMAGED_FILES) + "*"), key=lambda d: d["file"]),
        "metrics": beam_counters(result),
        "outputs": {o.name: final.of(o) + "*" for o in BATCH_OUTPUTS},
    }
    stats = quality_stats(paths, summary)
    stats["privacy"] = privacy_stats(report["metrics"]) if report["metrics"] else None  # None: runner has no metrics
    report["quality"] = assess_quality(cfg, paths, stats, args.baseline, args.warn_only,
                                       title=f"Batch run over {args.input}")
    report["quality"]["html"] = final.report_html
    write_report(paths, report)
    acc = summary["accounting"]
    # A run whose accounting fails is not published: its outputs stay in staging (no _SUCCESS).
    if not acc["holds"]:
        raise AccountingError(
            f"accounting identity broken: {acc['input_records']} input records but {acc['sum_of_outcomes']} "
            f"outcomes ({acc['difference']:+d}); not published, see {paths.report}")
    if not summary["labels"]["one_label_per_exposure"]:
        raise AccountingError(
            f"{summary['labels']['exposures']} exposures but {summary['labels']['labels']} labels; not published, "
            f"see {paths.report}")
    # A failed quality gate (exit 4) still publishes: the outputs are complete and accounted for; the
    # verdict travels in the manifest so a consumer can refuse a run that breached its SLOs.
    runfolder.publish(folder, runfolder.config_digest(cfg.model_dump_json()), {
        "input": args.input, "counts": summary["counts"], "accounting": acc,
        "quality": {"exit_code": report["quality"]["exit_code"], "breaches": report["quality"]["breaches"]}})
    return report


def assess_quality(cfg, paths: OutputPaths, stats: dict, baseline_path: Optional[str], warn_only: bool,
                   title: str) -> dict:
    """quality.json, report.html and the SLO verdicts for a finished run."""
    qcfg = cfg.quality
    if warn_only:
        qcfg = qcfg.model_copy(update={"mode": "warn"})
    write_json(paths.quality, stats)
    baseline_path = baseline_path or cfg.resolve(qcfg.baseline)
    baseline = load_baseline(baseline_path) if baseline_path else None
    summary = quality_summary(stats, qcfg)
    drift = drift_report(stats, baseline, qcfg) if baseline else None
    slos = evaluate_slos(stats, qcfg, drift, summary)
    write_report_html(paths.report_html, render_report(stats, summary, slos, drift, title=title, mode=qcfg.mode))
    failed = breaches(slos)
    return {"mode": qcfg.mode, "baseline": baseline_path, "slos": slos, "breaches": [b["slo"] for b in failed],
            "drifted": drift["drifted"] if drift else None, "summary": summary,
            "exit_code": slo_exit_code(slos, qcfg), "html": paths.report_html}


def _exit_code(report: dict) -> int:
    code = report["quality"]["exit_code"]
    for b in report["quality"]["slos"]:
        if b["ok"] is False:
            print(f"{'error' if code else 'warning'}: SLO {b['slo']} breached: {b['message']}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    return run_main(run, argv, format_summary, _exit_code)


def format_summary(report: dict) -> str:
    acc = report["accounting"]
    lines = [f"input records   {acc['input_records']:>10}"]
    for name, n in report["counts"].items():
        lines.append(f"  {name:<14}{n:>10}")
    lines.append(f"accounting identity holds: {acc['holds']}  ({report['elapsed_seconds']} s)")
    lab = report["labels"]
    lines.append(f"labels {lab['labels']} for {lab['exposures']} exposures ({lab['positives']} positive), "
                 f"orphan outcomes {lab['orphan_outcomes']}, late outcomes {lab['late_outcomes']}")
    if report["dead_letter_by_reason"]:
        lines.append("dead letters by reason: " + ", ".join(f"{k}={v}" for k, v in report["dead_letter_by_reason"].items()))
    if report.get(DAMAGED_FILES):
        lines.append(f"damaged files (read up to the damage, rest dead-lettered as corrupt_file): "
                     f"{', '.join(d['stopped_at'] for d in report[DAMAGED_FILES])}")
    if report["bots_by_rule"]:
        lines.append("bots by rule: " + ", ".join(f"{k}={v}" for k, v in report["bots_by_rule"].items()))
    q = report["quality"]
    lines.append(f"quality: {len(q['slos']) - len(q['breaches'])}/{len(q['slos'])} SLOs met"
                 + (f", breached: {', '.join(q['breaches'])} ({q['mode']} mode)" if q["breaches"] else ""))
    lines.append(f"report: {report['output'].rstrip('/')}/report.json, report.html")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
