"""The dead-letter record: why a record was rejected, where, and the payload itself (PII redacted)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re

import orjson

from transforms.privacy import DEAD_LETTER_PSEUDONYMISED, PiiScanner


def _default(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def payload_bytes(payload: bytes | dict) -> bytes:
    """The record as bytes: a JSON line as received, an Avro record re-encoded as JSON."""
    if isinstance(payload, bytes):
        return payload
    return orjson.dumps(payload, default=_default, option=orjson.OPT_SORT_KEYS)


def redact_payload_text(text: str, redactor) -> str:
    """The payload text with no raw PII, still re-parseable the way it was.

    JSON is decoded (so escapes like `\\u0040` cannot hide an address), redacted value by value and key
    by key, with `user_id`/`session_id` pseudonymised as a valid event's would be, and re-encoded; it
    stays byte-identical when nothing changed. Text that is not JSON is redacted as text (in its
    JSON-unescaped form where that reveals PII). A redactor without `redact_record` (the readers'
    no-op ones) only gets `redact(text)`.
    """
    if not hasattr(redactor, "redact_record"):
        # A reader's no-op redactor holds no key (e.g. an undecodable Avro body, whose strings are still
        # plain bytes): PII is masked without a token rather than kept.
        return _mask_unkeyed(redactor.redact(text))
    try:
        obj = orjson.loads(text)
        redacted = redactor.redact_record(obj)
        return text if redacted == obj else orjson.dumps(redacted).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, RecursionError):
        # Not JSON, or nested deeper than can be re-encoded: redacted as text, ids pseudonymised in place.
        return redactor.redact(_pseudonymise_ids_in_text(text, redactor), "raw")


# "user_id": "..." or "user_id": 123 in text that is not (complete) JSON.
_ID_IN_TEXT_RE = re.compile(r'("(?:' + "|".join(DEAD_LETTER_PSEUDONYMISED) + r')"\s*:\s*)("(?:[^"\\]|\\.)*"|-?\d+)')


def _pseudonymise_ids_in_text(text: str, redactor) -> str:
    def one(m):
        field = m.group(1).split('"')[1]
        literal = m.group(2)
        try:
            value = json.loads(literal)
        except ValueError:
            value = literal
        redactor.note(field, str(value))
        return m.group(1) + '"' + redactor.pseudonym(field, str(value)) + '"'

    return _ID_IN_TEXT_RE.sub(one, text)


def _mask_unkeyed(text: str) -> str:
    spans = PiiScanner().spans(text)
    for start, end, kind in reversed(spans):
        text = f"{text[:start]}[{kind}:masked]{text[end:]}"
    return text


def _scrub(text: str | None, redactor) -> str | None:
    """Text that only echoes the payload (message, field name, source): redacted, not counted again."""
    if not text:
        return text
    if hasattr(redactor, "redact_record"):
        return redactor.redact(text, None)
    return redactor.redact(text)


def dead_letter(
    reason: str, field: str | None, message: str, stage: str, payload: bytes | dict, source: str, redactor
) -> dict:
    """A dead-letter record.

    The payload is kept so a fixed pipeline can replay it, except that e-mail addresses, phone numbers
    and IP addresses are replaced by keyed tokens, identifiers holding PII by one keyed token and user
    and session ids by their pseudonyms (no raw PII in any output; see `redact_payload_text`).
    `raw_sha256` and `raw_bytes` describe the bytes as received. Text that is not UTF-8 is kept as
    base64 of its latin-1 reading (a lossless byte mapping), after the same redaction.
    """
    raw = payload_bytes(payload)
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "base64"
    redacted = redact_payload_text(text, redactor)
    if encoding == "base64":
        try:
            stored = base64.b64encode(redacted.encode("latin-1")).decode()
        except UnicodeEncodeError:  # re-encoded JSON gained characters latin-1 cannot hold
            stored, encoding = redacted, "utf-8"
    else:
        stored = redacted
    return {
        "reason": reason,
        "field": _scrub(field, redactor),
        "message": _scrub(message, redactor),
        "stage": stage,
        "source": _scrub(source, redactor),
        "raw": stored,
        "raw_encoding": encoding,
        "raw_redacted": redacted != text,
        "raw_bytes": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
    }
