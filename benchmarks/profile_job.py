"""Where the batch job's CPU goes: the job under cProfile on FnApiRunner, own time grouped by area.

    python benchmarks/profile_job.py [--events 20000] [--workdir DIR] [--top 25]

Prints a table of areas (Beam's coders, Beam's per-element machinery, each project module, Avro,
Parquet, JSON, ...) with their share of the profiled own time, then the top functions. cProfile adds
its own per-call overhead, so many cheap calls (Beam's per-element work) look somewhat bigger than
they are; the shares are for ranking, the absolute cost is batch_throughput.py's figure.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (area, substring of the code's file path or function name), first match wins.
AREAS = (
    ("beam coders", "apache_beam/coders/"),
    ("beam windowing / timestamps", "apache_beam/transforms/window"),
    ("beam windowing / timestamps", "apache_beam/utils/timestamp"),
    ("beam windowing / timestamps", "apache_beam/utils/windowed_value"),
    ("beam combiners", "apache_beam/transforms/combiners"),
    ("beam combiners", "apache_beam/transforms/core.py"),
    ("beam sinks (WriteToText/Avro/files)", "apache_beam/io/"),
    ("beam runner (DoFn invocation, bundles, shuffle)", "apache_beam/runners/"),
    ("beam runner (DoFn invocation, bundles, shuffle)", "apache_beam/transforms/"),
    ("beam metrics", "apache_beam/metrics/"),
    ("beam other", "apache_beam/"),
    ("avro (fastavro)", "fastavro"),
    ("parquet / arrow", "pyarrow"),
    ("ua-parser", "ua_parser"),
    ("json", "json"),
    ("hmac / hashing", "hmac"),
    ("hmac / hashing", "_hashlib"),
    ("project: parse", "transforms/parse.py"),
    ("project: privacy", "transforms/privacy.py"),
    ("project: enrich", "transforms/enrich.py"),
    ("project: dedupe", "transforms/dedupe.py"),
    ("project: bots + sessions", "transforms/bots.py"),
    ("project: bots + sessions", "transforms/sessions.py"),
    ("project: labels", "transforms/labels.py"),
    ("project: features", "transforms/features"),  # features.py, features_config.py, features_sink.py
    ("project: accounting", "transforms/accounting.py"),
    ("project: quality signals", "transforms/signals.py"),
    ("project: io", "transforms/io.py"),
    ("project: io", "transforms/avro_codec.py"),
    ("project: io", "<avro encoder"),  # the function avro_codec compiles from a schema
    ("project: other", "transforms/"),
    ("project: pipelines", "pipelines/"),
    ("pickling", "pickle"),
    ("pickling", "dill"),
    ("grpc / protobuf", "grpc"),
    ("grpc / protobuf", "protobuf"),
    ("threading / queues", "threading"),
    ("threading / queues", "queue"),
    ("built-ins", "~"),
)


def area_of(filename: str, funcname: str) -> str:
    key = f"{filename}:{funcname}"
    for area, needle in AREAS:
        if needle in key:
            return area
    return "other"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--workdir", default="/tmp/feedback-bench")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"events-{args.events}.jsonl"
    if not data.exists():
        subprocess.run(
            [sys.executable, "-m", "feedback_tools.generate", "--events", str(args.events), "--output", str(data)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    os.environ.setdefault("FEEDBACK_HMAC_KEY", "benchmark-key")
    from pipelines import batch

    prof = cProfile.Profile()
    started = time.process_time()
    prof.enable()
    batch.run(
        [
            "--config",
            str(ROOT / "config" / "batch.yaml"),
            "--input",
            str(data),
            "--output",
            str(work / f"profile-{args.events}"),
            "--overwrite",
            "--warn-only",
            "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",
        ]
    )
    prof.disable()
    cpu = time.process_time() - started
    stats = pstats.Stats(prof)
    areas: dict = {}
    rows = []
    for (filename, _line, func), (_cc, ncalls, tottime, _ct, _callers) in stats.stats.items():
        area = area_of(filename, func)
        areas[area] = areas.get(area, 0.0) + tottime
        rows.append((tottime, ncalls, area, f"{filename.split('site-packages/')[-1]}:{func}"))
    total = sum(areas.values()) or 1.0
    print(f"{args.events} events, {cpu:.1f} s CPU under the profiler ({cpu / args.events * 1e6:.0f} µs/event)\n")
    print("| area | share of own time |\n|---|---|")
    for area, t in sorted(areas.items(), key=lambda kv: -kv[1]):
        print(f"| {area} | {100 * t / total:.1f}% |")
    print(f"\ntop {args.top} functions by own time:")
    for tottime, ncalls, area, name in sorted(rows, reverse=True)[: args.top]:
        print(f"{100 * tottime / total:5.1f}%  {ncalls:>9}  {area:<40} {name}")
    return {area: round(100 * t / total, 1) for area, t in areas.items()}


if __name__ == "__main__":
    main()
