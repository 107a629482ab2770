"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) for `python -m pipelines.replay archive`.

Thin on purpose: the launcher runs this file as `__main__`, and nothing defined here may end up in
the pipeline (workers could not unpickle it). templates/flex_launch.py does the launcher chores.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # templates/, for flex_launch

from flex_launch import launch  # noqa: E402

JOB = "pipelines.replay"
SUBCOMMAND = "archive"


def main(argv=None) -> int:
    return launch(JOB, argv, SUBCOMMAND)


if __name__ == "__main__":
    sys.exit(main())
