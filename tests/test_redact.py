"""Secrets never leave in what the project writes: keys, bearer tokens, URL credentials."""

from __future__ import annotations

import logging

from beam_caption.core.redact import (
    REDACTED,
    URL_REDACTED,
    ScrubbingFilter,
    clean_key,
    redact_url,
    scrub,
)


def test_clean_key_strips_the_newline_of_mounted_secrets():
    assert clean_key("sk-abc\n") == "sk-abc"
    assert clean_key("  \n") is None
    assert clean_key(None) is None


def test_redact_url_drops_credentials_query_and_fragment():
    shown = redact_url("https://user:pw@host/a/b.json?sig=SECRET#frag")
    assert shown == f"https://{URL_REDACTED}@host/a/b.json?{URL_REDACTED}#{URL_REDACTED}"
    assert redact_url(shown) == shown and scrub(shown) == shown  # idempotent
    assert redact_url("gs://bucket/a.jsonl") == "gs://bucket/a.jsonl"
    assert redact_url("/local/path?x") == "/local/path?x"  # not a URL: a file name


def test_scrub_removes_keys_bearer_tokens_and_url_secrets():
    text = ("401: key sk-live-123 is invalid; got header 'Authorization: Bearer sk-other-9' "
            "for https://h/v1?token=abc")
    cleaned = scrub(text, ("sk-live-123",))
    assert "sk-live-123" not in cleaned and "sk-other-9" not in cleaned and "abc" not in cleaned
    assert cleaned.count(REDACTED) == 2 and cleaned.endswith(f"?{URL_REDACTED}")
    assert scrub("a short x", ("x",)) == "a short x"  # a 1-char "secret" would blank words


def test_scrubbing_filter_cleans_messages_and_tracebacks():
    logger = logging.getLogger("test_redact")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(ScrubbingFilter(("sk-live-123",)))
    logger.addHandler(handler)
    try:
        logger.warning("calling with %s", "sk-live-123")
        try:
            raise RuntimeError("boom Bearer sk-live-123")
        except RuntimeError:
            logger.exception("failed")
        logger.warning("bad args %s %s", "only one")  # a broken log call does not raise
    finally:
        logger.removeHandler(handler)
    assert "sk-live-123" not in "\n".join(records)
    assert "boom Bearer" in records[1] and "Traceback" in records[1]
