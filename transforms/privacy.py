"""Privacy: keyed pseudonyms for identifiers and IPs, IP truncation, PII detection and redaction.

The HMAC key never travels in the pipeline graph: transforms carry a `KeySource` (which environment
variable or secret file to read) and load the key on the worker in `setup()`. The launcher calls
`KeySource.load()` once before building the graph, so a missing key stops the job at start-up.

Detection (`PiiScanner`) finds e-mail addresses, phone numbers and IP addresses in any text:
* phone numbers with Google's libphonenumber port (`phonenumbers.PhoneNumberMatcher`, leniency VALID),
  tried with the default regions in `PHONE_REGIONS` so national forms (trunk 0, `00` prefixes) are
  found too; a cheap candidate regex (a run of 7-17 digits with separators) decides whether the
  library is called at all (not for one lying wholly inside a well-formed ISO 8601 date-time);
* IPv4 and IPv6 candidates found by regex and confirmed with `ipaddress` (IPv4 octets with leading
  zeros are read as decimal, as `inet_aton`-style parsers in logs do; IPv6 zones and IPv4-mapped forms
  included);
* e-mail addresses by regex (hand-written on purpose: no maintained library finds addresses *inside*
  free text; Unicode local parts and IDN domains, plus-addressing and quoted local parts included).
Text is also scanned in a decoded form (`PiiScanner.decoded`): JSON escapes (`\\u0040`) and URL
percent-escapes (`%40`, `%2B`) decoded, NFKC-normalised, every Unicode space (U+202F, U+00A0...) read as
a space, every dash (en/em dash, minus sign...) as '-', and invisible format characters dropped. When
that form holds PII, it is the form that is redacted (the output is decoded text with tokens).
Most values are clean: `cannot_hold_pii` proves that for ASCII text holding no part any detector needs
(see `_FULL_SCAN_NEEDED_RE`), and only the rest gets the full scan (`PiiScanner.full_scan`).

`Redactor` replaces what the scanner finds by keyed tokens (`[email:kfjab...]`, letters only so a
token never looks like a phone number or an address), replaces identifiers that hold PII by one
stable keyed token (`pii-...`, same input -> same token, so joins keep working) and counts every
finding by field and kind (`pii_found.<field>.<kind>` counters in namespace `feedback.privacy`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import sys
import unicodedata
import urllib.parse
from functools import lru_cache
from typing import Any

import apache_beam as beam
import phonenumbers
from apache_beam.metrics import Metrics

METRICS_NS = "feedback.privacy"
PII_FOUND = "pii_found"  # counter pii_found.<field>.<kind>: PII occurrences found at the source
PII_REDACTED = "pii_redacted"  # counter pii_redacted.<field>.<kind>: of those, replaced before any sink
PII_KINDS = ("email", "phone", "ip")
_DEMO_KEY = b"feedback-pipeline-local-demo-key-not-secret"
_log = logging.getLogger(__name__)

# Identifier fields: a value holding PII is replaced whole by one keyed token (joins keep working).
ID_FIELDS = (
    "event_id",
    "item_id",
    "request_id",
    "policy",
    "experiment_id",
    "variant",
    "event_type",
    "user_id",
    "session_id",
)
_ID_FIELD_SET = frozenset(ID_FIELDS)  # membership per event value: a hash lookup, not a tuple scan
# Pseudonymised inside dead-letter payloads too (the same pseudonym a valid event gets).
DEAD_LETTER_PSEUDONYMISED = ("user_id", "session_id")
# Key added to a dead-letter payload whose ids are pseudonyms already: a keyed tag over them, so a replay
# does not pseudonymise them twice (joins keep working) and nobody without the key can forge it.
PSEUDONYMISED_MARK = "_pseudonymised"
# Default regions for numbers written without a country code. A number in a national form of a
# region not listed here is only found when written internationally (+CC or 00CC).
PHONE_REGIONS = (
    "US",
    "GB",
    "DE",
    "FR",
    "IN",
    "BR",
    "JP",
    "CN",
    "AU",
    "ES",
    "IT",
    "NL",
    "MX",
    "RU",
    "ZA",
    "NG",
    "KR",
    "SE",
    "PL",
    "TR",
    "AR",
    "CH",
    "BE",
    "IE",
)

# Bounded repeats and a start only at a token boundary keep the scan linear on long hostile text.
_EMAIL_LOCAL = r"(?:(?<![\w.!#$%&'*+/=?^`{|}~\-])[\w.!#$%&'*+/=?^`{|}~\-]{1,64}|\"[^\"\r\n@]{1,64}\")"
_EMAIL_DOMAIN = r"(?:\[[0-9A-Fa-f.:]{2,45}\]|(?:[\w\-]{1,63}\.){1,8}(?:xn--[\w\-]{1,59}|[^\W\d_]{2,63}))"
EMAIL_RE = re.compile(_EMAIL_LOCAL + "@" + _EMAIL_DOMAIN)
# A phone candidate: digits with the separators numbers are written with, not glued to a word, a
# dotted version ("Chrome/120.0.6099.109"), another number or a hyphenated token (a UUID's groups).
# `_FULL_SCAN_NEEDED_RE` repeats its lookbehinds and separators: change both together.
_PHONE_CANDIDATE_RE = re.compile(r"(?<![\w+./])(?<!\w-)(?:\+|\(\+?)?\d[\d \u00a0\t().\-/]*\d\)?(?!\w|[-.]\w)")
# A '+' followed by digits is written only before a phone number: taken even glued to a word or a
# dash ("call+14155550123", "v-+442079460999", "tel:+4420...x12"); only another digit may not touch it.
_PLUS_PHONE_RE = re.compile(r"(?<![+\d])\+\d[\d \u00a0\t().\-/]*\d(?!\d)")
# A bare digit run (no separator, no + or 0 prefix) is an id, a count or a time far more often than a
# phone number: it is only taken for one when written as +CC..., 00CC... or 0... (trunk prefix).
_BARE_DIGITS_RE = re.compile(r"\(?[1-9]\d*\)?")
# Dotted with a one-digit group and no +: a version number ("Instagram 375.2.0.33.77"), not a phone.
_VERSION_RE = re.compile(r"\d+(?:\.\d+)*\.\d(?:\.\d+)*|\d(?:\.\d+)+")
# A candidate starting with a calendar date ("2026-10-31 19:11:05", "(2026-10-31 19") is a timestamp.
_DATE_RE = re.compile(
    r"(?:19|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])(?!\d)"
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:19|20)\d\d(?!\d)"
)
# A well-formed ISO 8601 / RFC 3339 date-time ("2026-10-31T21:38:36.049-05:00"): a phone candidate of at
# most _TIMESTAMP_FIELD_DIGITS digits wholly inside one ("36.049-05": seconds, milliseconds and offset
# hours) is the timestamp's fields, and sending it to phonenumbers cost ~2.5 ms (24 regions, then again
# per group stretch). Strict: every field in range, a fraction of at most 6 digits, an offset of +-HH:MM,
# +-HHMM or Z, and no number glued on either side (directly or through one separator). Seconds,
# fraction and offset together can spell a 10-digit national number ("21.255501-23" is 212 555 0123):
# such candidates (microseconds with an offset) still go to phonenumbers, as does every candidate
# reaching outside the match. 't' and 'z': RFC 3339 5.6.
_TIMESTAMP_RE = re.compile(
    r"(?<![\d+])(?<!\d[-.,:/])(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])[Tt ]"
    r"(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d{1,6})?(?:[Zz]|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?"
    r"(?![.,:+\-]?\d)"
)
_PHONE_MIN_DIGITS, _PHONE_MAX_DIGITS, _PHONE_MAX_GROUPS = 7, 17, 48
_TIMESTAMP_FIELD_DIGITS = 9  # milliseconds with an offset: SS.FFF-HH (7), SS.FFF-HHMM (9)
# IPv4 not glued to a word or a dotted number. After "word/" it is an address ("host/203.0.113.5", a URL
# path) unless it ends in ".0.0", the form of product versions in user agents ("Chrome/120.0.0.0").
IPV4_RE = re.compile(r"(?<![\w.+])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_PRODUCT_VERSION_RE = re.compile(r"\d{1,3}\.\d{1,3}\.0\.0")
IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})"
    r"(?:%[\w.\-]+)?"
)
_JSON_ESCAPE_RE = re.compile(r"(?:\\u[0-9A-Fa-f]{4})+")
_PERCENT_ESCAPE_RE = re.compile(r"%[0-9A-Fa-f]{2}")
# What sends ASCII text to the full scan (`cannot_hold_pii`), beside the characters in _FULL_SCAN_CHARS
# ('@' e-mail, ':' IPv6, '+' a '+' number, '%' and '\\' escapes the decoded form would decode). Each
# alternative is a necessary part of a form `spans` finds: digit-dot-digit (every IPv4), or a digit where
# a phone candidate of 7+ digits could start (_PHONE_CANDIDATE_RE's lookbehinds, written after the digit
# so the pattern starts with a character class and the regex engine skips to digits) followed by six
# more digits with only the candidate's separators between them. ASCII classes: only run on ASCII text.
# A new detector, or a wider candidate or separator set, must widen these too (the proof would skip it);
# tests/test_privacy.py checks the proof against the full scan.
_FULL_SCAN_NEEDED_RE = re.compile(
    r"[0-9](?:\.[0-9]|(?<![A-Za-z0-9_+./][0-9])(?<![A-Za-z0-9_]-[0-9])(?:[ \t().\-/]*[0-9]){6})"
)
_FULL_SCAN_CHARS = ("@", ":", "+", "%", "\\")
# Four digits anywhere (`could_hold_pii` for ASCII text, where str.isdigit is exactly [0-9]).
_FOUR_DIGITS_RE = re.compile(r"[0-9](?:[^0-9]*[0-9]){3}")


def _separator_table() -> dict:
    """Unicode spaces -> ' ', dashes -> '-', format characters (zero-width space, soft hyphen) removed:
    the forms phone numbers and addresses are written with that the matchers know in ASCII only."""
    table = {}
    for cp in range(0x80, sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))
        if cat == "Zs":
            table[cp] = " "
        elif cat == "Pd" or cp == 0x2212:  # U+2212 MINUS SIGN is Sm, written as a dash in numbers
            table[cp] = "-"
        elif cat == "Cf":
            table[cp] = None
    return table


_SEPARATORS = _separator_table()
_TOKEN_ALPHABET = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


class JsonPairs(list):
    """A JSON object as its (key, value) pairs in order, repeated keys kept (`object_pairs_hook`): a
    payload with `{"q": "a@b.com", "q": "x"}` must be redacted pair by pair, not as the dict the later
    key wins in."""


class JsonNumber(str):
    """A JSON number token as written (`1e400`, `1.50`): kept exactly, never scanned as text."""


class MissingKeyError(RuntimeError):
    """No usable HMAC key: the job must not start."""


@dataclasses.dataclass(frozen=True)
class KeySource:
    """Where the HMAC key comes from. Holds no secret itself, so it is safe to pickle."""

    env: str = "FEEDBACK_HMAC_KEY"
    file: str | None = None
    allow_demo: bool = False

    @classmethod
    def from_config(cls, privacy_cfg, resolve=lambda p: p) -> KeySource:
        return cls(privacy_cfg.key_env, resolve(privacy_cfg.key_file), privacy_cfg.allow_demo_key)

    def load(self) -> bytes:
        if self.file:
            try:
                with open(self.file, "rb") as f:
                    key = f.read().strip()
            except OSError as e:
                raise MissingKeyError(f"privacy.key_file {self.file!r} cannot be read: {e.strerror}") from None
            if key:
                return key
            raise MissingKeyError(f"privacy.key_file {self.file!r} is empty")
        key = os.environ.get(self.env, "").encode()
        if key:
            return key
        if self.allow_demo:
            _warn_demo_once(self.env)
            return _DEMO_KEY
        raise MissingKeyError(
            f"privacy: no HMAC key. Set the environment variable {self.env} (or privacy.key_env), or point "
            f"privacy.key_file at a secret file; for a local demo only, set privacy.allow_demo_key: true"
        )


_demo_warned = set()


def _warn_demo_once(env: str) -> None:
    if env not in _demo_warned:
        _demo_warned.add(env)
        _log.warning(
            "privacy: no HMAC key in $%s; using the built-in DEMO key (privacy.allow_demo_key: true). "
            "Pseudonyms are not protected. Never use this outside a local demo.",
            env,
        )


class Pseudonymiser:
    """HMAC-SHA256 pseudonyms, domain-separated by field so the same value in two fields does not link."""

    def __init__(self, key: bytes, length: int = 32):
        self._key = key
        self._length = length
        self.pseudonym = lru_cache(maxsize=200_000)(self._pseudonym)

    def _pseudonym(self, domain: str, value: str) -> str:
        return hmac.new(self._key, f"{domain}\x1f{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[
            : self._length
        ]


@lru_cache(maxsize=100_000)
def truncate_ip(ip: str, v4_prefix: int, v6_prefix: int) -> str | None:
    """'203.0.113.77' -> '203.0.113.0/24'; None when the text is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        elif addr.scope_id:
            addr = ipaddress.IPv6Address(str(addr).split("%", 1)[0])
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


# --- detection ---------------------------------------------------------------------------------


def decode_json_escapes(text: str) -> str:
    """'a\\u0040b.com' -> 'a@b.com' (surrogate pairs joined); other text unchanged."""

    def one(m):
        try:
            return (
                m.group(0).encode("ascii").decode("unicode_escape").encode("utf-16", "surrogatepass").decode("utf-16")
            )
        except UnicodeError:
            return m.group(0)

    return _JSON_ESCAPE_RE.sub(one, text)


def normalise_separators(text: str) -> str:
    """NFKC (full-width digits and '@'), Unicode spaces as ' ', dashes as '-', format characters dropped."""
    return unicodedata.normalize("NFKC", text).translate(_SEPARATORS)


def decoded_text(text: str) -> str:
    """The form PII is looked for in beside the text itself: JSON escapes and URL percent-escapes
    decoded, then Unicode separators normalised. Plain ASCII without escapes is returned unchanged."""
    if "\\u" in text:
        text = decode_json_escapes(text)
    if "%" in text and _PERCENT_ESCAPE_RE.search(text):
        text = urllib.parse.unquote(text)
    if not text.isascii():
        text = normalise_separators(text)
    return text


def cannot_hold_pii(text: str) -> bool:
    """Proof that the full scan finds nothing in `text` nor in its decoded form, at the cost of a few
    substring tests and one regex search: most values (ids, UUIDs, event types) are clean, and the full
    scan costs microseconds each (a long clean text: several times its cost).

    ASCII text is its own decoded form when it has no '\\' or '%' (NFKC and the separator table change
    no ASCII character), and every form `spans` finds holds one of `_FULL_SCAN_CHARS` or a match of
    `_FULL_SCAN_NEEDED_RE`. False means only "not proved clean": the full scan decides.
    """
    if not text.isascii():
        return False
    for c in _FULL_SCAN_CHARS:  # substring tests: far cheaper than a regex alternative per position
        if c in text:
            return False
    return _FULL_SCAN_NEEDED_RE.search(text) is None


def _ip_ok(candidate: str) -> bool:
    if ":" not in candidate:
        candidate = ".".join(str(int(octet)) for octet in candidate.split("."))  # leading zeros
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


@lru_cache(maxsize=50_000)
def _phone_spans(candidate: str) -> tuple:
    """Spans of phone numbers within one candidate (with a character of context on each side)."""
    for region in PHONE_REGIONS:
        spans = tuple(
            (m.start, m.end)
            for m in phonenumbers.PhoneNumberMatcher(candidate, region, leniency=phonenumbers.Leniency.VALID)
        )
        if spans:
            return spans
    return ()


def _timestamp_spans(text: str) -> list:
    """(start, end) of every well-formed date-time in `text` (`_TIMESTAMP_RE`), in order."""
    return [m.span() for m in _TIMESTAMP_RE.finditer(text)] if ":" in text else []


def _inside_any(spans: list, start: int, end: int) -> bool:
    """Whether [start, end) lies wholly inside one of `spans` (sorted, non-overlapping): one bisection, not a
    walk over every span, so a long text of many timestamps costs a few steps per candidate."""
    i = bisect.bisect_right(spans, (start, sys.maxsize)) - 1
    return i >= 0 and spans[i][1] >= end


class PiiScanner:
    """Finds PII in text: `spans(text)` -> sorted non-overlapping (start, end, kind)."""

    @staticmethod
    def could_hold_pii(text: str) -> bool:
        """Cheap pre-filter: no '@', no ':' and fewer than 4 digits cannot hold any kind we look for
        (applied to the text and, in `redactable`, to its decoded form)."""
        if "@" in text or ":" in text:
            return True
        if text.isascii():  # one regex search instead of a Python loop over every character
            return _FOUR_DIGITS_RE.search(text) is not None
        n = 0
        for c in text:
            if c.isdigit():
                n += 1
                if n >= 4:
                    return True
        return False

    def spans(self, text: str) -> list:
        if not self.could_hold_pii(text):
            return []
        found = []
        taken = bytearray(len(text))

        def add(start, end, kind):
            if any(taken[start:end]):
                return
            taken[start:end] = b"\x01" * (end - start)
            found.append((start, end, kind))

        if "@" in text:
            for m in EMAIL_RE.finditer(text):
                add(m.start(), m.end(), "email")
        if ":" in text:
            for m in IPV6_RE.finditer(text):
                c = m.group(0)
                for end in (len(c), len(c.rstrip(":"))):
                    if end and c.count(":", 0, end) >= 2 and _ip_ok(c[:end]):
                        add(m.start(), m.start() + end, "ip")
                        break
        if "." in text:
            for m in IPV4_RE.finditer(text):
                after_word = m.start() > 1 and text[m.start() - 1] == "/" and text[m.start() - 2].isalpha()
                if _ip_ok(m.group(0)) and not (after_word and _PRODUCT_VERSION_RE.fullmatch(m.group(0))):
                    add(m.start(), m.end(), "ip")
        if found:  # phone candidates are looked for around, not inside, what was found already
            chars = list(text)
            for start, end, _ in found:
                chars[start:end] = "_" * (end - start)
            text = "".join(chars)
        timestamps = None  # found once, when the first candidate that phonenumbers would see needs them
        for m in _PHONE_CANDIDATE_RE.finditer(text):
            c = m.group(0)
            n = _digits(c)
            if (
                n < _PHONE_MIN_DIGITS
                or _BARE_DIGITS_RE.fullmatch(c)
                or _VERSION_RE.fullmatch(c)
                or (n > _PHONE_MAX_DIGITS and c.isdigit())
                or _DATE_RE.match(c.lstrip("("))
            ):
                continue
            if n <= _TIMESTAMP_FIELD_DIGITS:
                if timestamps is None:
                    timestamps = _timestamp_spans(text)
                # Its digits, first to last, inside a date-time: "36.049-05" in "...T21:38:36.049-05:00"
                # is a timestamp's fields, not a number.
                first, last = m.start() + len(c) - len(c.lstrip("(+")), m.end() - c.endswith(")")
                if timestamps and _inside_any(timestamps, first, last):
                    continue
            lo, hi = max(0, m.start() - 1), min(len(text), m.end() + 1)
            spans = _phone_spans(text[lo:hi]) if n <= _PHONE_MAX_DIGITS else ()
            if not spans:
                spans = self._phone_spans_inside(text, m.start(), c)
                lo = 0
            for s, e in spans:
                add(lo + s, lo + e, "phone")
        if "+" in text:
            for m in _PLUS_PHONE_RE.finditer(text):
                c = m.group(0)
                n = _digits(c)
                if n < _PHONE_MIN_DIGITS:
                    continue
                # Without the word it is glued to; run into more digit groups ("call+14155550123 2026-10-31"),
                # the stretches from the '+' on, as for any candidate.
                spans = [(m.start() + s, m.start() + e) for s, e in _phone_spans(c)] if n <= _PHONE_MAX_DIGITS else []
                for s, e in spans or self._phone_spans_inside(text, m.start(), c):
                    add(s, e, "phone")
        return sorted(found)

    @staticmethod
    def _phone_spans_inside(text: str, offset: int, c: str) -> list:
        """Numbers among other digit groups ("ref 1 2 0044 20 7946 0958"): each stretch of groups that
        starts like a number (+, (, a 0 prefix, or the first group) and could be one, longest first.
        A run of more groups than can be tried is taken whole (fails closed)."""
        groups = [(offset + g.start(), offset + g.end(), len(g.group(0))) for g in re.finditer(r"\d+", c)]
        if len(groups) > _PHONE_MAX_GROUPS:
            return [(offset, offset + len(c))]
        starts = []
        for i, (start, _, _) in enumerate(groups):
            lead = text[start - 1] if start > offset else ""
            rank = (
                0
                if lead == "+"
                else 1
                if lead == "(" or text.startswith("00", start)
                else 2
                if text[start] == "0"
                else 3
                if i == 0
                else None
            )
            if rank is not None:
                starts.append((rank, i))
        found = []
        for _, i in sorted(starts):
            start = groups[i][0]
            # Only a start inside a number found already is skipped: one found further right (a better
            # ranked "00" stretch) must not hide the number before it ("01 99 00 12 34\t2026-11-01 09").
            if any(s <= start < e for s, e in found):
                continue
            digits, ends = 0, []
            for _, g_end, g_len in groups[i:]:
                digits += g_len
                if digits > _PHONE_MAX_DIGITS:
                    break
                if digits >= _PHONE_MIN_DIGITS:
                    ends.append(g_end)
            lo = start - 1 if start > offset else start
            for end in reversed(ends):
                # A number running into one found already is not taken (`add` would drop it whole):
                # shorter stretches are tried ("06 12 34 56 78" before "0044 20 7946 0958").
                spans = [
                    (lo + s, lo + e)
                    for s, e in _phone_spans(text[lo:end])
                    if not any(lo + s < f_end and f_start < lo + e for f_start, f_end in found)
                ]
                if spans:
                    found += spans
                    break
        return found

    def kinds(self, text: str) -> list:
        """Kinds found in the text and in its decoded form (`decoded_text`)."""
        return [k for _, _, k in self.redactable(text)[1]]

    def redactable(self, text: str) -> tuple:
        """(text to redact, its spans): the decoded form when it holds PII (all the text held and
        more), else the text itself."""
        if cannot_hold_pii(text):
            return text, []
        return self.full_scan(text)

    def full_scan(self, text: str) -> tuple:
        """`redactable` without the clean-text proof: every detector, on the text and its decoded form."""
        decoded = decoded_text(text)  # the text itself, at the cost of three tests, for plain ASCII
        if decoded != text:
            spans = self.spans(decoded)
            if spans:
                return decoded, spans
        return text, self.spans(text)


# --- redaction ---------------------------------------------------------------------------------


def mask_pii(text: str) -> str:
    """PII replaced by `[kind:masked]`, for code that holds no key (readers, error messages)."""
    text, spans = PiiScanner().redactable(text)
    for start, end, kind in reversed(spans):
        text = f"{text[:start]}[{kind}:masked]{text[end:]}"
    return text


# A file name's extensions ('.jsonl.gz'): a phone number glued to them is not seen as one.
_EXTENSIONS_RE = re.compile(r"(?:\.[A-Za-z][A-Za-z0-9]{0,7})+(?=[^\w.]*$)")


def redact_path(path: str, redactor: Redactor | None = None) -> str:
    """A file path, glob or `path:line` source with PII in any component masked (or replaced by keyed
    tokens with a `redactor`); the separators and the file extensions are kept."""
    if not path:
        return path
    redact = mask_pii if redactor is None else (lambda t: redactor.redact(t, None))
    parts = re.split(r"([/\\])", path)
    for i in range(0, len(parts), 2):
        part = redact(parts[i])
        ext = _EXTENSIONS_RE.search(re.split(r"[:#]", part, maxsplit=1)[0]) if "." in part else None
        if ext:  # "jane +14155550177.jsonl.gz:3": the stem apart too
            stem, tail = part[: ext.start()], part[ext.start() :]
            part = redact(stem) + tail
        parts[i] = part
    return "".join(parts)


# Top-level names counted under their own name; any other name counts as "unknown_field" (counter
# names must not grow with whatever keys hostile input carries).
_KNOWN_FIELDS = frozenset(
    ID_FIELDS
    + (
        "user_agent",
        "ip",
        "context",
        "event_time",
        "schema_version",
        "position",
        "propensity",
        "dwell_ms",
        "value",
        "consent",
    )
)


def counted_field(name: str) -> str:
    return name if name in _KNOWN_FIELDS else "unknown_field"


def _is_id_value(name: str, value: Any) -> bool:
    """A user or session id a dead letter pseudonymises: text or an integer, as validation takes them. A
    non-integer number token (1.5, 1e400) is kept as written, so a replay is rejected for the same reason."""
    return (
        name in DEAD_LETTER_PSEUDONYMISED
        and isinstance(value, (str, int))
        and not isinstance(value, (bool, JsonNumber))
    )


class Redactor:
    """Replaces e-mail addresses, phone numbers and IP addresses by keyed tokens and counts them.

    Tokens are keyed pseudonyms ('[email:kfjab...]') so the same address redacts the same way in every
    output, and joins or counts on redacted values stay possible without the value itself. Findings
    accumulate in `found` / `not_redacted` ((field, kind) -> n) until `drain()` hands them to counters.
    """

    def __init__(self, key: bytes):
        self._tokens = Pseudonymiser(key, length=12)
        self._ids = Pseudonymiser(key)
        self._scanner = PiiScanner()
        # User agents, context values and ids repeat a lot: scan each distinct text once.
        self._scan = lru_cache(maxsize=100_000)(self._scan_uncached)
        self.found = collections.Counter()
        self.not_redacted = collections.Counter()

    def _token(self, kind: str, value: str) -> str:
        return f"[{kind}:{self._tokens.pseudonym(kind, value).translate(_TOKEN_ALPHABET)}]"

    def _scan_uncached(self, text: str) -> tuple:
        """text -> (redacted text, kinds found, kinds still found after redaction)."""
        text, spans = self._scanner.redactable(text)
        if not spans:
            return text, (), ()
        parts, pos = [], 0
        for start, end, kind in spans:
            parts += [text[pos:start], self._token(kind, text[start:end])]
            pos = end
        out = "".join(parts) + text[pos:]
        # Verification: whatever the scanner still finds in the result was not redacted.
        residual = tuple(self._scanner.kinds(out))
        return out, tuple(k for _, _, k in spans), residual

    def _count(self, field: str | None, kinds: tuple, residual: tuple) -> None:
        if field is None:
            return
        for k in kinds:
            self.found[field, k] += 1
        for k in residual:
            self.not_redacted[field, k] += 1

    def redact(self, text: str, field: str | None = None) -> str:
        """Free text with PII replaced by tokens; counted under `field` (None: not counted, for text
        that only echoes what was counted elsewhere, e.g. an error message quoting a value)."""
        if not text:
            return text
        out, kinds, residual = self._scan(text)
        if kinds:
            self._count(field, kinds, residual)
        return out

    def redact_id(self, field: str, value: str, count: bool = True) -> str:
        """An identifier: unchanged without PII, else one stable keyed token for the whole value."""
        if not value:
            return value
        _, kinds, _ = self._scan(value)
        if not kinds:
            return value
        if count:
            self._count(field, kinds, ())
        return "pii-" + self._ids.pseudonym("pii_id", value)

    def note(self, field: str, value: str) -> None:
        """Counts PII in a value that is replaced whole anyway (a pseudonymised user id)."""
        if value:
            _, kinds, _ = self._scan(value)
            self._count(field, kinds, ())

    def pseudonym(self, field: str, value: str) -> str:
        """The pseudonym a valid event's `field` gets (ProtectPrivacy uses the same key and domain)."""
        return self._ids.pseudonym(field, value)

    def mark(self, pseudonyms: dict) -> str:
        """The tag saying `pseudonyms` ({field: value}) are this key's pseudonyms already."""
        return self._ids.pseudonym(PSEUDONYMISED_MARK, "\x1f".join(f"{k}={v}" for k, v in sorted(pseudonyms.items())))

    def redact_tree(self, value: Any, field: str | None) -> Any:
        """Every string value and every key of a JSON value, at any depth."""
        if isinstance(value, JsonNumber):
            return value
        if isinstance(value, str):
            return self.redact(value, field)
        if isinstance(value, JsonPairs):
            key_field = None if field is None else f"{field}_key"
            return JsonPairs((self.redact(k, key_field), self.redact_tree(v, field)) for k, v in value)
        if isinstance(value, list):
            return [self.redact_tree(v, field) for v in value]
        if isinstance(value, dict):
            key_field = None if field is None else f"{field}_key"
            return {self.redact(k, key_field): self.redact_tree(v, field) for k, v in value.items()}
        return value

    def redact_record(self, obj: Any) -> Any:
        """A decoded payload (e.g. a rejected record): identifiers as `protect_event` would treat them
        (user and session ids pseudonymised, ids holding PII tokenised), the rest redacted. A JsonPairs
        object is redacted pair by pair (every repeated key too) and returned as JsonPairs."""
        if isinstance(obj, JsonPairs):
            items = list(obj)
        elif isinstance(obj, dict):
            items = list(obj.items())
        else:
            return self.redact_tree(obj, "unknown_field")
        ids = {}  # the values a parser keeps (the last of repeated keys) decide the replay mark
        for k, v in items:
            if _is_id_value(k, v):
                ids[k] = str(v)
        mark = next((v for k, v in reversed(items) if k == PSEUDONYMISED_MARK), None)
        done = bool(ids) and mark == self.mark(ids)  # a replayed dead letter
        pseudonyms = {}
        out = []
        for k, v in items:
            if k == PSEUDONYMISED_MARK:
                continue
            name = self.redact(k, "field_name")
            field = counted_field(k)
            if _is_id_value(k, v):
                keep = done and str(v) == ids[k]  # a repeated key's other value is never taken as done
                if not keep:
                    self.note(k, str(v))
                out.append((name, str(v) if keep else self.pseudonym(k, str(v))))
                pseudonyms[k] = out[-1][1]
            elif k in ID_FIELDS and isinstance(v, str) and not isinstance(v, JsonNumber):
                out.append((name, self.redact_id(k, v)))
            elif k == "ip":  # an address by design (truncated and hashed for valid events): not a finding
                out.append((name, self.redact_tree(v, None)))
            elif k == "context" and isinstance(v, (dict, JsonPairs)):
                pairs = v if isinstance(v, JsonPairs) else v.items()
                ctx = [(self.redact(ck, "context_key"), self.redact_tree(cv, "context")) for ck, cv in pairs]
                out.append((name, JsonPairs(ctx) if isinstance(v, JsonPairs) else dict(ctx)))
            else:
                out.append((name, self.redact_tree(v, field)))
        if pseudonyms:
            out.append((PSEUDONYMISED_MARK, self.mark(pseudonyms)))
        return JsonPairs(out) if isinstance(obj, JsonPairs) else dict(out)

    def drain(self) -> list:
        """[(counter name, n)] of the findings since the last drain: pii_found.* and pii_redacted.*."""
        if not self.found:
            return []
        rows = []
        for (field, kind), n in sorted(self.found.items()):
            rows.append((f"{PII_FOUND}.{field}.{kind}", n))
            done = n - self.not_redacted.get((field, kind), 0)
            if done:
                rows.append((f"{PII_REDACTED}.{field}.{kind}", done))
        self.found.clear()
        self.not_redacted.clear()
        return rows


class PiiCounters:
    """Beam counters for a Redactor's findings (created on first use: names depend on the data)."""

    def __init__(self):
        self._counters = {}

    def flush(self, redactor: Redactor) -> None:
        for name, n in redactor.drain():
            c = self._counters.get(name)
            if c is None:
                c = self._counters[name] = Metrics.counter(METRICS_NS, name)
            c.inc(n)


@dataclasses.dataclass(frozen=True)
class PrivacyRules:
    pseudonymise_fields: tuple[str, ...]
    ipv4_prefix: int
    ipv6_prefix: int

    @classmethod
    def from_config(cls, privacy_cfg) -> PrivacyRules:
        return cls(tuple(privacy_cfg.pseudonymise_fields), privacy_cfg.ipv4_prefix, privacy_cfg.ipv6_prefix)

    @functools.cached_property
    def not_scanned_as_text(self) -> frozenset:
        """Fields protect_event replaces whole (pseudonymised fields, the IP, the replay mark): one set
        built once per worker (cached on the instance), not tuples tested per value."""
        return frozenset(self.pseudonymise_fields) | {"ip", PSEUDONYMISED_MARK}


def protect_event(event: dict, rules: PrivacyRules, pseudonymiser: Pseudonymiser, redactor: Redactor) -> dict:
    """Pseudonymise identifiers and the IP, truncate the IP, tokenise identifiers holding PII, redact PII
    in every other string value and in context keys. Returns a new dict."""
    out = dict(event)
    mark = out.pop(PSEUDONYMISED_MARK, None)
    done = ()
    if mark is not None:  # replayed from a dead letter: its ids may be pseudonyms already
        ids = {k: out[k] for k in DEAD_LETTER_PSEUDONYMISED if isinstance(out.get(k), str)}
        done = tuple(ids) if ids and mark == redactor.mark(ids) else ()
    for name in rules.pseudonymise_fields:
        value = out.get(name)
        if value is not None and name not in done:
            redactor.note(name, value)
            out[name] = pseudonymiser.pseudonym(name, value)
    ip = out.pop("ip", None)
    out["ip_hash"] = pseudonymiser.pseudonym("ip", ip.strip()) if ip else None
    out["ip_network"] = truncate_ip(ip, rules.ipv4_prefix, rules.ipv6_prefix) if ip else None
    not_scanned = rules.not_scanned_as_text
    for name, value in event.items():
        if not isinstance(value, str) or name in not_scanned or name in done:
            continue
        out[name] = (
            redactor.redact_id(name, value) if name in _ID_FIELD_SET else redactor.redact(value, counted_field(name))
        )
    ctx = out.get("context")
    if ctx:
        out["context"] = {redactor.redact(k, "context_key"): redactor.redact(v, "context") for k, v in ctx.items()}
    return out


def protect_consent_stub(stub: dict, redactor: Redactor) -> dict:
    """A consent-dropped stub keeps its event id (tokenised when it holds PII) and nothing personal."""
    out = dict(stub)
    for name in ("event_id", "event_type"):
        if isinstance(out.get(name), str):
            out[name] = redactor.redact_id(name, out[name])
    if isinstance(out.get("source"), str):
        out["source"] = redactor.redact(out["source"])
    return out


class _ProtectFn(beam.DoFn):
    def __init__(self, rules: PrivacyRules, key_source: KeySource):
        self._rules, self._key_source = rules, key_source
        self._bad_ip = Metrics.counter(METRICS_NS, "ip_not_an_address")
        self._pii = PiiCounters()

    def setup(self):
        key = self._key_source.load()
        self._pseudonymiser = Pseudonymiser(key)
        self._redactor = Redactor(key)

    def _protect(self, event: dict) -> dict:
        out = protect_event(event, self._rules, self._pseudonymiser, self._redactor)
        if out["ip_hash"] is not None and out["ip_network"] is None:
            self._bad_ip.inc()
        return out

    def process(self, event: dict):
        yield self._protect(event)

    def start_bundle(self):
        self._redactor.drain()  # tallies of a failed bundle on this instance are not this bundle's

    def finish_bundle(self):
        # PII findings are tallied by the redactor; one counter update per bundle, not per event.
        self._pii.flush(self._redactor)


class _ProtectChunkFn(_ProtectFn):
    """As _ProtectFn, one list of events at a time (a list out per list in)."""

    def process(self, events: list):
        yield [self._protect(e) for e in events]


class ProtectPrivacy(beam.PTransform):
    """Valid events -> events with pseudonymised identifiers, a truncated IP and redacted free text.

    chunked: the input holds lists of events (ParseEvents(chunked=True)), and so does the output.
    """

    def __init__(self, rules: PrivacyRules, key_source: KeySource, chunked: bool = False):
        super().__init__()
        self._rules, self._key_source, self._chunked = rules, key_source, chunked

    def expand(self, events):
        fn = (_ProtectChunkFn if self._chunked else _ProtectFn)(self._rules, self._key_source)
        return events | "Pseudonymise" >> beam.ParDo(fn)
