"""A record's identity for reuse: its fingerprint, a SHA-256 of the record as read (and of the
image bytes it carries, for a WebDataset sample or a table row) and of every setting that shapes
its answer (model, prompts, image preparation, sampling; ``settings_digest``).

A caption carries it as ``caption_meta.fingerprint``; ``--resume``, the batch ledger and batch
collection join on it, so inserted, moved, edited or dropped records and changed settings never
get another record's answer.
"""

from __future__ import annotations

import hashlib
import json
import logging

_LOG = logging.getLogger(__name__)


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def record_fingerprint(record: dict, settings_digest: str) -> str:
    """What a caption answers: the record's content under the settings that shape the answer."""
    canonical = _CANONICAL_JSON.encode([settings_digest, record])
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def element_fingerprint(element: dict, settings_digest: str) -> str:
    """The fingerprint of a keyed element: its record's, and, when it carries its images'
    bytes (``images``: a WebDataset sample, a table row), their SHA-256 digests too."""
    images = element.get("images")
    if not images:
        return record_fingerprint(element["record"], settings_digest)
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    canonical = _CANONICAL_JSON.encode([settings_digest, element["record"], digests])
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def keyed_by_fingerprint(element: dict, digest: str) -> tuple[str, dict]:
    """(fingerprint, element) for an element holding a ``record`` (a keyed record, a
    failure), to join it with captions or answers of the same content."""
    return element_fingerprint(element, digest), element


def settings_digest(settings: dict) -> str:
    """A digest of the request settings (JSON-serializable values) that shape every answer."""
    return hashlib.sha256(_CANONICAL_JSON.encode(settings).encode("ascii")).hexdigest()
