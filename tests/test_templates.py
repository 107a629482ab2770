"""Dataflow Flex Templates (templates/): metadata matches each job's CLI, images match setup.py.

No Docker daemon or Google Cloud here: these tests read the files and run the launcher entry points
locally up to the point where the job rejects its config (which proves the arguments reach the job).
"""

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

TEMPLATES = ROOT / "templates"

# template folder -> (job module, sub-command or None)
JOBS = {
    "streaming": ("pipelines.streaming", None),
    "batch": ("pipelines.batch", None),
    "replay/archive": ("pipelines.replay", "archive"),
    "replay/dead-letters": ("pipelines.replay", "dead-letters"),
}

# A valid value for every parameter: must match its regexes and parse with the job's parser.
SAMPLES = {
    "config": "config/streaming.yaml",
    "subscription": "projects/my-project/subscriptions/feedback-events",
    "topic": "projects/my-project/topics/feedback-events",
    "output": "gs://my-bucket/feedback/out",
    "labels-topic": "projects/my-project/topics/feedback-labels",
    "dead-letter-topic": "projects/my-project/topics/feedback-dead-letters",
    "message-format": "avro",
    "input": "gs://my-bucket/events/2026-11-01/*.jsonl.gz",
    "archive": "gs://my-bucket/feedback/out/archive/**/*.avro",
    "from": "2026-11-01T00:00:00Z",
    "to": "2026-11-02T00:00:00+00:00",
    "dead-letters": "gs://my-bucket/feedback/out/dead_letter/*.jsonl",
    "baseline": "gs://my-bucket/feedback/baseline.json",
    "warn-only": "true",
    "overwrite": "true",
}
INVALID = {
    "config": ["gs://my-bucket/streaming.yaml ", "config/streaming.json"],
    "subscription": ["feedback-events", "projects/p/topics/t"],
    "topic": ["projects/p/subscriptions/s"],
    "output": ["/tmp/out", "out/"],
    "message-format": ["protobuf", "JSON"],
    "from": ["2026-11-01 00:00", "yesterday"],
}
# Exactly one source for the streaming job (a required mutually exclusive group).
LEFT_OUT = {"streaming": {"topic"}}

# Top-level labels of the streaming graph. Dataflow's --update matches steps by these names (and the
# names nested under them): renaming one makes the update incompatible unless mapped with
# --transform-name-mappings. templates/README.md lists them; change both on purpose, never by accident.
STREAMING_TOP_LEVEL_LABELS = [
    "ReadEvents",
    "Parse",
    "Privacy",
    "Enrich",
    "Dedupe",
    "Bots",
    "Labels",
    "Slates",
    "AllDeadLetters",
    "UpstreamInput0",
    "InputRecords",
    "AllInputs",
    "Features",
    "Exposures",
    "Accounting",
    "DeadAndTooLate",
    "OutputLatencyArchive",
    "WindowArchive",
    "WriteArchive",
    "WindowBots",
    "WriteBots",
    "OutputLatencyLabels",
    "WindowLabels",
    "WriteLabels",
    "WindowSlates",
    "WriteSlates",
    "WindowDeadLetter",
    "WriteDeadLetter",
    "WindowOrphanOutcomes",
    "WriteOrphanOutcomes",
    "WindowLateOutcomes",
    "WriteLateOutcomes",
    "WindowDuplicates",
    "WriteDuplicates",
    "WindowConsentDropped",
    "WriteConsentDropped",
    "CountsToJson",
    "WriteCounts",
    "QualityPerWindow",
    "QualityRecord",
    "WriteQuality",
    "WriteFeatures",
    "OnlineFeatures",
    "LabelsToJson",
    "PublishLabels",
    "DeadLettersToJson",
    "PublishDeadLetters",
]

sys.path.insert(0, str(TEMPLATES))
import flex_launch  # noqa: E402


def metadata(folder: str) -> dict:
    return json.loads((TEMPLATES / folder / "metadata.json").read_text())


def job_parser(folder: str) -> argparse.ArgumentParser:
    module, sub = JOBS[folder]
    parser = importlib.import_module(module).build_parser()
    return flex_launch._subparser(parser, sub) if sub else parser


def job_actions(folder: str) -> dict:
    """Parameter name (flag without leading dashes) -> argparse action."""
    parser = job_parser(folder)
    return {
        s[2:]: a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        for s in a.option_strings
        if s.startswith("--")
    }


def load_launcher(folder: str):
    path = TEMPLATES / folder / "main.py"
    spec = importlib.util.spec_from_file_location(f"flex_main_{folder.replace('/', '_').replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_beam_version() -> str:
    m = re.search(r'^BEAM_VERSION\s*=\s*"([^"]+)"', (ROOT / "setup.py").read_text(), re.M)
    assert m, 'setup.py must define BEAM_VERSION = "x.y.z"'
    return m.group(1)


def test_every_template_folder_is_covered():
    found = {str(p.parent.relative_to(TEMPLATES)) for p in TEMPLATES.rglob("metadata.json")}
    assert found == set(JOBS)
    for folder in JOBS:
        assert (TEMPLATES / folder / "main.py").is_file(), folder


@pytest.mark.parametrize("folder", sorted(JOBS))
def test_parameters_are_exactly_the_job_flags(folder):
    params = [p["name"] for p in metadata(folder)["parameters"]]
    assert len(params) == len(set(params)), f"duplicate parameters: {params}"
    assert not any(name.startswith("-") for name in params)
    assert set(params) == set(job_actions(folder)), "metadata.json parameters must be the job's argparse flags"


@pytest.mark.parametrize("folder", sorted(JOBS))
def test_optional_matches_required(folder):
    actions = job_actions(folder)
    for p in metadata(folder)["parameters"]:
        assert p.get("isOptional", False) == (not actions[p["name"]].required), p["name"]
        assert "is_optional" not in p, "the API field is isOptional (camelCase)"


@pytest.mark.parametrize("folder", sorted(JOBS))
def test_every_parameter_is_documented_and_validated(folder):
    meta = metadata(folder)
    assert meta["name"] and meta["description"]
    assert meta["sdkInfo"] == {"language": "PYTHON"}
    assert meta["streaming"] is (folder == "streaming")
    for p in meta["parameters"]:
        assert p["label"].strip() and p["helpText"].strip(), p["name"]
        assert p["regexes"], f"{p['name']}: no regexes"
        for rx in p["regexes"]:
            pattern = re.compile(rx)
            assert pattern.fullmatch(SAMPLES[p["name"]]), f"{p['name']}: {SAMPLES[p['name']]!r} !~ {rx}"
            for bad in INVALID.get(p["name"], []):
                assert not pattern.fullmatch(bad), f"{p['name']}: {bad!r} should not match {rx}"


@pytest.mark.parametrize("folder", sorted(JOBS))
def test_launch_parameters_parse_as_the_job_flags(folder):
    """What the launcher passes (--name=value per parameter) lands in the job's own arguments."""
    parser, actions = job_parser(folder), job_actions(folder)
    names = [p["name"] for p in metadata(folder)["parameters"] if p["name"] not in LEFT_OUT.get(folder, ())]
    argv = [f"--{n}={SAMPLES[n]}" for n in names] + ["--runner=DataflowRunner", "--max_num_workers=5"]
    booleans = flex_launch.boolean_flags(parser)
    args, unknown = parser.parse_known_args(flex_launch.normalise_boolean_flags(argv, booleans))
    assert unknown == ["--runner=DataflowRunner", "--max_num_workers=5"]
    for n in names:
        expected = True if f"--{n}" in booleans else SAMPLES[n]
        assert getattr(args, actions[n].dest) == expected, n
    # Underscore spellings are normalised to the dashed flags instead of leaking into Beam's options.
    fixed = flex_launch.normalise_job_flags(
        [f"--{n.replace('-', '_')}={SAMPLES[n]}" for n in names], flex_launch.job_option_strings(parser)
    )
    assert fixed == [f"--{n}={SAMPLES[n]}" for n in names]


def test_normalise_leaves_beam_options_and_values_alone():
    opts = ["--config", "--labels-topic", "--dead-letter-topic"]
    argv = [
        "--labels_topic=projects/p/topics/a_b",
        "--dead_letter_topic",
        "t",
        "--max_num_workers=3",
        "--labels-topic=x",
        "--config=c_d.yaml",
    ]
    assert flex_launch.normalise_job_flags(argv, opts) == [
        "--labels-topic=projects/p/topics/a_b",
        "--dead-letter-topic",
        "t",
        "--max_num_workers=3",
        "--labels-topic=x",
        "--config=c_d.yaml",
    ]


def test_flex_defaults():
    env = {
        "FEEDBACK_SDK_CONTAINER_IMAGE": "europe-docker.pkg.dev/p/r/feedback-streaming:1",
        "FLEX_TEMPLATE_PYTHON_SETUP_FILE": "/template/setup.py",
    }
    assert flex_launch.with_flex_defaults(["--config=c.yaml"], env) == [
        "--config=c.yaml",
        "--runner=DataflowRunner",
        "--sdk_container_image=europe-docker.pkg.dev/p/r/feedback-streaming:1",
        "--setup_file=/template/setup.py",
    ]
    given = ["--runner=DirectRunner", "--sdk_container_image=other", "--setup_file=/x/setup.py"]
    assert flex_launch.with_flex_defaults(given, env) == given
    assert flex_launch.with_flex_defaults([], {}) == ["--runner=DataflowRunner"]


class _FakeSecrets:
    def __init__(self, calls):
        self.calls = calls

    def access_secret_version(self, request):
        self.calls.append(request["name"])
        return type("R", (), {"payload": type("P", (), {"data": b"s3cret-key\n"})()})()


def test_hmac_key_from_secret_manager():
    calls = []
    env = {"FEEDBACK_HMAC_KEY_SECRET": "projects/p/secrets/feedback-hmac-key/versions/latest"}
    assert flex_launch.load_hmac_key(env, lambda: _FakeSecrets(calls)) is True
    assert env["FEEDBACK_HMAC_KEY"] == "s3cret-key"
    assert calls == ["projects/p/secrets/feedback-hmac-key/versions/latest"]
    # An explicit key wins; no secret configured: nothing read.
    assert (
        flex_launch.load_hmac_key(
            {"FEEDBACK_HMAC_KEY": "k", "FEEDBACK_HMAC_KEY_SECRET": "x"}, lambda: _FakeSecrets(calls)
        )
        is False
    )
    assert flex_launch.load_hmac_key({}, lambda: _FakeSecrets(calls)) is False
    assert len(calls) == 1


@pytest.mark.parametrize("folder", sorted(JOBS))
def test_launcher_main_imports_and_reaches_the_job(folder, monkeypatch, capsys):
    launcher = load_launcher(folder)
    assert callable(launcher.main)
    module, sub = JOBS[folder]
    assert (launcher.JOB, launcher.SUBCOMMAND) == (module, sub)
    job = importlib.import_module(module)
    assert callable(job.main) and callable(job.build_parser)
    monkeypatch.chdir(ROOT)  # launch() changes directory to the repository root
    names = [p["name"] for p in metadata(folder)["parameters"] if p["name"] not in LEFT_OUT.get(folder, ())]
    argv = [f"--{n.replace('-', '_')}={SAMPLES[n]}" for n in names if n != "config"]
    # A config that does not exist: the job stops with exit code 2 before building any pipeline, which
    # shows the launcher handed it the arguments (sub-command included) it expects.
    code = launcher.main(argv + ["--config=config/does-not-exist.yaml"])
    assert code == 2
    assert "config/does-not-exist.yaml" in capsys.readouterr().err


def test_dockerfile_beam_version_equals_setup_py():
    dockerfile = (TEMPLATES / "Dockerfile").read_text()
    m = re.search(r"^ARG BEAM_VERSION=(\S+)$", dockerfile, re.M)
    assert m and m.group(1) == setup_beam_version()
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk" in dockerfile
    assert re.search(r"^FROM gcr\.io/dataflow-templates-base/python311-template-launcher-base:", dockerfile, re.M)
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in dockerfile
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/templates/${JOB}/main.py" in dockerfile
    assert "ENV FLEX_TEMPLATE_PYTHON_SETUP_FILE=/template/setup.py" in dockerfile
    assert 'ENTRYPOINT ["/bin/sh", "/template/templates/entrypoint.sh"]' in dockerfile
    assert 'exec /opt/apache/beam/boot "$@"' in (TEMPLATES / "entrypoint.sh").read_text()
    # Same Python minor version as the environment the tests (and the launcher code) run on.
    assert sys.version_info[:2] == (3, 11)


def test_entrypoint_is_valid_sh():
    r = subprocess.run(["sh", "-n", str(TEMPLATES / "entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cloudbuild_builds_every_template():
    build = yaml.safe_load((TEMPLATES / "cloudbuild.yaml").read_text())
    assert build["substitutions"]["_JOBS"].split() == list(JOBS)


def test_streaming_top_level_labels_are_stable(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import streaming
    from pipelines.graph import GraphSettings
    from transforms.config import load_config

    cfg = load_config(str(ROOT / "config" / "streaming.yaml"))
    settings = GraphSettings.from_config(cfg)
    p = beam.Pipeline(options=PipelineOptions(streaming=True))
    read = p | "ReadEvents" >> streaming.ReadEvents(
        SAMPLES["subscription"], None, "json", settings.validation.registry, None
    )
    streaming.build(
        p,
        cfg,
        settings,
        read.records,
        SAMPLES["output"],
        [read[streaming._MessageToRawFn.UNDECODABLE]],
        SAMPLES["labels-topic"],
        SAMPLES["dead-letter-topic"],
    )
    labels = [t.full_label for t in p.transforms_stack[0].parts]
    assert labels == STREAMING_TOP_LEVEL_LABELS, (
        "top-level step labels of the streaming job changed: this breaks `--update` of a running job "
        "unless mapped with --transform-name-mappings; update STREAMING_TOP_LEVEL_LABELS and templates/README.md"
    )
    readme = (TEMPLATES / "README.md").read_text()
    missing = [label for label in labels if f"`{label}`" not in readme]
    assert not missing, f"templates/README.md does not list {missing}"


def test_boolean_template_parameters_become_bare_flags():
    flex = flex_launch
    from pipelines.batch import build_parser

    flags = flex.boolean_flags(build_parser())
    assert flags == {"--warn-only", "--overwrite"}
    assert flex.normalise_boolean_flags(["--warn-only=true", "--config=c"], flags) == ["--warn-only", "--config=c"]
    assert flex.normalise_boolean_flags(["--warn-only=false"], flags) == []
