"""What every Flex Template entry point does before handing over to the job's own `main(argv)`.

The Dataflow Flex Template launcher runs `python $FLEX_TEMPLATE_PYTHON_PY_FILE --<parameter>=<value> ...`
(templates/<job>/main.py), one `--name=value` per launch parameter, plus the pipeline options
Dataflow fills in. This module, shared by those entry points, does only launcher-side chores:

- `normalise_job_flags`: the job's dashed flags (`--labels-topic`) are also accepted spelled with
  underscores (`--labels_topic`). metadata.json names parameters exactly as the argparse flags
  (dashes), but an underscore spelling would otherwise fall through `parse_known_args` into the
  Beam options and be silently ignored.
- `with_flex_defaults`: `--runner=DataflowRunner` (the jobs' own default is a local runner, which on a
  launcher VM would run the whole job there), `--sdk_container_image` from
  $FEEDBACK_SDK_CONTAINER_IMAGE (the image itself, baked in at build time) and `--setup_file` from
  $FLEX_TEMPLATE_PYTHON_SETUP_FILE, each only when not already given.
- `load_hmac_key`: when $FEEDBACK_HMAC_KEY is unset and $FEEDBACK_HMAC_KEY_SECRET names a Secret
  Manager secret version, read it into $FEEDBACK_HMAC_KEY (the job checks the key at start-up).
  Workers get it the same way from templates/entrypoint.sh (`python flex_launch.py --print-hmac-key`).

The entry points stay thin on purpose: the launcher runs them as `__main__`, and nothing defined
there may end up in the pipeline (workers could not unpickle it). Nothing here is pickled into the
pipeline either (it runs as `__main__`'s helper on the launcher only).
Stdlib only, apart from google-cloud-secret-manager (installed with apache-beam[gcp]), imported lazily.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HMAC_KEY_ENV = "FEEDBACK_HMAC_KEY"
HMAC_SECRET_ENV = "FEEDBACK_HMAC_KEY_SECRET"
SDK_IMAGE_ENV = "FEEDBACK_SDK_CONTAINER_IMAGE"
SETUP_FILE_ENV = "FLEX_TEMPLATE_PYTHON_SETUP_FILE"


def job_option_strings(parser: argparse.ArgumentParser) -> list:
    """The long option strings of a parser's own flags (no -h/--help), e.g. ['--config', '--labels-topic']."""
    return [
        s
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        for s in a.option_strings
        if s.startswith("--")
    ]


def normalise_job_flags(argv: Iterable[str], option_strings: Iterable[str]) -> list:
    """['--labels_topic=T'] -> ['--labels-topic=T'] for the job's dashed flags; everything else untouched."""
    spelled = {"--" + s[2:].replace("-", "_"): s for s in option_strings if "-" in s[2:]}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(spelled[name] + eq + value if name in spelled else arg)
    return out


def boolean_flags(parser: argparse.ArgumentParser) -> set:
    """Long options that take no value (store_true), e.g. {'--warn-only'}."""
    return {
        s
        for a in parser._actions
        if isinstance(a, argparse._StoreTrueAction)
        for s in a.option_strings
        if s.startswith("--")
    }


def normalise_boolean_flags(argv: Iterable[str], flags: set) -> list:
    """Template parameters always carry a value: '--warn-only=true' -> '--warn-only', '=false' -> dropped."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in flags:
            if value.strip().lower() in ("true", "1", "yes"):
                out.append(name)
            continue
        out.append(arg)
    return out


def _has_option(argv: Iterable[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def with_flex_defaults(argv: Iterable[str], environ: MutableMapping[str, str]) -> list:
    """Append the options a Flex launch needs when the launch request did not set them."""
    argv = list(argv)
    if not _has_option(argv, "--runner"):
        argv.append("--runner=DataflowRunner")
    image = environ.get(SDK_IMAGE_ENV)
    if image and not _has_option(argv, "--sdk_container_image", "--worker_harness_container_image"):
        argv.append(f"--sdk_container_image={image}")
    setup_file = environ.get(SETUP_FILE_ENV)
    if setup_file and not _has_option(argv, "--setup_file"):
        argv.append(f"--setup_file={setup_file}")
    return argv


def _secret_manager_client():
    from google.cloud import secretmanager  # apache-beam[gcp] installs it

    return secretmanager.SecretManagerServiceClient()


def read_secret(name: str, client_factory: Callable = _secret_manager_client) -> str:
    """The text of a Secret Manager secret version: projects/P/secrets/S/versions/V (V may be 'latest')."""
    response = client_factory().access_secret_version(request={"name": name})
    return response.payload.data.decode("utf-8").strip()


def load_hmac_key(environ: MutableMapping[str, str], client_factory: Callable = _secret_manager_client) -> bool:
    """Set $FEEDBACK_HMAC_KEY from the secret named in $FEEDBACK_HMAC_KEY_SECRET, unless already set.
    Returns whether it read the secret. Never logs the key."""
    if environ.get(HMAC_KEY_ENV) or not environ.get(HMAC_SECRET_ENV):
        return False
    environ[HMAC_KEY_ENV] = read_secret(environ[HMAC_SECRET_ENV], client_factory)
    return True


def launch(module: str, argv: list | None = None, subcommand: str | None = None) -> int:
    """Run `<module>.main(argv)` as a Flex Template launch; `subcommand` for jobs with sub-parsers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    job = importlib.import_module(module)
    parser = job.build_parser()
    if subcommand:
        parser = _subparser(parser, subcommand)
    argv = normalise_job_flags(argv, job_option_strings(parser))
    argv = with_flex_defaults(normalise_boolean_flags(argv, boolean_flags(parser)), os.environ)
    load_hmac_key(os.environ)
    os.chdir(REPO_ROOT)  # so a relative --config (config/streaming.yaml) resolves inside the image
    return job.main(([subcommand] if subcommand else []) + argv)


def entry_point(module: str, subcommand: str | None = None) -> Callable[[list | None], int]:
    """The `main(argv=None)` of a templates/<job>/main.py: `launch` for that job."""
    return functools.partial(launch, module, subcommand=subcommand)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(f"{parser.prog}: no sub-command {name!r}")


if __name__ == "__main__":
    # Used by templates/entrypoint.sh on workers: prints the key for the shell to export (not logged).
    if sys.argv[1:] == ["--print-hmac-key"]:
        sys.stdout.write(read_secret(os.environ[HMAC_SECRET_ENV]))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} --print-hmac-key")
