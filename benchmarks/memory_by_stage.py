"""Where the batch job's memory grows: RSS at the start of each FnApiRunner stage, and the stages that
raised it most.

    python benchmarks/memory_by_stage.py [--events 80000] [--workdir DIR] [--top 12]

Runs `pipelines.batch` in this process on generated input (shipped `config/batch.yaml`, `--warn-only`)
with FnApiRunner, which runs one fused stage at a time and keeps a stage's outputs in memory until the
stages reading them have run (a GroupByKey's input is held decoded). The RSS sampled when each stage
starts shows which stage's outputs the memory went to: the growth is charged to the stage that ran
just before. Python keeps freed memory for reuse rather than returning it, so RSS is a high-water mark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# FnApiRunner announces each bundle on this logger, at DEBUG.
BUNDLE_LOGGER = "apache_beam.runners.portability.fn_api_runner.fn_runner.run_bundle"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stage_label(message: str) -> str:
    """The first user-named steps of a fused stage's name, e.g. `Bots/GroupUser/Read+Bots-Judge...`."""
    name = message.split("\n", 1)[0].removeprefix("Running bundle for stage ")
    steps = re.findall(r"\(?(?:ref_AppliedPTransform_)?([A-Za-z][\w/-]*?)(?:_\d+)?\)", name)
    return " + ".join(dict.fromkeys(steps[:3])) or name[:100]


class _StageStarts(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.starts: list[tuple[str, float]] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Running bundle for stage"):
            self.starts.append((stage_label(message), rss_mib()))


def run(events: int, workdir: Path, top: int) -> dict:
    data = workdir / f"events-{events}.jsonl"
    subprocess.run(
        [sys.executable, "-m", "feedback_tools.generate", "--events", str(events), "--output", str(data)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    handler = _StageStarts()
    logger = logging.getLogger(BUNDLE_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    os.environ.setdefault("FEEDBACK_HMAC_KEY", "benchmark-key")
    start = rss_mib()
    argv = sys.argv
    sys.argv = ["pipelines.batch", "--config", str(ROOT / "config/batch.yaml"), "--input", str(data)]
    sys.argv += ["--output", str(workdir / "job"), "--warn-only"]
    try:
        runpy.run_module("pipelines.batch", run_name="__main__")
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finally:
        sys.argv = argv
        logger.removeHandler(handler)
    end = rss_mib()
    growth = []
    points = handler.starts + [("(end of run)", end)]
    for (stage, before), (_, after) in zip(points, points[1:]):
        growth.append((after - before, stage))
    growth.sort(reverse=True)
    return {
        "events": events,
        "rss_mib_before_run": round(start, 1),
        "rss_mib_at_end": round(end, 1),
        "stages": len(handler.starts),
        "largest_growth": [
            {"stage": stage, "mib": round(mib, 1), "bytes_per_event": round(mib * 2**20 / events)}
            for mib, stage in growth[:top]
            if mib > 0
        ],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=80000)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="memory-by-stage-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run(args.events, work, args.top)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
