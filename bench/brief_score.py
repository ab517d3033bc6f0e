"""The demo brief's scorer: does a product description obey the whole brief?

    rule          passes when
    length        40 to 60 words (whitespace-separated)
    no_bang       no "!"
    material      the row's material named (case-insensitive, as written in the catalog)
    paragraph     one paragraph: no line break in the text
    sentence      ends with a finished sentence (. ? or ! after the last word, closing quotes allowed)

`score(text, material)` -> {rule: bool}; a description obeys the brief when every rule passes.
"""

from __future__ import annotations

import re

RULES = ("length", "no_bang", "material", "paragraph", "sentence")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*$")


def score(text: str, material: str) -> dict[str, bool]:
    text = text.strip()
    return {
        "length": 40 <= len(text.split()) <= 60,
        "no_bang": "!" not in text,
        "material": material.lower() in text.lower(),
        "paragraph": "\n" not in text,
        "sentence": bool(_SENTENCE_END.search(text)),
    }


def obeys(text: str, material: str) -> bool:
    return all(score(text, material).values())
