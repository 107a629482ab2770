"""Batch throughput and memory: the full batch job vs a Beam read->write passthrough, same input and runner.

    python benchmarks/batch_throughput.py [--events 200000] [--runner FnApiRunner-path] [--workdir /tmp/bench]

Prints events/s and peak RSS of each run (each in its own process) and the ratio job/passthrough.
No assertions: figures go to benchmarks/RESULTS.md by hand, with the date and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FN_API = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"

PASSTHROUGH = """
import sys, apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.options.pipeline_options import PipelineOptions
src, dst, runner = sys.argv[1:4]
# Bytes, not text: the generated input holds deliberately non-UTF-8 lines.
with beam.Pipeline(options=PipelineOptions(runner=runner)) as p:
    p | beam.io.ReadFromText(src, coder=BytesCoder()) | beam.io.WriteToText(dst, coder=BytesCoder())
"""


# Runs a command and prints its peak RSS (KiB): a fresh parent per measurement, so RUSAGE_CHILDREN
# covers that command alone.
_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(cmd, env=None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a command run in its own process tree."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, cwd=ROOT, env=env,
                         capture_output=True, text=True)
    return time.perf_counter() - start, int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runner", default=FN_API)
    ap.add_argument("--workdir", default="/tmp/feedback-bench")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"events-{args.events}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.generate", "--events", str(args.events), "--output", str(data)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"generated {args.events} events in {time.perf_counter() - t:.1f} s")
    records = sum(1 for _ in open(data, "rb"))
    env = {**os.environ, "FEEDBACK_HMAC_KEY": "benchmark-key"}

    base_s, base_rss = timed([sys.executable, "-c", PASSTHROUGH, str(data), str(work / "passthrough" / "out"), args.runner])
    job_s, job_rss = timed([sys.executable, "-m", "pipelines.batch", "--config", "config/batch.yaml",
                            "--input", str(data), "--output", str(work / "job"), "--overwrite", f"--runner={args.runner}"], env=env)
    report = json.loads((work / "job" / "report.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(), "runner": args.runner.rsplit(".", 1)[-1], "records": records,
        "passthrough_s": round(base_s, 1), "passthrough_events_per_s": round(records / base_s),
        "passthrough_peak_rss_mib": round(base_rss),
        "job_s": round(job_s, 1), "job_events_per_s": round(records / job_s), "job_peak_rss_mib": round(job_rss),
        "ratio_job_to_passthrough_time": round(job_s / base_s, 2),
        "accounting_holds": report["accounting"]["holds"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
