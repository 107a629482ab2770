"""The dead-letter record: why a record was rejected, where, and the payload itself (PII redacted)."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib

import orjson


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
        return redactor.redact(text)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return redactor.redact(text, "raw")
    redacted = redactor.redact_record(obj)
    if redacted == obj:
        return text
    return orjson.dumps(redacted).decode()


def _scrub(text: str | None, redactor) -> str | None:
    """Text that only echoes the payload (message, field name, source): redacted, not counted again."""
    if not text:
        return text
    if hasattr(redactor, "redact_record"):
        return redactor.redact(text, None)
    return redactor.redact(text)


def dead_letter(reason: str, field: str | None, message: str, stage: str,
                payload: bytes | dict, source: str, redactor) -> dict:
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
