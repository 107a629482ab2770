"""The launcher side every job shares: options, running the pipeline, counters read back, report
writing, and the mapping of failures to exit codes.

A job module keeps only its own parts, like Beam's `examples/wordcount.py`: `build_parser()`,
`build(p, ...)` returning its PCollections (for tests), `run(argv)` wiring the pieces below, and
`main(argv)` = `run_main(run, argv, ...)`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems

from pipelines.runfolder import RunFolderLostError
from transforms.accounting import AccountingError
from transforms.config import ConfigError
from transforms.contract import METRICS_PREFIX
from transforms.io import read_all, sum_counters
from transforms.privacy import MissingKeyError
from transforms.schemas import SchemaError

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration, missing key, bad schema folder, no input, used or unwritable
# --output: nothing ran
EXIT_ACCOUNTING = 3  # the run finished but its outputs do not account for every input record
EXIT_FOLDER_LOST = 5  # another run took the output folder while this one ran: nothing published
# Without --runner, batch jobs run on FnApiRunner, named explicitly: a bare DirectRunner first tries to
# download Prism and, for stateful pipelines, silently switches runners (see shared/BEAM-NOTES.md).
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


# Prism (Beam 2.77) splits a stateful stage's bundle that shows no progress and releases the split-off
# keys while the rest still runs on them, so one of two state writes for a key is lost: vanished events,
# timers firing several times, labels written twice (apache/beam#35771; repro/prism_split_repro.py).
# Prism's own switch turns the splitting off; added to every Prism run.
PRISM_NO_SPLIT_EXPERIMENT = "prism_disable_sdf_split"

# --- options ------------------------------------------------------------------------------------


def add_overwrite_flag(parser) -> None:
    """--overwrite, shared by every job that owns an output folder (see pipelines/runfolder.py)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the previous run in --output (only files its manifest lists); without it a "
        "used output folder is refused with exit 2",
    )


def pipeline_options(beam_args, default_runner: str = DEFAULT_RUNNER, streaming: bool = False):
    """Beam options from the arguments the job did not consume, with the default runner named
    explicitly when none was given (a bare DirectRunner may silently pick another runner)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if not standard.runner:
        standard.runner = default_runner
    if "prism" in str(standard.runner).lower():
        from apache_beam.options.pipeline_options import DebugOptions

        options.view_as(DebugOptions).add_experiment(PRISM_NO_SPLIT_EXPERIMENT)
    return options


def runner_name(options) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner)


def single_worker(options) -> bool:
    """Whether every bundle runs in one SDK worker: FnApiRunner with one worker (its default). There a
    shuffle that spreads records over workers has nothing to spread, and FnApiRunner would hold its
    whole input in memory while the next stage runs."""
    from apache_beam.options.pipeline_options import DirectOptions

    runner = runner_name(options).rsplit(".", 1)[-1].lower()
    return runner == "fnapirunner" and options.view_as(DirectOptions).direct_num_workers == 1


def require_match(flag: str, pattern: str) -> None:
    """Start-up check (exit 2, before anything runs): an input glob that matches nothing is almost
    always a typo; a folder (named, or matched by the glob) or an unreadable local file would only
    fail once the pipeline runs."""
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - Beam raises its own error for a bad pattern or listing
        raise ConfigError(f"{flag}: cannot list {pattern!r} ({type(e).__name__}: {e})") from None
    if not matches:
        raise ConfigError(f"{flag}: no file matches {pattern!r}")
    local = [m.path for m in matches if "://" not in m.path]
    folders = sorted(p for p in local if os.path.isdir(p))
    if folders:
        shown = ", ".join(folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        raise ConfigError(
            f"{flag}: {pattern!r} matches folders ({shown}), not files; name the files, e.g. "
            f"{folders[0].rstrip('/') + '/*.jsonl.gz'!r}"
        )
    unreadable = sorted(p for p in local if not os.access(p, os.R_OK))
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise ConfigError(f"{flag}: cannot read {shown} (permission denied)")


# --- running ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finished:
    """A pipeline run to completion: the runner's result and the seconds from build to finish."""

    result: object
    elapsed_seconds: float


def run_pipeline(options, build: Callable) -> Finished:
    """Builds a pipeline with `build(p)` and runs it to completion (batch jobs)."""
    import apache_beam as beam

    started = time.monotonic()
    p = beam.Pipeline(options=options)
    build(p)
    # The graph's objects (transforms, options, protos) live until the end: frozen, they leave the
    # collector's generations, so the collections the run triggers no longer rescan them. Unfrozen
    # afterwards: a process running several pipelines (tests) can still free each one.
    gc.freeze()
    try:
        result = p.run()
        result.wait_until_finish()
    finally:
        gc.unfreeze()
    return Finished(result, round(time.monotonic() - started, 3))


# --- read-back ----------------------------------------------------------------------------------


def beam_counters(result, namespace: str = METRICS_PREFIX, qualified: bool = True) -> dict:
    """The job's own Beam counters (namespaces starting with `namespace`) as the runner reports them
    (committed, else attempted). `qualified`: keys are `<namespace>.<name>`, else the bare name."""
    try:
        counters = result.metrics().query()["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # a runner without metrics support
        return {}
    rows = [
        {
            "counter": f"{c.key.metric.namespace}.{c.key.metric.name}" if qualified else c.key.metric.name,
            "count": c.committed if c.committed is not None else c.attempted,
        }
        for c in counters
        if c.key.metric.namespace.startswith(namespace)
    ]
    return dict(sorted(sum_counters(rows).items()))


def read_jsonl_glob(pattern: str) -> list:
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows += [json.loads(line) for line in read_all(f).decode().splitlines() if line.strip()]
    return rows


def read_counters(prefix: str) -> dict:
    """The (counter, count) rows of the files `<prefix>*`, summed per counter."""
    return sum_counters(read_jsonl_glob(prefix + "*"))


# --- reports ------------------------------------------------------------------------------------


def write_json(path: str, data: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=False).encode() + b"\n")


def refuse_unless(ok: bool, message: str, report_path: str, report: dict) -> None:
    """A finished run that does not account for its records is not published: its report is written
    (into staging) and AccountingError raised (exit 3)."""
    if not ok:
        write_json(report_path, report)
        raise AccountingError(f"{message}; not published, see {report_path}")


def json_summary(report: dict, exclude=("metrics",)) -> str:
    return json.dumps({k: v for k, v in report.items() if k not in exclude}, indent=2)


def quality_exit_code(report: dict, check: str = "SLO") -> int:
    """The exit code of `report["quality"]`; prints each breached `check` (error, or warning in warn mode)."""
    code = report["quality"]["exit_code"]
    for b in report["quality"]["slos"]:
        if b["ok"] is False:
            print(f"{'error' if code else 'warning'}: {check} {b['slo']} breached: {b['message']}", file=sys.stderr)
    return code


def run_main(run: Callable, argv=None, summary: Callable | None = None, exit_code: Callable | None = None) -> int:
    """Runs `run(argv)`; prints `summary(result)`; returns `exit_code(result)` (default 0) or the
    failure's exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        result = run(argv)
    except (ConfigError, MissingKeyError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except AccountingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ACCOUNTING
    except RunFolderLostError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FOLDER_LOST
    if summary is not None:
        print(summary(result))
    return exit_code(result) if exit_code is not None else EXIT_OK
