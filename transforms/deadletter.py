"""The dead-letter record: why a record was rejected, where, and the payload itself (PII redacted)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re

import orjson

from transforms.privacy import (
    DEAD_LETTER_PSEUDONYMISED,
    JsonNumber,
    JsonPairs,
    decode_json_escapes,
    mask_pii,
    redact_path,
)


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

    JSON is decoded pair by pair (so escapes like `\\u0040` cannot hide an address, and a repeated
    key's earlier value is not lost to the later one), redacted value by value and key by key, with
    `user_id`/`session_id` pseudonymised as a valid event's would be, and re-encoded with every pair and
    every number token as written; it stays byte-identical when nothing changed. Text that is not JSON
    is redacted as text (see `_pseudonymise_ids_in_text`). A redactor without `redact_record` (the
    readers' no-op ones) only gets `redact(text)`.
    """
    if not hasattr(redactor, "redact_record"):
        # A reader's no-op redactor holds no key (e.g. an undecodable Avro body, whose strings are still
        # plain bytes): PII is masked without a token rather than kept.
        return mask_pii(redactor.redact(text))
    try:
        obj = orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError):
        obj = _NOT_JSON
    try:
        if obj is not _NOT_JSON and not _has_repeated_keys(text):  # the common case, at orjson's speed
            redacted = redactor.redact_record(obj)
            return text if redacted == obj else orjson.dumps(redacted).decode()
        value = _json_pairs(text)  # repeated keys, or numbers orjson refuses (1e400, NaN)
        if value is not _NOT_JSON:
            redacted = redactor.redact_record(value)
            return text if redacted == value else _dumps_pairs(redacted)
    except (orjson.JSONEncodeError, RecursionError):  # nested deeper than can be walked: redacted as text
        pass
    # Not JSON: redacted as text, ids pseudonymised in place.
    return redactor.redact(_pseudonymise_ids_in_text(text, redactor), "raw")


_NOT_JSON = object()


class _RepeatedKey(Exception):
    pass


def _no_repeats(pairs: list) -> None:
    if len(pairs) > 1 and len({k for k, _ in pairs}) != len(pairs):
        raise _RepeatedKey


def _has_repeated_keys(text: str) -> bool:
    """Whether an object of the JSON text repeats a key (text orjson has read)."""
    try:
        json.loads(text, object_pairs_hook=_no_repeats)
    except _RepeatedKey:
        return True
    except (ValueError, RecursionError):
        return True  # read apart by the slower parser, which decides
    return False


def _json_pairs(text: str):
    """A JSON text -> its value with objects as JsonPairs and non-integer numbers as JsonNumber tokens
    (the standard library reads what orjson refuses, 1e400 and NaN); _NOT_JSON when it is not JSON."""
    try:
        return json.loads(text, object_pairs_hook=JsonPairs, parse_float=JsonNumber, parse_constant=JsonNumber)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _dumps_pairs(value) -> str:
    """JSON text of a value from `_json_pairs` (every pair, numbers as written), compact like orjson."""
    if isinstance(value, JsonPairs):
        return "{" + ",".join(f"{_dumps_pairs(str(k))}:{_dumps_pairs(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps_pairs(v) for v in value) + "]"
    if isinstance(value, JsonNumber):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # any size, as read (orjson holds 64 bits only)
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # lone surrogates: escaped, except those standing for undecodable bytes
        return _escape_surrogates(json.dumps(value, ensure_ascii=False), keep_bytes=True)


_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BYTE_SURROGATE_RE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # all but surrogateescape's U+DC80-DCFF


def _escape_surrogates(text: str, keep_bytes: bool = False) -> str:
    """Lone surrogates as JSON escapes (`\\ud800`), which every JSON writer and reader handles."""
    if text.isascii():
        return text
    pattern = _BYTE_SURROGATE_RE if keep_bytes else _SURROGATE_RE
    return pattern.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text) if pattern.search(text) else text


# `"user_id": "..."`, `'user_id': '...'`, `user_id=123` in text that is not (complete) JSON: the key in
# double, single or no quotes, then the value as a string in either quotes, a whole number token, a
# literal (kept), or else whatever stands there up to where a value ends (an open quote: the rest).
_ID_IN_TEXT_RE = re.compile(
    r"(?<![\w\\])([\"']?)(" + "|".join(DEAD_LETTER_PSEUDONYMISED) + r")\1\s*[:=]\s*"
    r"""(?:("(?:[^"\\\n]|\\.)*")|('(?:[^'\\\n]|\\.)*')"""
    r"|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])|(null|None|true|false|True|False)(?!\w)"
    r"""|(["'][\s\S]*|[^,}\]\n&;]*))"""
)


def _pseudonymise_ids_in_text(text: str, redactor) -> str:
    """User and session ids pseudonymised where they stand (the whole number token, `1e400` too).
    Fails closed: a value after such a key that cannot be read is masked up to where it ends (to the
    end of the text after an open quote). JSON escapes are decoded first, so `"user\\u005fid"` is
    found too."""
    if "\\u" in text:
        text = decode_json_escapes(text)

    def one(m):
        field = m.group(2)
        double, single, number, literal, unreadable = m.group(3, 4, 5, 6, 7)
        if literal is not None:
            return m.group(0)
        if unreadable is not None:
            return text[m.start() : m.start(7)] + ("[masked]" if unreadable.strip() else unreadable)
        if double is not None:
            try:
                value = json.loads(double)
            except ValueError:
                value = double[1:-1]
            start = m.start(3)
        elif single is not None:
            value, start = single[1:-1].replace("\\'", "'"), m.start(4)
        else:
            value, start = number, m.start(5)
        redactor.note(field, str(value))
        return text[m.start() : start] + '"' + redactor.pseudonym(field, str(value)) + '"'

    return _ID_IN_TEXT_RE.sub(one, text)


def _scrub(text: str | None, redactor) -> str | None:
    """Text that only echoes the payload (message, field name): redacted, not counted again."""
    if not text:
        return text
    if hasattr(redactor, "redact_record"):
        return redactor.redact(text, None)
    return mask_pii(redactor.redact(text))


def _scrub_path(path: str | None, redactor) -> str | None:
    """A source (`path:line`, `path#record`) or file name: PII in the path redacted (see redact_path)."""
    return redact_path(path, redactor if hasattr(redactor, "redact_record") else None)


# What a corrupt_file dead letter (and report.json's damaged_files) says about the file that may name it.
_DAMAGE_PATHS = ("file", "stopped_at", "error")


def scrub_damage_fields(fields: dict) -> dict:
    """A damaged file's fields (io.Damage.as_dict()) with PII masked in the file name, the stopped_at
    source and the error text (readers hold no key, so masked, not tokenised). Other keys unchanged."""
    out = dict(fields)
    for name in _DAMAGE_PATHS:  # an error text may quote the path: read the same way
        if isinstance(out.get(name), str):
            out[name] = redact_path(out[name])
    return out


def _redact_bytes(value, redactor):
    """`bytes` values of a decoded record (an Avro `bytes` or `fixed` field) redacted as the text they
    hold: encoded as base64 in the dead letter, they would pass every text scan unread."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")  # binary bytes kept as they are (see dead_letter)
        redacted = redactor.redact(text, "raw") if hasattr(redactor, "redact_record") else mask_pii(text)
        if redacted == text:
            return value
        return _escape_surrogates(redacted, keep_bytes=True).encode("utf-8", "surrogateescape")
    if isinstance(value, dict):
        return {k: _redact_bytes(v, redactor) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_bytes(v, redactor) for v in value]
    return value


def dead_letter(
    reason: str, field: str | None, message: str, stage: str, payload: bytes | dict, source: str, redactor
) -> dict:
    """A dead-letter record.

    The payload is kept so a fixed pipeline can replay it, except that e-mail addresses, phone numbers
    and IP addresses are replaced by keyed tokens, identifiers holding PII by one keyed token and user
    and session ids by their pseudonyms (no raw PII in any output; see `redact_payload_text`).
    `raw_sha256` and `raw_bytes` describe the bytes as received. Bytes that are not UTF-8 are redacted
    as UTF-8 with the undecodable bytes carried as surrogates (`surrogateescape`: a line with one bad
    byte still shows its UTF-8 addresses and numbers to the scanner, where a latin-1 reading would turn
    them into mojibake it cannot see) and kept as base64 of the bytes the redacted text encodes back to.
    """
    raw = payload_bytes(payload)
    if isinstance(payload, dict):
        redacted_bytes = payload_bytes(_redact_bytes(payload, redactor))
    else:
        redacted_bytes = raw
    try:
        text, encoding = redacted_bytes.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = redacted_bytes.decode("utf-8", "surrogateescape"), "base64"
    redacted = redact_payload_text(text, redactor)
    if encoding == "base64":
        stored = base64.b64encode(_escape_surrogates(redacted, keep_bytes=True).encode("utf-8", "surrogateescape"))
        stored = stored.decode()
    else:
        stored = _escape_surrogates(redacted)
    return {
        "reason": reason,
        "field": _scrub(field, redactor),
        "message": _scrub(message, redactor),
        "stage": stage,
        "source": _scrub_path(source, redactor),
        "raw": stored,
        "raw_encoding": encoding,
        "raw_redacted": redacted_bytes != raw or redacted != text,
        "raw_bytes": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
    }
