"""Preflight: check endpoint, key and model once, in the launcher, before the job starts.

Uses the openai SDK (``max_retries=0``) for its model listing and typed errors; workers never
import this module.
"""

from __future__ import annotations

import openai

from beam_caption.client import NO_KEY, ClientSettings, error_message
from beam_caption.errors import PreflightError

PREFLIGHT_TIMEOUT_S = 15.0


def preflight(settings: ClientSettings, api_key: str | None) -> None:
    """Check endpoint, key and model before the job starts; raise PreflightError if unusable.

    Lists the models; where the server has no model list (404/405) it sends one tiny
    text-only chat request instead.
    """
    client = _preflight_client(settings, api_key)
    try:
        served = [model.id for model in client.models.list()]
    except openai.APIStatusError as exc:
        if exc.status_code not in (404, 405):
            raise _preflight_error(settings, exc) from None
        served = None
    except openai.APIError as exc:
        raise _preflight_error(settings, exc) from None
    finally:
        client.close()
    if served is None:
        _probe_chat(settings, api_key)
    elif served and settings.model not in served:
        shown = ", ".join(sorted(served)[:10])
        raise PreflightError(f"model {settings.model!r} is not served at {settings.api_url} "
                             f"(it serves: {shown})")


def _preflight_client(settings: ClientSettings, api_key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=settings.api_url, api_key=api_key or NO_KEY, max_retries=0,
                         timeout=PREFLIGHT_TIMEOUT_S)


def _probe_chat(settings: ClientSettings, api_key: str | None) -> None:
    client = _preflight_client(settings, api_key)
    try:
        client.chat.completions.create(model=settings.model, max_tokens=1,
                                       messages=[{"role": "user", "content": "ping"}])
    except openai.APIStatusError as exc:
        if exc.status_code in (401, 403, 404):
            raise _preflight_error(settings, exc) from None
    except openai.APIError as exc:
        raise _preflight_error(settings, exc) from None
    finally:
        client.close()


def _preflight_error(settings: ClientSettings, exc: openai.APIError) -> PreflightError:
    where = settings.api_url
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 401:
            return PreflightError(f"{where} refused the API key (HTTP 401): set DF_API_KEY or "
                                  "OPENAI_API_KEY, or name the variable with --api_key_env")
        if status == 403:
            return PreflightError(f"{where} denied access (HTTP 403): the key may lack access "
                                  f"to model {settings.model!r}")
        if status == 404:
            return PreflightError(f"model {settings.model!r} was not found at {where} (HTTP 404)")
        return PreflightError(f"{where} answered HTTP {status}: {error_message(exc.body)}")
    if isinstance(exc, openai.APITimeoutError):
        return PreflightError(f"{where} did not answer within {PREFLIGHT_TIMEOUT_S:.0f} s")
    cause = exc.__cause__ or exc
    return PreflightError(f"cannot reach {where}: {type(cause).__name__}: {cause}")
