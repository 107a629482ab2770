"""A PII corpus and an output scanner: decodes every output file and reports any corpus value in it.

`scan_outputs(folder)` reads every file under the folder: Avro (fastavro), Parquet (pyarrow), JSON lines
and JSON files (decoded, so `\\u0040` escapes are searched as the characters they stand for, nested
values and keys included), base64 dead-letter payloads and base64 strings anywhere (an Avro `bytes`
field), and anything else as text. It searches each corpus value as written, its decoded form (URL
percent-escapes, Unicode spaces and dashes) and, for phone numbers, its digits-only form, in every string
as written and decoded; and it runs phonenumbers' own matcher (leniency POSSIBLE) over every decoded
string, so a corpus number is found in any format. Its decoding is written apart from
transforms/privacy.py's on purpose: a scanner sharing the pipeline's blind spots would prove nothing.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from typing import Any

import fastavro
import phonenumbers
import pyarrow.parquet as pq

# (kind, value): at least 40 formats across countries.
PII_CORPUS = (
    # phones: E.164, national (trunk 0), international with 00, dots/dashes/parentheses/spaces
    ("phone", "+1 415 555 0134"),
    ("phone", "+14155550134"),
    ("phone", "(415) 555-0134"),
    ("phone", "415.555.0134"),
    ("phone", "+1-415-555-0134"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "020 7946 0958"),
    ("phone", "0044 20 7946 0958"),
    ("phone", "+44 (0)20 7946 0958"),
    ("phone", "+49 30 901820"),
    ("phone", "0049 30 901820"),
    ("phone", "+49 (0)30 901820"),
    ("phone", "+33 1 99 00 12 34"),
    ("phone", "01 99 00 12 34"),
    ("phone", "0033 1 99 00 12 34"),
    ("phone", "+33.1.99.00.12.34"),
    ("phone", "+81 3-1234-5678"),
    ("phone", "03-1234-5678"),
    ("phone", "+91 98765 43210"),
    ("phone", "+55 11 91234-5678"),
    ("phone", "+86 138 0013 8000"),
    ("phone", "+61 2 9876 5432"),
    ("phone", "+7 495 123-45-67"),
    ("phone", "+27 21 123 4567"),
    ("phone", "+234 803 123 4567"),
    ("phone", "+82 2-123-4567"),
    ("phone", "+34 912 34 56 78"),
    ("phone", "+39 06 1234 5678"),
    ("phone", "+31 20 123 4567"),
    ("phone", "+52 55 1234 5678"),
    ("phone", "+46 8 123 456 78"),
    ("phone", "+1 (212) 555-0187"),
    # e-mail: plain, plus-addressing, quoted, internationalised local parts and IDN domains
    ("email", "jane.doe@example.com"),
    ("email", "jane.doe+promo@example.com"),
    ("email", '"john doe"@example.org'),
    ("email", "josé.garcía@correo.example"),
    ("email", "用户@例子.广告"),
    ("email", "user@xn--bcher-kva.example"),
    ("email", "müller@bücher.de"),
    ("email", "o'connor@example.co.uk"),
    # IP: v4 (leading zeros too), v6 compressed / full / IPv4-mapped / link-local with zone
    ("ip", "203.0.113.77"),
    ("ip", "192.168.001.010"),
    ("ip", "2001:db8::1"),
    ("ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("ip", "::ffff:198.51.100.23"),
    ("ip", "fe80::1%eth0"),
    ("ip", "fe80::a00:27ff:fe4e:66a1"),
)
# PII written in forms a plain scan misses: URL-encoded, an address after "word/", numbers glued to
# text, Unicode spaces and dashes.
HOSTILE_PII = (
    ("email", "cb?email=urlq%40example.com"),
    ("phone", "cb?phone=%2B14155550155"),
    ("ip", "host/203.0.113.5"),
    ("phone", "call+14155550123"),
    ("phone", "v-+442079460999"),
    ("phone", "+33\u202f1\u202f99\u202f00\u202f12\u202f35"),
    ("phone", "+44\u201320\u20137946\u20130957"),
    ("email", "jane\uff20example.com"),
)
PII_CORPUS = PII_CORPUS + HOSTILE_PII

_MIN_DIGITS_ONLY = 9  # shorter digit strings occur by chance in timestamps and counts


_SPACES = re.compile(r"[^\S\n]|[\u200b-\u200d\u2060\ufeff\u00ad]")  # Unicode spaces, zero-width ones
_DASHES = re.compile(r"[\u2010-\u2015\u2212\ufe58\ufe63\uff0d]")


def decoded(text: str) -> str:
    """Percent-escapes decoded, NFKC, every space as ' ' and every dash as '-'."""
    if "%" in text:
        text = urllib.parse.unquote(text)
    if not text.isascii():
        text = _DASHES.sub("-", _SPACES.sub(" ", unicodedata.normalize("NFKC", text)))
    return text


def needles(corpus: Iterable = PII_CORPUS) -> dict:
    """search string -> the corpus value it stands for: the value, its decoded form and the PII in it."""
    out = {}
    for kind, value in corpus:
        plain = decoded(value)
        out[value] = out[plain] = value
        if kind == "phone":
            digits = re.sub(r"\D", "", plain)
            if len(digits) >= _MIN_DIGITS_ONLY:
                out[digits] = value
        if kind == "ip":
            out[plain.split("%")[0].rsplit("/", 1)[-1]] = value
        if kind == "email":
            out[plain.rsplit("=", 1)[-1]] = value
    return out


def _national_numbers(corpus: Iterable) -> dict:
    """national number digits -> corpus phone value (those written with a country code)."""
    out = {}
    for kind, value in corpus:
        if kind == "phone":
            plain = decoded(value)
            start = plain.find("+")
            if start < 0:
                start = plain.find("00")
                plain = "+" + plain[start + 2 :] if start >= 0 else plain
            try:
                out[str(phonenumbers.parse(plain[max(start, 0) :], None).national_number)] = value
            except phonenumbers.NumberParseException:
                continue
    return out


def _numbers_in(text: str) -> Iterable[str]:
    """National numbers phonenumbers' matcher finds in the text (leniency POSSIBLE: no validity check)."""
    if sum(c.isdigit() for c in text) < 7:
        return
    for m in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.POSSIBLE):
        yield str(m.number.national_number)


_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4}){4,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def _strings(value: Any) -> Iterable[str]:
    """Every string (values and keys) in a decoded record, at any depth."""
    if isinstance(value, str):
        yield value
        if _BASE64.fullmatch(value):  # an Avro bytes field in a dead letter's JSON
            yield base64.b64decode(value).decode("utf-8", "replace")
        if value.startswith("{") or value.startswith("["):  # a JSON document inside a string (dead-letter raw)
            try:
                yield from _strings(json.loads(value))
            except (ValueError, RecursionError):  # not JSON, or too deep to decode: searched as text above
                pass
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
        if value.get("raw_encoding") == "base64" and isinstance(value.get("raw"), str):
            try:
                yield base64.b64decode(value["raw"]).decode("latin-1")
            except ValueError:
                pass
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif value is not None:
        yield str(value)


def file_strings(path: str) -> Iterable[str]:
    """Every string of one output file, decoded by its format; the raw text too."""
    data = open(path, "rb").read()
    yield data.decode("latin-1")
    yield data.decode("utf-8", "replace")
    if path.endswith(".avro"):
        for record in fastavro.reader(io.BytesIO(data)):
            yield from _strings(record)
    elif path.endswith(".parquet"):
        for record in pq.read_table(io.BytesIO(data)).to_pylist():
            yield from _strings(record)
    else:
        text = data.decode("utf-8", "replace")
        try:
            yield from _strings(json.loads(text))
            return
        except (ValueError, RecursionError):
            pass
        for line in text.splitlines():
            try:
                yield from _strings(json.loads(line))
            except (ValueError, RecursionError):
                continue


def output_files(folder: str) -> list:
    return sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))


def scan_outputs(folder: str, corpus: Iterable = PII_CORPUS) -> dict:
    """{file: sorted corpus values found in it}; empty when the outputs hold none."""
    corpus = tuple(corpus)
    search = needles(corpus)
    numbers = _national_numbers(corpus)
    leaks = {}
    for path in output_files(folder):
        found = set()
        for s in file_strings(path):
            plain = decoded(s)
            for needle, value in search.items():
                if needle in s or needle in plain:
                    found.add(value)
            if numbers and len(s) < 100_000:  # the whole-file texts are searched by needle only
                found.update(numbers[n] for n in _numbers_in(plain) if n in numbers)
        if found:
            leaks[os.path.relpath(path, folder)] = sorted(found)
    return leaks


# --- PII placed in every field and key -------------------------------------------------------------

T0_MS = 1_793_527_200_000  # 2026-11-01T08:00:00Z: a fixed time, well before any job start
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0.6099.109 Safari/537.36"
ID_FIELDS = ("event_id", "item_id", "request_id", "policy", "experiment_id", "variant", "session_id", "user_id")


def base_event(event_id: str, user: str, ms: int, **extra) -> dict:
    e = {
        "event_id": event_id,
        "event_type": "impression",
        "event_time": ms,
        "user_id": user,
        "item_id": "i1",
        "request_id": f"r-{event_id}",
        "session_id": f"s-{user}",
        "position": 1,
        "propensity": 0.5,
        "policy": "pol",
        "user_agent": BROWSER,
        "ip": "198.51.100.9",
        "schema_version": 2,
        "experiment_id": "exp1",
        "variant": "A",
        "context": {"page": "home"},
    }
    e.update(extra)
    return e


def json_escaped(value: str) -> str:
    """Every character but letters and digits as a JSON \\uXXXX escape (surrogate pairs beyond the BMP)."""
    out = []
    for ch in value:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        else:
            for unit in range(0, len(ch.encode("utf-16-be")), 2):
                code = int.from_bytes(ch.encode("utf-16-be")[unit : unit + 2], "big")
                out.append(f"\\u{code:04x}")
    return "".join(out)


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def pii_placements(value: str, n: int, ms: int) -> list:
    """Input lines (bytes) putting one PII value in every field and key, as valid events, bots, duplicates,
    labels, orphans, consent opt-outs and every kind of rejected record. `n` makes ids unique."""
    user, lines = f"u{n}", []

    def eid(tag):
        return f"e{n}-{tag}"

    ctx_value = base_event(eid("ctxv"), user, ms, context={"note": f"call {value} now"})
    lines += [
        dumps(ctx_value),
        dumps(base_event(eid("ctxk"), user, ms + 1, context={f"k {value}": "x"})),
        dumps(base_event(eid("ua"), user, ms + 2, user_agent=f"Mozilla/5.0 ({value}) Gecko/20100101")),
        dumps(base_event(eid("unknown"), user, ms + 3, **{value: "x"})),
        dumps(base_event(eid("type"), user, ms + 4, event_type=f"hover {value}")),
        dumps(base_event(eid("pos"), user, ms + 5, position=value)),
        dumps(base_event(f"c {value}", user, ms + 6, consent=False)),
        dumps(
            base_event(
                eid("bot"), user + "b", ms + 7, user_agent=f"Googlebot/2.1 (+http://www.google.com/bot.html) {value}"
            )
        ),
        dumps(base_event(eid("orphan"), user, ms + 8, event_type="click", request_id=f"orphan {value}")),
        b'{"event_id": "' + eid("malformed").encode() + b'", "note": ' + dumps(value) + b",",
        b'{"event_id": "' + eid("latin1").encode() + b'", "bad": "\xff", "note": ' + dumps(value) + b"}",
    ]
    for i, field in enumerate(ID_FIELDS):
        e = base_event(eid(f"id{i}"), user, ms + 10 + i)
        e[field] = value
        lines.append(dumps(e))
    # an impression and its click sharing a PII request id: labels and slates carry it
    imp = base_event(eid("imp"), user, ms + 20, request_id=f"req {value}", item_id=f"item {value}")
    click = base_event(
        eid("click"), user, ms + 21_000, event_type="click", request_id=f"req {value}", item_id=f"item {value}"
    )
    lines += [dumps(imp), dumps(click), dumps(imp)]  # the second impression copy is a duplicate
    # JSON-escaped: valid, rejected (unknown type), malformed
    esc = json_escaped(value)
    good = dumps(base_event(eid("esc"), user, ms + 30, context={"note": "ESC"})).replace(b"ESC", esc.encode())
    bad = dumps(base_event(eid("escbad"), user, ms + 31, event_type="hover ESC")).replace(b"ESC", esc.encode())
    lines += [
        good,
        bad,
        bad.replace(eid("escbad").encode(), eid("escmal").encode())[:-1],
        dumps(base_event(eid("esckey"), user, ms + 32, context={"k": "v"})).replace(b'"k"', b'"' + esc.encode() + b'"'),
    ]
    return lines
