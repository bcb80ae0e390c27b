"""Stages of a prompts file: prompts that use other prompts' answers, judges and re-captions.

A prompt's ``{NAME}`` placeholder, NAME another prompt's name or output key, is that prompt's
answer: the prompt waits for it, so the prompts of a record run in dependency order (those
that wait for nothing run at once, as before). A placeholder naming the prompt itself, or no
prompt, is the record's field. The prompts file's parser (prompts.py ``linked_stages``)
resolves the placeholders, checks judges and orders the prompts (stable: a file without
stages keeps its order), refusing cycles; this module holds what the runtime, the launcher,
the summary and ``estimate`` need of them.

A judge (``judge: NAME``) answers with a JSON object whose ``score`` is a number from 1 to
10 (``SCORE_RANGE``; its schema must require it, its prompt must show NAME's answer). With
``threshold`` and ``recaption`` a record whose answer scores below the threshold is asked
NAME's prompt again with the ``recaption`` model; that answer replaces the first one and is
judged again (one more judge request), and ``caption_meta["quality"]`` (``quality_meta``)
keeps both answers' scores and the first answer. No Beam here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from beam_caption.core.errors import CaptionError
from beam_caption.core.prompts import SCORE_RANGE, ModelRoute, PromptSpec

STAGE_INPUT_FAILED = "stage_input_failed"  # a prompt whose input prompt failed


def is_staged(specs: Sequence[PromptSpec]) -> bool:
    """Whether any prompt uses another's answer, its own model, or judges."""
    return any(spec.inputs or spec.route or spec.judge_of for spec in specs)


def batch_refusal(specs: Sequence[PromptSpec]) -> str | None:
    """Why ``--mode batch`` cannot ask these prompts (None when it can): a batch is one file
    of independent requests to one model, sent at once."""
    for spec in specs:
        if spec.inputs or spec.judge_of:
            return (f"--mode batch sends every request of a record at once: prompt "
                    f"{spec.name!r} waits for another prompt's answer (a stage or a judge); "
                    "run it online")
        if spec.route:
            return (f"--mode batch sends one model's requests: prompt {spec.name!r} names its "
                    f"own model {spec.route.model!r}; run it online")
    return None


def routes(specs: Sequence[PromptSpec]) -> tuple[ModelRoute, ...]:
    """The models other than the job's that the prompts may be asked with, each once."""
    found = [route for spec in specs for route in (spec.route, spec.recaption) if route]
    return tuple(dict.fromkeys(found))


def model_prices(specs: Sequence[PromptSpec], input_price: float,
                 output_price: float) -> dict[str, list[float]]:
    """Model -> [input, output] dollars per million tokens of the models other than the job's
    that ``specs`` ask (a price a route does not give is the job's: ``input_price``,
    ``output_price``)."""
    return {route.model: list(route.prices(input_price, output_price))
            for route in routes(specs)}


def score_checker(check: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """A judge's answer check: ``check`` (its schema's), then a score in SCORE_RANGE
    (retryable ``response/bad_score`` otherwise)."""
    low, high = SCORE_RANGE

    def checked(text: str) -> Any:
        value = check(text) if check else text
        score = value.get("score") if isinstance(value, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)) or \
                not low <= score <= high:
            raise CaptionError("response", "bad_score",
                               f"the judge's score {score!r} is not a number from {low:g} to "
                               f"{high:g}: {text[:200]!r}", retryable=True)
        return value

    return checked


def quality_meta(judge: PromptSpec, score: float, model: str, first: dict | None = None) -> dict:
    """``caption_meta["quality"]``: the judge, the prompt judged, the kept answer's score and
    model; ``first`` (``first_answer``, ``first_score``, ``first_model``) when the first answer
    was replaced."""
    assert judge.judge_of is not None
    return {"judge": judge.name, "of": judge.judge_of, "score": score,
            "threshold": judge.threshold, "recaptioned": first is not None, **(first or {}),
            "model": model}


def input_failed(spec: PromptSpec, failed: str) -> CaptionError:
    """The error of a prompt that cannot be asked: the prompt ``failed`` it needs failed."""
    return CaptionError("request", STAGE_INPUT_FAILED,
                        f"prompt {spec.name!r} needs the answer of prompt {failed!r}, which "
                        "failed")
