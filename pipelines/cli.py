"""What every job's `main` shares: logging set-up and the mapping of failures to exit codes."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

from transforms.accounting import AccountingError
from transforms.config import ConfigError
from transforms.privacy import MissingKeyError
from transforms.schemas import SchemaError

EXIT_OK = 0
EXIT_CONFIG = 2       # bad configuration, missing key, bad schema folder, no input, used or unwritable
                      # --output: nothing ran
EXIT_ACCOUNTING = 3   # the run finished but its outputs do not account for every input record


def add_overwrite_flag(parser) -> None:
    """--overwrite, shared by every job that owns an output folder (see pipelines/runfolder.py)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the previous run in --output (only files its manifest lists); without it a "
                             "used output folder is refused with exit 2")


def pipeline_options(beam_args, default_runner: str, streaming: bool = False):
    """Beam options from the arguments the job did not consume, with the default runner named
    explicitly when none was given (a bare DirectRunner may silently pick another runner)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if not standard.runner:
        standard.runner = default_runner
    return options


def run_main(run: Callable, argv=None, summary: Optional[Callable] = None,
             exit_code: Optional[Callable] = None) -> int:
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
    if summary is not None:
        print(summary(result))
    return exit_code(result) if exit_code is not None else EXIT_OK
