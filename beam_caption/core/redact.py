"""Secrets out of everything the project writes: API keys, bearer tokens, URL credentials.

``scrub`` is applied to every message, caption and log line that can carry text from a server,
a manifest or the environment; ``redact_url`` to every URL the project names on its own account
(keys, sources, options, messages). Records themselves are echoed as given: that is the contract.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

REDACTED = "[REDACTED]"
URL_REDACTED = "REDACTED"  # no brackets: a redacted URL must parse again (idempotent)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_MIN_SECRET_CHARS = 4  # shorter "secrets" (a test's "x") would blank out ordinary words


def clean_key(key: str | None) -> str | None:
    """The key without surrounding whitespace (mounted secrets end in a newline); None if empty."""
    if key is None:
        return None
    key = key.strip()
    return key or None


def redact_url(url: str) -> str:
    """``url`` without user:password, query or fragment (signed URLs carry secrets there).

    Anything that is not a URL with a scheme is returned as given.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    if not parts.scheme:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{URL_REDACTED}@{netloc.rpartition('@')[2]}"
    query = URL_REDACTED if parts.query else ""
    fragment = URL_REDACTED if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def scrub(text: str, secrets: tuple[str, ...] | list[str] = (), urls: bool = True) -> str:
    """``text`` with each secret, every ``Bearer <token>`` and (``urls``) URL credentials and
    queries redacted. Captions pass ``urls=False``: a URL a model writes is its answer."""
    if not isinstance(text, str) or not text:
        return text
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_CHARS and secret in text:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if urls and "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return text


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs every record's final message (attach it to handlers).

    It never raises: a log call whose arguments do not fit its format is passed on with the
    arguments shown after the format, so the line is kept and cannot fail the handler.
    """

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} {record.args!r}"
            record.msg, record.args = message, None
        cleaned = scrub(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.secrets)
        record.exc_info = None if record.exc_text else record.exc_info
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
