"""genq's `constraints` extension: the rules a finished text must keep, checked and trimmed here.

Torch-free. The engine enforces what it can while decoding (workers.runtime.controls: banned strings
masked across token boundaries, end-of-text masked below min_words, end-of-text forced once a hard
limit is passed, a grammar for JSON); this module then cuts the text back to the limits at a word
boundary (a finished sentence where one is close) and checks every rule, so a text that still breaks
one is a rejected candidate, never a silent violation.

    preset                    max_chars   what it is
    google_ads_headline           30      a responsive search ad's headline
    google_ads_description        90      a responsive search ad's description
    meta_primary_text            125      the text above a Meta ad before "See more"
    sms                          160      one GSM-7 SMS segment
    amazon_title                 200      a product title in most Amazon categories

A preset fills max_chars; an explicit max_chars below it wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

PRESETS: dict[str, int] = {
    "google_ads_headline": 30,
    "google_ads_description": 90,
    "meta_primary_text": 125,
    "sms": 160,
    "amazon_title": 200,
}
MAX_TERMS = 32  # banned and required strings each
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_WORD = re.compile(r"\S+")


class Constraints(BaseModel):
    """The body's `constraints` object, validated (the request contract's error codes)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_chars: Annotated[int, Field(ge=1)] | None = None
    max_words: Annotated[int, Field(ge=1)] | None = None
    min_words: Annotated[int, Field(ge=0)] | None = None
    banned: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=MAX_TERMS)] = []
    banned_case_insensitive: bool = False
    required: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=MAX_TERMS)] = []
    preset: str | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in PRESETS:
            raise PydanticCustomError("invalid_value", "must be one of {names}", {"names": ", ".join(PRESETS)})
        return preset

    @model_validator(mode="after")
    def _consistent(self) -> Constraints:
        if self.preset is not None:
            self.max_chars = min(self.max_chars or PRESETS[self.preset], PRESETS[self.preset])
        if self.min_words and self.max_words and self.min_words > self.max_words:
            raise PydanticCustomError("invalid_value", "min_words ({low}) is above max_words ({high})",
                                      {"low": self.min_words, "high": self.max_words})
        for term in self.required:
            if any(_contains(term, b, self.banned_case_insensitive) for b in self.banned):
                raise PydanticCustomError("invalid_value", "required term {term!r} contains a banned string",
                                          {"term": term})
            if self.max_chars is not None and len(term) > self.max_chars:
                raise PydanticCustomError("invalid_value", "required term {term!r} is longer than max_chars",
                                          {"term": term})
        return self

    def enforced(self) -> list[str]:
        """The names of the rules this object sets, for the result's report."""
        names = [name for name in ("max_chars", "max_words", "min_words") if getattr(self, name)]
        return names + [name for name in ("banned", "required") if getattr(self, name)]


@dataclass
class Checked:
    """A candidate's text cut to the limits, and the rules it still breaks (empty: accepted)."""

    text: str
    violations: list[str] = field(default_factory=list)
    # Prose (max_words or min_words set) that does not end with a finished sentence: kept only when no
    # candidate of the line's budget does better ("a finished sentence where possible").
    unfinished: bool = False


def _contains(text: str, term: str, case_insensitive: bool) -> bool:
    return term.lower() in text.lower() if case_insensitive else term in text


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _cuts(text: str, c: Constraints) -> list[str]:
    """Where the text may end: the longest prefix within max_chars and max_words that ends at a word
    boundary, preceded by its last finished sentence when that keeps at least two thirds of the words."""
    words = list(_WORD.finditer(text))
    keep = len(words)
    if c.max_words is not None:
        keep = min(keep, c.max_words)
    if c.max_chars is not None:
        keep = min(keep, sum(1 for w in words if w.end() <= c.max_chars))
    if keep == len(words):
        return [text.strip()]
    words = words[:keep]
    if not words:
        return [""]
    cut = text[words[0].start():words[-1].end()].rstrip(",;:-–—")
    for i in range(len(words) - 1, -1, -1):
        if _SENTENCE_END.search(words[i].group()):
            return [text[words[0].start():words[i].end()], cut] if i + 1 >= (2 * keep + 2) // 3 else [cut]
    return [cut]


def _violations(cut: str, c: Constraints) -> list[str]:
    problems = []
    if c.min_words and word_count(cut) < c.min_words:
        problems.append(f"min_words: {word_count(cut)} words, at least {c.min_words} asked")
    for term in c.banned:
        if _contains(cut, term, c.banned_case_insensitive):
            problems.append(f"banned: contains {term!r}")
    for term in c.required:
        if not _contains(cut, term, True):
            problems.append(f"required: {term!r} missing")
    if not cut.strip():
        problems.append("empty: nothing within the limits")
    return problems


def check(text: str, c: Constraints) -> Checked:
    """The text cut to the hard limits (at a finished sentence if that keeps every rule), and every
    rule it breaks."""
    cuts = _cuts(text, c) if (c.max_chars or c.max_words) else [text]
    judged = [Checked(cut, _violations(cut, c)) for cut in cuts]
    best = min(judged, key=lambda j: len(j.violations))  # the first (a sentence end) on a tie
    best.unfinished = bool(c.max_words or c.min_words) and not _SENTENCE_END.search(best.text.strip())
    return best
