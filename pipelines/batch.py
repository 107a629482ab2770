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

import apache_beam as beam

from feedback_report.report_html import render_report, write_report_html
from pipelines import runfolder
from pipelines.baseline import load_baseline
from pipelines.gates import gates_line
from pipelines.graph import GraphOutputs, GraphSettings, build_event_graph
from pipelines.launcher import (  # noqa: F401
    EXIT_ACCOUNTING,
    EXIT_CONFIG,
    add_overwrite_flag,
    beam_counters,
    pipeline_options,
    quality_exit_code,
    read_counters,
    read_jsonl_glob,
    refuse_unless,
    require_match,
    run_main,
    run_pipeline,
    runner_name,
    single_worker,
    write_json,
)
from pipelines.outputs import BATCH_OUTPUTS, OutputPaths, build_outputs
from transforms.accounting import summarise
from transforms.config import load_config
from transforms.io import DAMAGE_FIELDS, ReadRawRecords, WriteSingleFile, counter_line
from transforms.privacy import redact_path
from transforms.quality import breaches, drift_report, evaluate_slos, privacy_stats, quality_summary, slo_exit_code
from transforms.signals import QualitySignals, stats_from_parts

DAMAGED_FILES = "damaged_files"  # report.json key: files read only up to a damage (see README, Dead letters)
_log = logging.getLogger("pipelines.batch")


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags (Beam pipeline options are passed through). Also read by the Flex
    Template metadata test, which checks templates/*/metadata.json against it."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config, e.g. config/batch.yaml")
    parser.add_argument(
        "--input", required=True, help="File glob of JSONL (.jsonl, .jsonl.gz) and/or Avro (.avro) archives"
    )
    parser.add_argument("--output", required=True, help="Output folder (local path or gs://...)")
    parser.add_argument(
        "--baseline",
        help="baseline.json (python -m pipelines.baseline) to measure drift against; "
        "default: quality.baseline in the config",
    )
    parser.add_argument("--warn-only", action="store_true", help="Report SLO breaches without failing (exit 0)")
    add_overwrite_flag(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


def build(p: beam.Pipeline, settings: GraphSettings, input_glob: str, paths: OutputPaths) -> GraphOutputs:
    """Sources -> shared graph -> sinks. Returns the graph's outputs (for tests)."""
    read = p | "ReadArchives" >> ReadRawRecords(
        input_glob,
        settings.validation.registry,
        reshuffle=not single_worker(p.options),
        max_line_bytes=settings.validation.max_event_bytes,
    )
    out = build_event_graph(
        read["records"],
        settings,
        upstream_dead_letters=[read[ReadRawRecords.CORRUPT]],
        tallies=QualitySignals.TALLIES,  # tallied with the accounting, one per-bundle step per collection
    )
    build_outputs(out, settings, paths)
    _ = (
        read[ReadRawRecords.CORRUPT]
        | "DamagedFilesToJson" >> beam.Map(lambda d: json.dumps({k: d[k] for k in DAMAGE_FIELDS}))
        | "WriteDamagedFiles" >> WriteSingleFile(paths.quality_part(DAMAGED_FILES), ".jsonl")
    )
    write_quality_signals(p, out, paths)
    return out


def write_quality_signals(p: beam.Pipeline, out: GraphOutputs, paths: OutputPaths) -> None:
    """The quality signal parts; their tallies are the graph's when it took QualitySignals.TALLIES."""
    signals = p | "QualitySignals" >> QualitySignals(out, out.tallies)
    _ = (
        signals["counters"]
        | "SignalsToJson" >> beam.MapTuple(counter_line)
        | "WriteSignals" >> WriteSingleFile(paths.quality_part("counters"), ".jsonl")
    )
    for name in ("diversity", "freshness"):
        _ = (
            signals[name]
            | f"{name.title()}ToJson" >> beam.Map(json.dumps)
            | f"Write{name.title()}" >> WriteSingleFile(paths.quality_part(name), ".jsonl")
        )


def quality_stats(paths: OutputPaths, summary: dict) -> dict:
    return stats_from_parts(
        summary,
        read_counters(paths.quality_part("counters")),
        read_jsonl_glob(paths.quality_part("diversity") + "*"),
        read_jsonl_glob(paths.quality_part("freshness") + "*"),
    )


def run(argv=None) -> dict:
    """Runs the job; returns the report. Raises ConfigError / AccountingError."""
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    job_start = dt.datetime.now(dt.timezone.utc)
    settings = GraphSettings.from_config(cfg, job_start)
    require_match("--input", args.input)
    options = pipeline_options(beam_args)
    # Preflight before the pipeline is built: a used, foreign or unwritable --output stops here (exit 2).
    folder = runfolder.prepare(args.output, "batch", args.overwrite)
    paths = OutputPaths(folder.staging)  # everything is written to staging, published at the end
    final = OutputPaths(args.output)
    finished = run_pipeline(options, lambda p: build(p, settings, args.input, paths))
    summary = summarise(read_counters(paths.counts))
    report = {
        "job": "batch",
        "input": redact_path(args.input),
        "output": redact_path(args.output),
        "run_id": folder.run_id,
        "config": args.config,
        "runner": runner_name(options),
        "beam_version": beam.__version__,
        "started_at": job_start.isoformat(),
        "elapsed_seconds": finished.elapsed_seconds,
        **summary,
        DAMAGED_FILES: sorted(read_jsonl_glob(paths.quality_part(DAMAGED_FILES) + "*"), key=lambda d: d["file"]),
        "metrics": beam_counters(finished.result),
        "outputs": {o.name: final.of(o) + "*" for o in BATCH_OUTPUTS},
    }
    stats = quality_stats(paths, summary)
    stats["privacy"] = privacy_stats(report["metrics"]) if report["metrics"] else None  # None: runner has no metrics
    report["quality"] = assess_quality(
        cfg, paths, stats, args.baseline, args.warn_only, title=f"Batch run over {redact_path(args.input)}"
    )
    report["quality"]["html"] = final.report_html
    write_json(paths.report, report)
    publish_if_accounted(folder, cfg, paths, report)
    return report


def publish_if_accounted(folder: runfolder.RunFolder, cfg, paths: OutputPaths, report: dict) -> None:
    """Publishes the staged run, unless its accounting fails (AccountingError; the outputs stay in
    staging, with no _SUCCESS)."""
    acc, labels = report["accounting"], report["labels"]
    refuse_unless(
        acc["holds"],
        f"accounting identity broken: {acc['input_records']} input records but "
        f"{acc['sum_of_outcomes']} outcomes ({acc['difference']:+d})",
        paths.report,
        report,
    )
    refuse_unless(
        labels["one_label_per_exposure"],
        f"{labels['exposures']} exposures but {labels['labels']} labels",
        paths.report,
        report,
    )
    # A failed quality gate (exit 4) still publishes: the outputs are complete and accounted for; the
    # verdict travels in the manifest so a consumer can refuse a run that breached its SLOs.
    runfolder.publish(
        folder,
        runfolder.config_digest(cfg.model_dump_json()),
        {
            "input": report["input"],
            "counts": report["counts"],
            "accounting": acc,
            "quality": {"exit_code": report["quality"]["exit_code"], "breaches": report["quality"]["breaches"]},
        },
    )


def assess_quality(
    cfg, paths: OutputPaths, stats: dict, baseline_path: str | None, warn_only: bool, title: str
) -> dict:
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
    return {
        "mode": qcfg.mode,
        "baseline": baseline_path,
        "slos": slos,
        "breaches": [b["slo"] for b in failed],
        "drifted": drift["drifted"] if drift else None,
        "summary": summary,
        "exit_code": slo_exit_code(slos, qcfg),
        "html": paths.report_html,
    }


def main(argv=None) -> int:
    return run_main(run, argv, format_summary, quality_exit_code)


def format_summary(report: dict) -> str:
    acc = report["accounting"]
    lines = [f"input records   {acc['input_records']:>10}"]
    for name, n in report["counts"].items():
        lines.append(f"  {name:<14}{n:>10}")
    lines.append(f"accounting identity holds: {acc['holds']}  ({report['elapsed_seconds']} s)")
    lab = report["labels"]
    lines.append(
        f"labels {lab['labels']} for {lab['exposures']} exposures ({lab['positives']} positive), "
        f"orphan outcomes {lab['orphan_outcomes']}, late outcomes {lab['late_outcomes']}"
    )
    if report["dead_letter_by_reason"]:
        lines.append(
            "dead letters by reason: " + ", ".join(f"{k}={v}" for k, v in report["dead_letter_by_reason"].items())
        )
    if report.get(DAMAGED_FILES):
        lines.append(
            f"damaged files (read up to the damage, rest dead-lettered as corrupt_file): "
            f"{', '.join(d['stopped_at'] for d in report[DAMAGED_FILES])}"
        )
    if report["bots_by_rule"]:
        lines.append("bots by rule: " + ", ".join(f"{k}={v}" for k, v in report["bots_by_rule"].items()))
    lines.append(gates_line(report["quality"], "quality", "SLOs"))
    lines.append(f"report: {report['output'].rstrip('/')}/report.json, report.html")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
