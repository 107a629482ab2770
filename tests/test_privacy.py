import json
import os

import pytest

from transforms.deadletter import dead_letter
from transforms.privacy import (KeySource, MissingKeyError, PrivacyRules, Pseudonymiser, Redactor, protect_event,
                                truncate_ip)

KEY = b"k"


@pytest.mark.parametrize("text,kind", [
    ("gift for jane.doe@example.com", "email"),
    ("call +1 415 555 0134 now", "phone"),
    ("(415) 555-0134", "phone"),
    ("+14155550134", "phone"),
    ("from 203.0.113.77", "ip"),
    ("v6 2001:db8::1 here", "ip"),
])
def test_redacts_pii(text, kind):
    out = Redactor(KEY).redact(text)
    assert f"[{kind}:" in out
    for secret in ("jane.doe@example.com", "555", "203.0.113.77", "2001:db8::1", "14155550134"):
        assert secret not in out


@pytest.mark.parametrize("text", [
    "Mozilla/5.0 (Windows NT 10.0) Chrome/120.0.0.0 Safari/537.36", "u000123", "t 1761990000123",
    "at 12:30:45", "2026-11-01T10:00:00.123Z", "page 3 of 10",
])
def test_leaves_non_pii_alone(text):
    assert Redactor(KEY).redact(text) == text


def test_truncate_ip():
    assert truncate_ip("203.0.113.77", 24, 48) == "203.0.113.0/24"
    assert truncate_ip("2001:db8:1:2::1", 24, 48) == "2001:db8:1::/48"
    assert truncate_ip("::ffff:203.0.113.77", 24, 48) == "203.0.113.0/24"
    assert truncate_ip("not-an-ip", 24, 48) is None


def test_protect_event_removes_raw_identifiers():
    p = Pseudonymiser(KEY)
    e = {"user_id": "alice@example.com", "session_id": "s1", "ip": "198.51.100.23",
         "user_agent": "Bot/1.0 (+mailto:ops@crawler.example)", "context": {"q": "call 415-555-0134"}}
    out = protect_event(e, PrivacyRules(("user_id", "session_id"), 24, 48), p, Redactor(KEY))
    text = repr(out)
    for secret in ("alice@example.com", "198.51.100.23", "ops@crawler.example", "555-0134"):
        assert secret not in text
    assert "ip" not in out and out["ip_network"] == "198.51.100.0/24"
    assert out["user_id"] == p.pseudonym("user_id", "alice@example.com") != Pseudonymiser(b"other").pseudonym("user_id", "alice@example.com")
    assert len(out["user_id"]) == 32


def test_pseudonyms_are_domain_separated():
    p = Pseudonymiser(KEY)
    assert p.pseudonym("user_id", "x") != p.pseudonym("session_id", "x")


def test_key_source_refuses_to_start_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(MissingKeyError, match="NO_SUCH_KEY_VAR"):
        KeySource(env="NO_SUCH_KEY_VAR").load()
    assert KeySource(env="NO_SUCH_KEY_VAR", allow_demo=True).load()
    f = tmp_path / "key"
    f.write_bytes(b"secret\n")
    assert KeySource(env="NO_SUCH_KEY_VAR", file=str(f)).load() == b"secret"
    with pytest.raises(MissingKeyError, match="cannot be read"):
        KeySource(file=str(tmp_path / "missing")).load()


def test_dead_letter_keeps_payload_but_not_pii():
    raw = b'{"ip": "203.0.113.9", "context": {"q": "bob@example.com"}, "event_type": "hover"}'
    d = dead_letter("unknown_event_type", "event_type", "no", "parse", raw, "f:1", Redactor(KEY))
    assert "203.0.113.9" not in d["raw"] and "bob@example.com" not in d["raw"]
    assert d["raw_redacted"] and d["raw_bytes"] == len(raw) and json.loads(d["raw"])["event_type"] == "hover"


def test_dead_letter_non_utf8_is_base64():
    import base64
    d = dead_letter("bad_encoding", None, "x", "parse", b'{"a": "caf\xe9"}', "f:1", Redactor(KEY))
    assert d["raw_encoding"] == "base64" and base64.b64decode(d["raw"]) == b'{"a": "caf\xe9"}'
