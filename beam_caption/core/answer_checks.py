"""Answer checks: cheap local tests that a text answer is a caption, not a loop or a refusal.

Small models sometimes answer with a repetition loop ("a wall and a wall and a wall ..." until the
completion limit) or with a refusal written as the answer text (the API's ``refusal`` field
empty); both would otherwise be kept as captions. ``AnswerChecks.check`` runs on each text
answer before it is kept (core/structured.py ``answer_checker``: a prompt with a JSON schema or
a JSON answer is checked by its schema instead). A failed check raises a retryable CaptionError:
the client asks again (a new attempt, counted as a retry, with a new seed: core/client.py) and
the record fails with that type once its retries are spent. The checks, each switched on by
name in ``--answer_checks``:

- ``repetition`` (``response/degenerate``), on the answer's last ``TAIL_CHARS`` characters (a
  loop runs to its end): the answer's units are its words (split at white
  space, case folded, punctuation kept), or its letters and digits when most of its
  characters are in a script written without spaces (CJK, Thai, ...) or its words average over
  ``LONG_WORD`` characters (a run with no space). The answer loops when it has at least
  ``MIN_NGRAMS`` n-grams of ``WORD_NGRAM`` words (``CHAR_NGRAM`` letters) and at least
  ``REPEATED_SHARE`` of them repeat an n-gram that came earlier: (n-grams - distinct n-grams) /
  n-grams. A loop of k periods scores about 1 - 1/k; ordinary captions, lists and long detailed
  descriptions score under 0.4 (tests/test_answer_checks.py).
- ``refusal`` (``response/refusal``, the type of the API's refusal field): the answer starts
  with one of ``REFUSAL_PHRASES`` (or is one), both normalised (``normalised``: NFKC, case
  folded, apostrophes as ', every run of other non-letters as one space), so "I’m SORRY, but I
  can't" matches "i'm sorry but i can't". ``--refusal_phrases_file`` replaces the list.
- ``short`` (``response/too_short``): the answer has fewer than ``--min_caption_chars``
  characters (default 0: off, as a prompt may rightly answer "3" or "No").

Checks cost microseconds per caption (benchmarks/bench_answer_checks.py).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Callable

import fsspec

from beam_caption.core.errors import CaptionError, UsageError

CHECKS = ("repetition", "refusal", "short")
DEFAULT_CHECKS = ",".join(CHECKS)
NO_CHECKS = "none"
WORD_NGRAM = 5
CHAR_NGRAM = 8
MIN_NGRAMS = 20
REPEATED_SHARE = 0.5
TAIL_CHARS = 2_000  # of an answer, the repetition check reads the last ones
LONG_WORD = 20  # words averaging more characters than this: a text without spaces
QUOTED_CHARS = 200  # of the answer, in a failed check's message
MAX_PHRASES_FILE_BYTES = 64 * 1024
MAX_PHRASES = 1000
MAX_PHRASE_CHARS = 200

# The phrasings a refusal starts with, by language (English, Chinese, Japanese, Korean, Spanish,
# French, German, Portuguese, Italian, Russian): specific enough that no caption starts so.
REFUSAL_PHRASES_BY_LANGUAGE = {
    "en": ("I'm sorry, but I can't", "I'm sorry, but I cannot", "I'm sorry, I can't",
           "I'm sorry, I cannot", "I am sorry, but I can't", "I am sorry, but I cannot",
           "I'm sorry, but I'm unable", "I'm sorry, but I am unable", "I'm sorry, I'm unable",
           "Sorry, I can't", "Sorry, but I can't", "Sorry, I cannot",
           "I apologize, but I can't", "I apologize, but I cannot", "I apologise, but I can't",
           "I can't help with", "I cannot help with", "I can't assist with",
           "I cannot assist with", "I'm unable to help", "I am unable to help",
           "I'm not able to help", "I can't provide a description", "I cannot provide a "
           "description", "I'm unable to provide a description", "I can't describe this",
           "I cannot describe this", "I'm unable to describe", "I am unable to describe"),
    "zh": ("抱歉，我无法", "抱歉，我不能", "很抱歉，我无法", "很抱歉，我不能", "对不起，我无法",
           "对不起，我不能", "我无法帮助", "我无法描述", "我不能描述", "我无法提供",
           "抱歉，我無法", "很抱歉，我無法", "對不起，我無法", "我無法描述", "我無法提供"),
    "ja": ("申し訳ありませんが", "申し訳ございませんが", "すみませんが、この画像",
           "この画像について説明することはできません", "お手伝いできません"),
    "ko": ("죄송하지만", "죄송합니다만", "죄송합니다. 이 이미지", "도와드릴 수 없습니다"),
    "es": ("Lo siento, pero no puedo", "Lo siento, no puedo", "Lo lamento, pero no puedo",
           "No puedo ayudar con", "No puedo describir esta", "No puedo proporcionar una "
           "descripción"),
    "fr": ("Je suis désolé, mais je ne peux pas", "Je suis désolée, mais je ne peux pas",
           "Désolé, mais je ne peux pas", "Désolé, je ne peux pas", "Je ne peux pas vous aider",
           "Je ne peux pas aider", "Je ne peux pas décrire cette"),
    "de": ("Es tut mir leid, aber ich kann", "Tut mir leid, aber ich kann",
           "Entschuldigung, aber ich kann", "Ich kann dabei nicht helfen",
           "Ich kann Ihnen dabei nicht helfen", "Ich kann dieses Bild nicht beschreiben",
           "Leider kann ich dabei nicht helfen", "Leider kann ich dieses Bild nicht"),
    "pt": ("Desculpe, mas não posso", "Desculpe, não posso", "Sinto muito, mas não posso",
           "Lamento, mas não posso", "Não posso ajudar com", "Não posso descrever esta"),
    "it": ("Mi dispiace, ma non posso", "Mi dispiace, non posso", "Non posso aiutarti con",
           "Non posso descrivere questa"),
    "ru": ("Извините, но я не могу", "Извините, я не могу", "К сожалению, я не могу",
           "Простите, но я не могу", "Я не могу помочь с", "Я не могу описать это"),
}

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'",
                              "`": "'", "\u2032": "'"})
_NOT_WORD = re.compile(r"[^\w']+")
_LETTERS = re.compile(r"\w+")
# scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Myanmar, Khmer
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff"
                       r"\u1000-\u109f\u1780-\u17ff]")


def normalised(text: str) -> str:
    """``text`` as refusal phrases are compared: NFKC (full-width forms as ASCII), case
    folded, apostrophes as ', every run of characters other than letters, digits and ' as one
    space, no space at either end."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)
    return _NOT_WORD.sub(" ", folded).strip()


REFUSAL_PHRASES = tuple(dict.fromkeys(normalised(phrase)
                                      for phrases in REFUSAL_PHRASES_BY_LANGUAGE.values()
                                      for phrase in phrases))


def parse_checks(value: str, name: str = "answer_checks") -> frozenset[str]:
    """The checks a ``--answer_checks`` value names (comma separated; ``none``: no check);
    UsageError for a name that is no check."""
    names = {part.strip() for part in value.split(",") if part.strip()}
    if names == {NO_CHECKS}:
        return frozenset()
    unknown = sorted(names - set(CHECKS))
    if unknown or not names:
        raise UsageError(f"{name} {value!r}: give a comma-separated list of "
                         f"{', '.join(CHECKS)}, or {NO_CHECKS}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return frozenset(names)


def load_refusal_phrases(path: str) -> tuple[str, ...]:
    """The phrases of a ``--refusal_phrases_file`` (any fsspec path; UTF-8, one phrase a line,
    blank lines and lines starting with # left out), normalised; UsageError for a file that
    cannot be read, is over MAX_PHRASES_FILE_BYTES, or holds no phrase, too many or too long
    ones."""
    source = f"--refusal_phrases_file {path}"
    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read(MAX_PHRASES_FILE_BYTES + 1)
        if len(data) > MAX_PHRASES_FILE_BYTES:
            raise UsageError(f"{source}: longer than {MAX_PHRASES_FILE_BYTES} bytes")
        text = data.decode("utf-8-sig")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{source}: cannot read it ({type(exc).__name__}: {exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    phrases = [line for line in lines if line and not line.startswith("#")]
    if not phrases:
        raise UsageError(f"{source}: holds no phrase (to switch the refusal check off, leave "
                         "refusal out of --answer_checks)")
    if len(phrases) > MAX_PHRASES:
        raise UsageError(f"{source}: holds {len(phrases)} phrases, over {MAX_PHRASES}")
    too_long = next((phrase for phrase in phrases if len(phrase) > MAX_PHRASE_CHARS), None)
    if too_long is not None:
        raise UsageError(f"{source}: the phrase {too_long[:60]!r}... is over "
                         f"{MAX_PHRASE_CHARS} characters")
    kept = tuple(dict.fromkeys(normalised(phrase) for phrase in phrases))
    if "" in kept:
        raise UsageError(f"{source}: a phrase has no letter or digit (it would match every "
                         "answer)")
    return kept


def loop_figures(text: str) -> tuple[float, int] | None:
    """When the answer is a repetition loop (see the module), the share of its n-grams that
    repeat an earlier one and how many n-grams it has; else None.

    Only the answer's last TAIL_CHARS characters are read: a loop runs to the end of the
    answer (most often to the completion limit), and the cost of a check stays bounded. Its
    units are split at white space (punctuation stays on its word: a loop repeats its
    punctuation too); repeated n-grams never outnumber repeated units, so an answer whose units
    repeat too little is passed without building its n-grams.
    """
    text = text[-TAIL_CHARS:]
    units: str | list[str] = text.casefold().split()
    size = WORD_NGRAM
    if len(text) > LONG_WORD * len(units) or (
            not text.isascii() and 2 * len(_UNSPACED.findall(text)) > len(text)):
        units, size = "".join(_LETTERS.findall(text.casefold())), CHAR_NGRAM
    grams = len(units) - size + 1
    if grams < MIN_NGRAMS or len(units) - len(set(units)) < REPEATED_SHARE * grams:
        return None
    shifted = [units[i:len(units) - size + 1 + i] for i in range(size)]
    share = (grams - len(set(zip(*shifted, strict=True)))) / grams
    return (share, grams) if share >= REPEATED_SHARE else None


@dataclasses.dataclass(frozen=True)
class AnswerChecks:
    """Which checks a text answer must pass (see the module), made at launch.

    Attributes:
        checks: the names of the checks on (of ``CHECKS``).
        min_chars: ``short``: an answer under this many characters fails (0: none does).
        refusal_phrases: ``refusal``: the normalised phrases (``normalised``) a refusal starts
            with.
    """

    checks: frozenset[str] = frozenset(CHECKS)
    min_chars: int = 0
    refusal_phrases: tuple[str, ...] = REFUSAL_PHRASES

    @classmethod
    def from_settings(cls, checks: str, min_chars: int,
                      refusal_phrases_file: str | None) -> AnswerChecks:
        """The checks of the flags ``--answer_checks``, ``--min_caption_chars`` and
        ``--refusal_phrases_file`` (read now); UsageError for a wrong one."""
        names = parse_checks(checks)
        if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
            raise UsageError(f"min_caption_chars must be an integer >= 0, got {min_chars!r}")
        phrases = REFUSAL_PHRASES
        if refusal_phrases_file and "refusal" in names:
            phrases = load_refusal_phrases(refusal_phrases_file)
        return cls(names, min_chars, phrases)

    @functools.cached_property
    def _prefix_chars(self) -> int:
        """Characters of an answer's start read for a refusal: twice the longest phrase and
        some (normalising shortens runs of spaces and punctuation)."""
        return 2 * max(map(len, self.refusal_phrases), default=0) + 16

    def checker(self) -> Callable[[str], str] | None:
        """``check``, or None when no check is on."""
        return self.check if self.checks else None

    def check(self, text: str) -> str:
        """``text`` when it passes the checks that are on; else a retryable CaptionError
        naming the check, with the answer's first QUOTED_CHARS characters."""
        checks = self.checks
        if "refusal" in checks:
            start = normalised(text[:self._prefix_chars])
            if start.startswith(self.refusal_phrases):
                phrase = next(p for p in self.refusal_phrases if start.startswith(p))
                raise CaptionError("response", "refusal",
                                   f"the answer is a refusal (it starts with {phrase!r}; "
                                   f"--answer_checks refusal): {_quoted(text)}", retryable=True)
        if "short" in checks and len(text) < self.min_chars:
            raise CaptionError("response", "too_short",
                               f"the answer has {len(text)} characters, under "
                               f"--min_caption_chars {self.min_chars}: {_quoted(text)}",
                               retryable=True)
        if "repetition" in checks:
            loop = loop_figures(text)
            if loop is not None:
                share, grams = loop
                raise CaptionError("response", "degenerate",
                                   f"the answer is a repetition loop ({share:.0%} of the "
                                   f"{grams} n-grams of its end repeat an earlier one; "
                                   f"--answer_checks repetition): {_quoted(text)}", retryable=True)
        return text


def _quoted(text: str) -> str:
    """The answer's first QUOTED_CHARS characters, on one line, quoted."""
    start = " ".join(text[:QUOTED_CHARS].split())
    return f'"{start}{"..." if len(text) > QUOTED_CHARS else ""}"'
