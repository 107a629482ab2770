"""PII in hiding places a plain scan misses (repeated keys, escaped and URL-encoded forms, Avro bytes,
file names, ids in malformed text, number tokens, cut messages), one test each."""

import base64
import json

import pytest

from tests.pii_scan import HOSTILE_PII, scan_outputs
from transforms.deadletter import dead_letter, scrub_damage_fields
from transforms.parse import _short
from transforms.privacy import (
    PiiScanner,
    PrivacyRules,
    Pseudonymiser,
    Redactor,
    protect_event,
    redact_path,
)

KEY = b"k"
RULES = PrivacyRules(("user_id", "session_id"), 24, 48)


def _pairs(text: str) -> list:
    """Every (key, value) pair of a JSON text, repeated keys included."""
    found = []

    def hook(pairs):
        found.extend(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return found


# --- 1: repeated JSON keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,secret",
    [
        (b'{"event_id":"d1","event_type":"bogus","context":{"q":"dup.first@example.com","q":"x"}}', "dup.first@"),
        (b'{"event_id":"d2","event_type":"impression","user_id":"RAWUSERDUPKEY42","user_id":null}', "RAWUSERDUPKEY42"),
        (b'{"event_id":"+44 20 7946 0111","event_id":"d4","event_type":"bogus"}', "7946 0111"),
        (b'{"q":"a@example.com","q":"x","q":"+1 415 555 0134"}', "555 0134"),
    ],
)
def test_repeated_keys_are_redacted_in_every_pair(line, secret):
    d = dead_letter("unknown_event_type", None, "m", "parse", line, "f:1", Redactor(KEY))
    assert secret not in d["raw"] and d["raw_redacted"]
    # every pair is kept (re-encoded from the pairs, not from the dict the later key wins in)
    assert [k for k, _ in _pairs(d["raw"]) if k != "_pseudonymised"] == [k for k, _ in _pairs(line.decode())]


def test_repeated_user_id_pseudonymised_in_both_pairs_and_replay_mark_follows_the_last():
    line = b'{"user_id":"RAWFIRST","user_id":"u2","event_type":"hover"}'
    r = Redactor(KEY)
    raw = dead_letter("x", None, "m", "parse", line, "f:1", r)["raw"]
    p = Pseudonymiser(KEY)
    pairs = _pairs(raw)
    assert [v for k, v in pairs if k == "user_id"] == [p.pseudonym("user_id", "RAWFIRST"), p.pseudonym("user_id", "u2")]
    assert dict(pairs)["_pseudonymised"] == r.mark({"user_id": p.pseudonym("user_id", "u2")})
    again = dead_letter("x", None, "m", "parse", raw.encode(), "f:1", r)["raw"]
    assert _pairs(again)[1] == ("user_id", p.pseudonym("user_id", "u2"))  # the replayed last id stays


# --- 4: what the scanner missed ----------------------------------------------------------------------


@pytest.mark.parametrize("kind,value", HOSTILE_PII)
def test_hostile_forms_are_found_and_redacted_everywhere(kind, value):
    r = Redactor(KEY)
    assert kind in PiiScanner().kinds(value)
    event = {
        "user_id": "u1",
        "session_id": "s1",
        "item_id": value,
        "variant": f"v-{value}",
        "user_agent": f"Mozilla/5.0 ({value})",
        "context": {"q": value, f"k {value}": "x"},
    }
    out = protect_event(event, RULES, Pseudonymiser(KEY), r)
    assert out["item_id"].startswith("pii-") and out["variant"].startswith("pii-")
    assert scan_outputs_of(out, kind, value) == []
    assert not r.not_redacted


def scan_outputs_of(obj, kind, value) -> list:
    """The corpus scanner of tests/pii_scan.py over one record written to a file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/out.jsonl", "w") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        return list(scan_outputs(tmp, [(kind, value)]).values())


# Text that looks like the decoded forms (versions, escapes, dates, ids, unicode separators) but holds no PII.
PII_LOOKALIKES = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
    "Mozilla/5.0 YaBrowser/23.11.0.0 Yowser/2.5",
    "v1.2.3.4",
    "price=%2412.99",
    "a+b=12",
    "id 2026-11-30T05:27:38+00:00",
    "ee667e43-735e-4f62-9b47-096155991978",
    "10%20off",
    "build+20261130",
    "caf\u00e9 \u2013 menu 1\u202f200",
]


@pytest.mark.parametrize("text", PII_LOOKALIKES)
def test_no_false_positives_in_the_new_forms(text):
    assert PiiScanner().kinds(text) == []


# --- 6: bytes fields ----------------------------------------------------------------------------------


def test_avro_bytes_field_is_redacted_before_base64():
    record = {"event_id": "f0", "blob": b"blob0.user@example.com +14155550134", "bin": b"\xff\x00ok", "user_id": "u1"}
    d = dead_letter("schema_violation", None, "m", "parse", record, "f.avro#0", Redactor(KEY))
    blob = base64.b64decode(json.loads(d["raw"])["blob"]).decode()
    assert "blob0.user@example.com" not in blob and "14155550134" not in blob and "[email:" in blob
    assert base64.b64decode(json.loads(d["raw"])["bin"]) == b"\xff\x00ok" and d["raw_redacted"]


# --- 8 and 9: ids in text that is not JSON ------------------------------------------------------------


@pytest.mark.parametrize(
    "line,secrets",
    [
        (b"{'event_id': 'q1', 'user_id': 'PYREPRUSER1', 'session_id': 'PYREPRSESS1'}", ["PYREPRUSER1", "PYREPRSESS1"]),
        (b'{"event_id": "q2", "user\\u005fid": "ESCKEYUSER2", "event_type": "click",', ["ESCKEYUSER2"]),
        (b'{"event_id": "q5", "user_id": \'SQUSER5\', "event_type": "click"}', ["SQUSER5"]),
        (b'{"event_id": "q6", "user_id": RAWBARE6, "x": 1', ["RAWBARE6"]),
        (b'{"event_id": "q7", "session_id": "OPEN7 with, a comma', ["OPEN7", "a comma"]),
        (b"user_id=QUERYUSER8&x=1", ["QUERYUSER8"]),
    ],
)
def test_ids_in_malformed_text_never_stay(line, secrets):
    d = dead_letter("malformed_json", None, "m", "parse", line, "f:1", Redactor(KEY))
    for secret in secrets:
        assert secret not in d["raw"]
    assert d["raw_redacted"]


def test_number_token_id_is_taken_whole():
    p = Pseudonymiser(KEY)
    line = b'{"event_id":"x","event_type":"click","event_time":1793527200000,"user_id":1e400}'
    d = dead_letter("out_of_range", "user_id", "m", "parse", line, "f:1", Redactor(KEY))
    assert d["raw"] == line.decode()  # still JSON, rejected again for the same reason on replay
    d = dead_letter("malformed_json", None, "m", "parse", b'{"user_id": 1e400, "x":', "f:1", Redactor(KEY))
    assert d["raw"] == '{"user_id": "' + p.pseudonym("user_id", "1e400") + '", "x":'


# --- 7: file names ------------------------------------------------------------------------------------


def test_pii_in_file_names_is_masked():
    name = "/in/jane.filename@example.com +14155550177.jsonl.gz"
    damage = {"file": name, "stopped_at": name + ":4", "records_read": 3, "offset": 9, "error": f"{name}: cut"}
    out = scrub_damage_fields(damage)
    assert json.dumps(out).count("[email:masked]") == 3 and "jane" not in json.dumps(out)
    assert "0177" not in json.dumps(out) and out["stopped_at"].endswith(".jsonl.gz:4")
    assert out["records_read"] == 3
    assert redact_path("/in/call+14155550177.avro#3") == "/in/call[phone:masked].avro#3"
    assert redact_path("/data/2026-11-30/events-000.jsonl.gz:12") == "/data/2026-11-30/events-000.jsonl.gz:12"
    d = dead_letter("x", None, "m", "parse", b"{}", name + ":4", Redactor(KEY))
    assert "jane" not in d["source"] and "0177" not in d["source"]


# --- minor: messages cut before redaction ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["x" * 40 + " trunc.person@example.com", "y" * 45 + " +1 415 555 0134"])
def test_message_values_are_masked_before_the_cut(value):
    short = _short(value)
    assert "trunc" not in short and "415 5" not in short and "masked" in short


# --- found by the stronger test scanner: UTF-8 PII in a line with one undecodable byte ------------------


@pytest.mark.parametrize("value", ["用户@例子.广告", "+44\u201320\u20137946\u20130957", "jane\uff20example.com"])
def test_utf8_pii_in_a_non_utf8_line_is_redacted(value):
    raw = b'{"event_id": "e1", "bad": "\xff", "note": "' + value.encode() + b'"}'
    d = dead_letter("bad_encoding", None, "m", "parse", raw, "f:1", Redactor(KEY))
    stored = base64.b64decode(d["raw"])
    assert d["raw_encoding"] == "base64" and value.encode() not in stored and b"\xff" in stored
    assert b'"bad":"\xff"' in stored and d["raw_redacted"]  # the undecodable byte is kept as it was
