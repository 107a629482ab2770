"""Snapshot a run's distributions as the baseline later runs are compared with for drift.

    python -m pipelines.baseline --quality OUT/quality.json --output baseline.json

The snapshot keeps what `transforms.quality.drift_report` compares: the numeric histograms (with
their bucket edges) and categorical counts, the mean exposure/positive entropy per hour and the CTR
by position, plus where it came from. Paths go through Beam's FileSystems (local, gs://, ...).
Exit 0 written, 2 unreadable or malformed quality stats / baseline.
"""

from __future__ import annotations

import argparse
import json
import sys

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.quality import entropy_snapshot

BASELINE_VERSION = 1
EXIT_CONFIG = 2


class BaselineError(ValueError):
    """The quality stats or the baseline file cannot be used."""


def _read_json(path: str) -> dict:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
            raw = f.read()
    except (OSError, BeamIOError, ValueError) as e:  # ValueError: a scheme no filesystem handles
        raise BaselineError(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BaselineError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_distributions(dist, source: str) -> None:
    if (
        not isinstance(dist, dict)
        or not isinstance(dist.get("numeric", {}), dict)
        or not isinstance(dist.get("categorical", {}), dict)
    ):
        raise BaselineError(f"{source}: 'distributions' must be {{'numeric': {{...}}, 'categorical': {{...}}}}")
    for name, h in (dist.get("numeric") or {}).items():
        edges, counts = h.get("edges"), h.get("counts")
        if not isinstance(edges, list) or not isinstance(counts, list) or len(counts) != len(edges) + 1:
            raise BaselineError(
                f"{source}: numeric feature {name!r} needs edges and counts with len(counts) == len(edges) + 1"
            )


def snapshot(stats: dict, source: str = "") -> dict:
    """Quality stats of one run -> the baseline document (pure)."""
    if "distributions" not in stats:
        raise BaselineError(f"{source or 'stats'}: no 'distributions' key; is this a quality.json?")
    _check_distributions(stats["distributions"], source or "stats")
    dist = stats["distributions"]
    return {
        "baseline_version": BASELINE_VERSION,
        "source": source,
        "run_end_ms": stats.get("run_end_ms"),
        "input_records": stats.get("input_records"),
        "distributions": {
            "numeric": dict(sorted((dist.get("numeric") or {}).items())),
            "categorical": dict(sorted((dist.get("categorical") or {}).items())),
        },
        "entropy": entropy_snapshot(stats),
        "ctr_by_position": dict(stats.get("ctr_by_position") or {}),
    }


def load_baseline(path: str) -> dict:
    """Read and check a baseline.json (a full quality.json is accepted too: drift_report takes either)."""
    data = _read_json(path)
    if "distributions" not in data:
        raise BaselineError(f"{path}: not a baseline (no 'distributions'); make one with python -m pipelines.baseline")
    version = data.get("baseline_version", BASELINE_VERSION)
    if version != BASELINE_VERSION:
        raise BaselineError(f"{path}: baseline_version {version} is not supported (expected {BASELINE_VERSION})")
    _check_distributions(data["distributions"], path)
    return data


def write_baseline(path: str, baseline: dict) -> None:
    with FileSystems.create(path, mime_type="application/json", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write((json.dumps(baseline, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def run(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipelines.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", required=True, help="quality.json of the run to snapshot")
    parser.add_argument("--output", required=True, help="where to write baseline.json")
    args = parser.parse_args(argv)
    base = snapshot(_read_json(args.quality), source=args.quality)
    write_baseline(args.output, base)
    return base


def main(argv=None) -> int:
    try:
        base = run(argv)
    except BaselineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    d = base["distributions"]
    print(
        f"baseline: {len(d['numeric'])} numeric, {len(d['categorical'])} categorical features, "
        f"{base['entropy']['windows']} entropy windows, {len(base['ctr_by_position'])} positions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
