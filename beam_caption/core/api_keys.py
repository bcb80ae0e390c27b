"""Where the API key comes from, for the launcher and every worker alike.

The key is never a pipeline option: options travel to workers and into job metadata. What
travels is where to look: a GCP Secret Manager version (``--api_key_secret``, resolved by each
worker with its own credentials), a file the workers can read (``--api_key_file``, e.g. a
mounted Kubernetes secret or a ``gs://`` object), or an environment variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from beam_caption.core.errors import UsageError
from beam_caption.core.redact import clean_key, redact_url

DEFAULT_API_KEY_ENVS = ("DF_API_KEY", "OPENAI_API_KEY")
SECRET_VERSION = re.compile(r"projects/[^/\s]+/secrets/[^/\s]+/versions/[^/\s]+")
KEY_READ_BYTES = 64 * 1024
SECRET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class KeySource:
    """Where the key is looked for: ``secret``, else ``file``, else the variable ``env`` (by
    default DF_API_KEY, then OPENAI_API_KEY). ``required``: the launcher has a key, so a worker
    that finds none stops the job instead of sending every request without one."""

    env: str | None = None
    file: str | None = None
    secret: str | None = None
    required: bool = False

    @classmethod
    def for_launch(cls, env: str | None, file: str | None, secret: str | None) -> KeySource:
        """The source the flags name; a secret or file is required of workers without being
        read here (a dry run reads nothing), a variable when the launcher has it."""
        source = cls(env, file, secret)
        required = bool(secret or file) or source._from_env() is not None
        return cls(env, file, secret, required)

    def resolve(self) -> str | None:
        """The key, stripped (a mounted secret ends in a newline); None when no variable holds
        one. UsageError when a named secret or file cannot be read or holds no key."""
        if self.secret:
            return read_secret(self.secret)
        if self.file:
            return read_key_file(self.file)
        return self._from_env()

    def describe(self) -> str:
        """Where the key is looked for, in words (for a message that says where it was missing)."""
        if self.secret:
            return f"the Secret Manager version {self.secret} (--api_key_secret)"
        if self.file:
            return f"the file {redact_url(self.file)} (--api_key_file)"
        return "the environment variable " + " or ".join(self._env_names())

    def _env_names(self) -> tuple[str, ...]:
        return (self.env,) if self.env else DEFAULT_API_KEY_ENVS

    def _from_env(self) -> str | None:
        for name in self._env_names():
            key = clean_key(os.environ.get(name))
            if key:
                return key
        return None


def read_key_file(path: str) -> str:
    """The key in the file at ``path`` (a path or fsspec URL); UsageError when it cannot be read
    or holds no key. The message names the file, never its content."""
    import fsspec

    source = f"--api_key_file {redact_url(path)}"
    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read(KEY_READ_BYTES)
    except OSError as exc:
        raise UsageError(f"{source} cannot be read: {type(exc).__name__}") from None
    return _key_in(data, source)


def read_secret(name: str) -> str:
    """The key in a Secret Manager version (``projects/P/secrets/S/versions/V``), read with the
    credentials of the process (a worker's service account); UsageError when the client library
    is missing or the version cannot be read or holds no key. Never the content in a message."""
    try:
        from google.cloud import secretmanager
    except ImportError:
        raise UsageError("--api_key_secret needs Google Cloud Secret Manager's client library: "
                         "pip install 'beam_caption[gcp]' (on workers too)") from None
    source = f"--api_key_secret {name}"
    try:
        client = secretmanager.SecretManagerServiceClient()
        response = client.access_secret_version(name=name, timeout=SECRET_TIMEOUT_S)
        data = bytes(response.payload.data)
    except Exception as exc:  # google.api_core and google.auth errors
        raise UsageError(f"{source} cannot be read: {type(exc).__name__}"
                         f"{_first_line(exc)}") from None
    return _key_in(data, source)


def _key_in(data: bytes, source: str) -> str:
    """The key in what ``source`` (a flag and its value, for messages) holds: UTF-8, stripped,
    not empty; the message never shows the content."""
    try:
        key = clean_key(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{source} cannot be read: it is not UTF-8 text") from None
    if not key:
        raise UsageError(f"{source} holds no key (empty)")
    return key


def _first_line(exc: Exception) -> str:
    """': ' and the first line of a library error (it names the permission or the missing
    version, never the payload)."""
    text = str(exc).strip().splitlines()
    return f": {text[0][:200]}" if text else ""
