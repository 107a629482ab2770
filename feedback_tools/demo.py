"""Local demo: generate sample data, run the batch job on it, print what happened.

    python -m feedback_tools.demo [--events 50000] [--workdir sample] [--seed 42] [--start 2026-11-01T00:00:00Z]

Writes `sample/events.jsonl.gz` (+ its ground truth), `sample/items.csv` and
`sample/experiments.jsonl` (the metadata tables config/local.yaml points at), runs
`python -m pipelines.batch --config config/local.yaml --overwrite` on FnApiRunner into `sample/out/`
(replacing the previous demo run there), compares the job's counts with the generator's truth and prints
bot precision and recall per rule. Exit 0 only when the counts equal the truth.

The result does not depend on the wall clock: the traffic starts at `--start` (any date from 2000 on),
and the demo config widens `validation.max_clock_skew` so that no generated event counts as "in the
future" whatever today's date is.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import json
import random
import shutil
import sys
from pathlib import Path

import yaml

from feedback_tools import generate
from pipelines import batch, runfolder

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("books", "music", "shoes", "toys", "garden", "kitchen", "games", "beauty")


def write_metadata(workdir: Path, n_items: int, seed: int) -> None:
    """Item and experiment tables. 1% of items are left out on purpose: a missing lookup is a counted
    default (feedback.enrich.item_lookup_missing in the report's metrics), not an error."""
    rng = random.Random(seed)
    width = max(5, len(str(n_items - 1)))
    with open(workdir / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "category", "price", "brand"])
        for j in range(n_items):
            if rng.random() < 0.01:
                continue
            w.writerow(
                [f"i{j:0{width}d}", rng.choice(CATEGORIES), f"{rng.uniform(2, 200):.2f}", f"brand-{rng.randrange(80)}"]
            )
    with open(workdir / "experiments.jsonl", "w") as f:
        f.write(
            json.dumps(
                {
                    "experiment_id": generate.EXPERIMENT_ID,
                    "owner": "ranking-team",
                    "start": "2026-10-15",
                    "hypothesis": "ranker-v4 lifts purchases",
                }
            )
            + "\n"
        )


def clock_skew_for(last_event_iso: str, now: dt.datetime) -> float:
    """validation.max_clock_skew (s) that accepts every generated event whatever the wall clock: the
    default day, or as far as the data reaches past now plus a day."""
    last = dt.datetime.fromisoformat(last_event_iso.replace("Z", "+00:00"))
    return max(86400.0, (last - now).total_seconds() + 86400.0)


def write_demo_config(workdir: Path, max_clock_skew_s: float = 86400.0) -> str:
    """config/local.yaml with its paths pointed at this workdir's tables (so --workdir can be anywhere)."""
    cfg = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    cfg["schema"]["directory"] = str(ROOT / "config" / "schemas")
    cfg["enrichment"]["items"]["path"] = str(workdir.resolve() / "items.csv")
    cfg["enrichment"]["experiments"]["path"] = str(workdir.resolve() / "experiments.jsonl")
    cfg.setdefault("validation", {})["max_clock_skew"] = f"{int(max_clock_skew_s) + 1}s"
    path = workdir / "demo.yaml"
    path.write_text(
        "# Written by python -m feedback_tools.demo from config/local.yaml\n" + yaml.safe_dump(cfg, sort_keys=False)
    )
    return str(path)


def clear_pre_manifest_output(out: Path) -> None:
    """The demo owns `<workdir>/out`. A demo run from before output folders had manifests has none, so
    --overwrite would (rightly) refuse it; the demo removes its own old output once instead."""
    if (
        not out.is_dir()
        or any((out / m).exists() for m in runfolder.MARKERS)
        or any(p.name.startswith(runfolder.STAGING_PREFIX) for p in out.iterdir())
    ):
        return
    try:
        old = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return
    if old.get("job") == "batch":
        print(f"removing {out}: a demo run from before output manifests")
        shutil.rmtree(out)


def flagged_rules(out_dir: Path) -> dict:
    """event_id -> bot_rule, from the job's bots output."""
    import fastavro

    out = {}
    for f in sorted(glob.glob(str(out_dir / "bots" / "*.avro"))):
        with open(f, "rb") as fh:
            for r in fastavro.reader(fh):
                out[r["event_id"]] = r["bot_rule"]
    return out


def precision_recall_by_rule(flagged: dict, truth_by_rule: dict) -> dict:
    """rule -> (true positives, flagged, intended, precision or None, recall or None)."""
    rows = {}
    for rule in sorted(set(truth_by_rule) | set(flagged.values())):
        mine = {e for e, r in flagged.items() if r == rule}
        meant = set(truth_by_rule.get(rule, ()))
        tp = len(mine & meant)
        rows[rule] = (tp, len(mine), len(meant), tp / len(mine) if mine else None, tp / len(meant) if meant else None)
    return rows


def _pct(x):
    return "   n/a" if x is None else f"{x:6.1%}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feedback_tools.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--workdir", default=str(ROOT / "sample"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--start", default=generate.DEFAULT_START, help="ISO-8601 start of the generated traffic")
    args, beam_args = ap.parse_known_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.jsonl.gz"
    truth = generate.generate(args.events, str(events), seed=args.seed, start=args.start)
    write_metadata(workdir, generate.DEFAULT_KNOBS["n_items"], args.seed)
    print(f"generated {truth['input_records']} events from {args.start} (seed {args.seed}) -> {events}")
    clear_pre_manifest_output(workdir / "out")
    skew = clock_skew_for(truth["event_time_range"][1], dt.datetime.now(dt.timezone.utc))
    rc = batch.main(
        [
            "--config",
            write_demo_config(workdir, skew),
            "--input",
            str(events),
            "--output",
            str(workdir / "out"),
            "--overwrite",
            *beam_args,
        ]
    )
    if rc:
        return rc
    report = json.loads((workdir / "out" / "report.json").read_text())
    print("bots per rule against the generator's intent (precision = flagged by the rule and meant as it):")
    for rule, (tp, n_flagged, n_meant, precision, recall) in precision_recall_by_rule(
        flagged_rules(workdir / "out"), truth["bot_event_ids_by_rule"]
    ).items():
        print(
            f"  {rule:<26} precision {_pct(precision)}  recall {_pct(recall)}  "
            f"({tp} of {n_flagged} flagged, {n_meant} intended)"
        )
    same = report["counts"] == truth["counts"]
    print(f"counts equal the generator's ground truth: {same}")
    if not same:
        print(f"  job:   {report['counts']}\n  truth: {truth['counts']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
