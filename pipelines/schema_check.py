"""Schema registry command: refuse a new event schema version that is not backward compatible.

    python -m pipelines.schema_check check [--dir config/schemas]
    python -m pipelines.schema_check list  [--dir config/schemas]

`check` compares every version with the one before it: each field added must have a default, no field
may be removed while producers may still send it, and fastavro must read random records written with
the old version using the new one as reader schema. Exit 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transforms.schemas import SchemaError, SchemaRegistry, check_registry

DEFAULT_DIR = str(Path(__file__).resolve().parent.parent / "config" / "schemas")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.schema_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "list"])
    parser.add_argument("--dir", default=DEFAULT_DIR, help="folder of event.v<N>.avsc files (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        registry = SchemaRegistry.from_directory(args.dir)
    except SchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "list":
        for v in registry.versions:
            sv = registry.get(v)
            print(f"v{v}: {len(sv.fields)} fields  {sv.path}")
        return 0
    failed = False
    if len(registry.versions) == 1:
        print(f"v{registry.versions[0]}: only one version, nothing to compare")
    for version, problems in check_registry(registry).items():
        prev = registry.versions[registry.versions.index(version) - 1]
        if problems:
            failed = True
            print(f"v{version} is NOT backward compatible with v{prev}:")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"v{version} is backward compatible with v{prev}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
