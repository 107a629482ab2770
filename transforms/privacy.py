"""Privacy: keyed pseudonyms for identifiers and IPs, IP truncation, PII redaction in free text.

The HMAC key never travels in the pipeline graph: transforms carry a `KeySource` (which environment
variable or secret file to read) and load the key on the worker in `setup()`. The launcher calls
`KeySource.load()` once before building the graph, so a missing key stops the job at start-up.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from functools import lru_cache
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

METRICS_NS = "feedback.privacy"
_DEMO_KEY = b"feedback-pipeline-local-demo-key-not-secret"
_log = logging.getLogger(__name__)

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# Phone numbers: an international +digits form, or digit groups joined by separators. Bare digit runs
# (ids, epoch times) are deliberately not matched.
PHONE_RE = re.compile(
    r"(?<![\w.+/])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)[\s.\-]?|\d{2,4}[\s.\-])\d{2,4}[\s.\-]\d{3,4}(?![\w.])"
    r"|(?<![\w+/])\+\d{8,15}(?!\w)")
# IPv4 not preceded by a '/' or a word character, so "Chrome/120.0.0.0" is not taken for an address.
IPV4_RE = re.compile(r"(?<![\w./])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f:]{0,4}(?:\.\d{1,3}){0,3}(?![\w:])")


class MissingKeyError(RuntimeError):
    """No usable HMAC key: the job must not start."""


@dataclasses.dataclass(frozen=True)
class KeySource:
    """Where the HMAC key comes from. Holds no secret itself, so it is safe to pickle."""
    env: str = "FEEDBACK_HMAC_KEY"
    file: Optional[str] = None
    allow_demo: bool = False

    @classmethod
    def from_config(cls, privacy_cfg, resolve=lambda p: p) -> "KeySource":
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
            f"privacy.key_file at a secret file; for a local demo only, set privacy.allow_demo_key: true")


_demo_warned = set()


def _warn_demo_once(env: str) -> None:
    if env not in _demo_warned:
        _demo_warned.add(env)
        _log.warning("privacy: no HMAC key in $%s; using the built-in DEMO key (privacy.allow_demo_key: true). "
                         "Pseudonyms are not protected. Never use this outside a local demo.", env)


class Pseudonymiser:
    """HMAC-SHA256 pseudonyms, domain-separated by field so the same value in two fields does not link."""

    def __init__(self, key: bytes, length: int = 32):
        self._key = key
        self._length = length
        self.pseudonym = lru_cache(maxsize=200_000)(self._pseudonym)

    def _pseudonym(self, domain: str, value: str) -> str:
        return hmac.new(self._key, f"{domain}\x1f{value}".encode(), hashlib.sha256).hexdigest()[:self._length]


@lru_cache(maxsize=100_000)
def truncate_ip(ip: str, v4_prefix: int, v6_prefix: int) -> Optional[str]:
    """'203.0.113.77' -> '203.0.113.0/24'; None when the text is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class Redactor:
    """Replaces e-mail addresses, phone numbers and IP addresses in free text with keyed tokens.

    Tokens are keyed pseudonyms ('[email:3f9a...]') so the same address redacts the same way in every
    output, and joins or counts on redacted values stay possible without the value itself.
    """

    def __init__(self, key: bytes):
        self._p = Pseudonymiser(key, length=12)
        # User agents and context values repeat a lot; redaction is a handful of regex passes.
        self.redact = lru_cache(maxsize=100_000)(self._redact)

    def _token(self, kind: str):
        return lambda m: f"[{kind}:{self._p.pseudonym(kind, m.group(0))}]"

    def _redact(self, text: str) -> str:
        if not text:
            return text
        if "@" in text:
            text = EMAIL_RE.sub(self._token("email"), text)
        text = PHONE_RE.sub(self._token("phone"), text)
        if "." in text:
            text = IPV4_RE.sub(self._ip_token, text)
        if ":" in text:
            text = IPV6_RE.sub(self._ip_token, text)
        return text

    def _ip_token(self, m) -> str:
        candidate = m.group(0)
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return candidate  # looked like an address, is not one (a version string, a time)
        return f"[ip:{self._p.pseudonym('ip', candidate)}]"


@dataclasses.dataclass(frozen=True)
class PrivacyRules:
    pseudonymise_fields: tuple[str, ...]
    ipv4_prefix: int
    ipv6_prefix: int

    @classmethod
    def from_config(cls, privacy_cfg) -> "PrivacyRules":
        return cls(tuple(privacy_cfg.pseudonymise_fields), privacy_cfg.ipv4_prefix, privacy_cfg.ipv6_prefix)


def protect_event(event: dict, rules: PrivacyRules, pseudonymiser: Pseudonymiser, redactor: Redactor) -> dict:
    """Pseudonymise identifiers and the IP, truncate the IP, redact PII in free text. Returns a new dict."""
    out = dict(event)
    for name in rules.pseudonymise_fields:
        value = out.get(name)
        if value is not None:
            out[name] = pseudonymiser.pseudonym(name, value)
    ip = out.pop("ip", None)
    out["ip_hash"] = pseudonymiser.pseudonym("ip", ip.strip()) if ip else None
    out["ip_network"] = truncate_ip(ip, rules.ipv4_prefix, rules.ipv6_prefix) if ip else None
    ua = out.get("user_agent")
    if ua:
        out["user_agent"] = redactor.redact(ua)
    ctx = out.get("context")
    if ctx:
        out["context"] = {k: redactor.redact(v) for k, v in ctx.items()}
    return out


class _ProtectFn(beam.DoFn):
    def __init__(self, rules: PrivacyRules, key_source: KeySource):
        self._rules, self._key_source = rules, key_source
        self._bad_ip = Metrics.counter(METRICS_NS, "ip_not_an_address")

    def setup(self):
        key = self._key_source.load()
        self._pseudonymiser = Pseudonymiser(key)
        self._redactor = Redactor(key)

    def process(self, event: dict):
        out = protect_event(event, self._rules, self._pseudonymiser, self._redactor)
        if out["ip_hash"] is not None and out["ip_network"] is None:
            self._bad_ip.inc()
        yield out


class ProtectPrivacy(beam.PTransform):
    """Valid events -> events with pseudonymised identifiers, a truncated IP and redacted free text."""

    def __init__(self, rules: PrivacyRules, key_source: KeySource):
        super().__init__()
        self._rules, self._key_source = rules, key_source

    def expand(self, events):
        return events | "Pseudonymise" >> beam.ParDo(_ProtectFn(self._rules, self._key_source))
