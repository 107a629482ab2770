"""The dead-letter record: why a record was rejected, where, and the payload itself (PII redacted)."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Optional, Union

import orjson


def _default(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def payload_bytes(payload: Union[bytes, dict]) -> bytes:
    """The record as bytes: a JSON line as received, an Avro record re-encoded as JSON."""
    if isinstance(payload, bytes):
        return payload
    return orjson.dumps(payload, default=_default, option=orjson.OPT_SORT_KEYS)


def dead_letter(reason: str, field: Optional[str], message: str, stage: str,
                payload: Union[bytes, dict], source: str, redactor) -> dict:
    """A dead-letter record.

    The payload is kept whole so a fixed pipeline can replay it, except that e-mail addresses, phone
    numbers and IP addresses are replaced by keyed tokens (no raw PII in any output). `raw_sha256`
    and `raw_bytes` describe the bytes as received. Text that is not UTF-8 is kept as base64 of its
    latin-1 reading (a lossless byte mapping), after the same redaction.
    """
    raw = payload_bytes(payload)
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "base64"
    redacted = redactor.redact(text)
    return {
        "reason": reason,
        "field": field,
        "message": redactor.redact(message),
        "stage": stage,
        "source": source,
        "raw": redacted if encoding == "utf-8" else base64.b64encode(redacted.encode("latin-1")).decode(),
        "raw_encoding": encoding,
        "raw_redacted": redacted != text,
        "raw_bytes": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
    }
