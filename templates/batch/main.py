"""Flex Template entry point for `python -m pipelines.batch` (see templates/flex_launch.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # templates/, for flex_launch

from flex_launch import entry_point  # noqa: E402

JOB, SUBCOMMAND = "pipelines.batch", None
main = entry_point(JOB, SUBCOMMAND)

if __name__ == "__main__":
    sys.exit(main())
