"""pipelines.evaluate against obp.ope 0.4.1 on the Open Bandit Dataset sample obp ships.

The reference figures were computed once with obp (tests/fixtures/ope_reference.py, run by hand in a
throwaway venv: obp imports torch) and committed with the converted sample; this test needs neither.
"""

import gzip
import json
from collections import defaultdict

import fastavro
import pytest

from pipelines import evaluate
from tests.conftest import FN_API_RUNNER, ROOT, SCHEMA_DIR
from transforms.labels import LABEL_SCHEMA, SLATE_SCHEMA, make_slate

OBD = ROOT / "tests" / "fixtures" / "obd"
REFERENCE = json.loads((OBD / "reference.json").read_text())
TOL = 1e-9
OBP_NAMES = {"ips": "ipw", "snips": "snipw", "dm": "dm", "dr": "dr"}


def write_obd_inputs(tmp_path, name):
    """The converted sample -> labels and slates Avro files, as the batch job writes them."""
    with gzip.open(OBD / f"{name}_labels.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    labels = [{**r, "outcome_types": ["click"] if r["label"] else [], "label_time": r["impression_time"]} for r in rows]
    d = tmp_path / name
    d.mkdir()
    with open(d / "labels.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(LABEL_SCHEMA), labels)
    by_request = defaultdict(list)
    for label in labels:
        by_request[label["request_id"]].append({**label, "experiment_id": None, "variant": None})
    with open(d / "slates.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(SLATE_SCHEMA), [make_slate(r, ls) for r, ls in by_request.items()])
    return str(d / "labels.avro"), str(d / "slates.avro")


def obd_config(tmp_path, target):
    cfg = tmp_path / f"obd-{target}.yaml"
    policy = str(OBD / "target_policy.jsonl") if target == "file" else "uniform"
    cfg.write_text(
        f"schema: {{directory: {SCHEMA_DIR}}}\n"
        "evaluation:\n"
        "  ope:\n"
        f"    target_policy: {policy}\n"
        f"    reward_model: {OBD / 'reward_model.jsonl'}\n"
        "    context_fields: [user_id]\n"
        f"    n_actions: {REFERENCE['n_actions']}\n"
        f"    bootstrap_samples: {REFERENCE['bootstrap_samples']}\n"
        f"    seed: {REFERENCE['seed']}\n"
        f"    confidence: {1 - REFERENCE['alpha']}\n"
    )
    return str(cfg)


@pytest.mark.parametrize(
    "name,target", [("random", "file"), ("random", "uniform"), ("bts", "file"), ("bts", "uniform")]
)
def test_estimates_equal_obp(tmp_path, name, target):
    labels, slates = write_obd_inputs(tmp_path, name)
    out = tmp_path / "out"
    ev = evaluate.run(
        [
            "--config",
            obd_config(tmp_path, target),
            "--labels",
            labels,
            "--slates",
            slates,
            "--output",
            str(out),
            f"--runner={FN_API_RUNNER}",
            "--warn-only",
        ]
    )
    ref = REFERENCE["sets"][name]
    ope = ev["ope"]
    assert ope["exposures"] == ref["n_rounds"] == ope["requests"]
    assert abs(ope["on_policy_mean"] - ref["mean_reward"]) <= TOL
    for ours, theirs in OBP_NAMES.items():
        want = ref["targets"][target][theirs]
        got = ope["estimates"][ours]
        assert abs(got["value"] - want["value"]) <= TOL, (ours, got["value"], want["value"])
        if ours != "snips":  # obp bootstraps SNIPS' fixed round rewards; we re-take the ratio per replicate
            # One exposure per request and the same RandomState stream: the same replicates as obp's.
            for k in ("ci_low", "ci_high", "bootstrap_mean"):
                assert abs(got[k] - want[k]) <= TOL, (ours, k, got[k], want[k])
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["ope"]["estimates"] == ope["estimates"]


def test_fixture_is_the_obd_sample():
    # 10,000 rounds per behaviour policy, 80 items, 3 positions, as obp's OpenBanditDataset sample.
    for name in ("random", "bts"):
        with gzip.open(OBD / f"{name}_labels.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == REFERENCE["sets"][name]["n_rounds"] == 10_000
        assert {r["position"] for r in rows} == {1, 2, 3}
        assert len({r["item_id"] for r in rows}) <= REFERENCE["n_actions"]
    assert REFERENCE["obp_version"] == "0.4.1"
