"""Local demo: generate sample data, run the batch job on it, print what happened.

    python -m pipelines.demo [--events 50000] [--workdir sample]

Writes `sample/events.jsonl.gz` (+ its ground truth), `sample/items.csv` and
`sample/experiments.jsonl` (the metadata tables config/local.yaml points at), runs
`python -m pipelines.batch --config config/local.yaml --overwrite` on FnApiRunner into `sample/out/`
(replacing the previous demo run there), and
compares the job's counts with the generator's truth.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from pathlib import Path

import yaml

from pipelines import batch, generate, runfolder

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
            w.writerow([f"i{j:0{width}d}", rng.choice(CATEGORIES), f"{rng.uniform(2, 200):.2f}", f"brand-{rng.randrange(80)}"])
    with open(workdir / "experiments.jsonl", "w") as f:
        f.write(json.dumps({"experiment_id": generate.EXPERIMENT_ID, "owner": "ranking-team",
                            "start": "2026-10-15", "hypothesis": "ranker-v4 lifts purchases"}) + "\n")


def write_demo_config(workdir: Path) -> str:
    """config/local.yaml with its paths pointed at this workdir's tables (so --workdir can be anywhere)."""
    cfg = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    cfg["schema"]["directory"] = str(ROOT / "config" / "schemas")
    cfg["enrichment"]["items"]["path"] = str(workdir.resolve() / "items.csv")
    cfg["enrichment"]["experiments"]["path"] = str(workdir.resolve() / "experiments.jsonl")
    path = workdir / "demo.yaml"
    path.write_text("# Written by python -m pipelines.demo from config/local.yaml\n" + yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def clear_pre_manifest_output(out: Path) -> None:
    """The demo owns `<workdir>/out`. A demo run from before output folders had manifests has none, so
    --overwrite would (rightly) refuse it; the demo removes its own old output once instead."""
    if not out.is_dir() or any((out / m).exists() for m in runfolder.MARKERS) \
            or any(p.name.startswith(runfolder.STAGING_PREFIX) for p in out.iterdir()):
        return
    try:
        old = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return
    if old.get("job") == "batch":
        print(f"removing {out}: a demo run from before output manifests")
        shutil.rmtree(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--workdir", default=str(ROOT / "sample"))
    ap.add_argument("--seed", type=int, default=42)
    args, beam_args = ap.parse_known_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.jsonl.gz"
    truth = generate.generate(args.events, str(events), seed=args.seed)
    write_metadata(workdir, generate.DEFAULT_KNOBS["n_items"], args.seed)
    print(f"generated {truth['input_records']} events -> {events}")
    clear_pre_manifest_output(workdir / "out")
    rc = batch.main(["--config", write_demo_config(workdir), "--input", str(events),
                     "--output", str(workdir / "out"), "--overwrite", *beam_args])
    if rc:
        return rc
    report = json.loads((workdir / "out" / "report.json").read_text())
    same = report["counts"] == truth["counts"]
    print(f"counts equal the generator's ground truth: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
