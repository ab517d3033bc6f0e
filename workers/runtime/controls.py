"""DecodingControls -> logits processors: the engine's half of genq's output controls.

Each processor is called once per sampled token with the tokens generated so far and the request's
logits row [V] (workers.runtime.types.LogitsProcessor) and changes the row in place:

    LogitBias        OpenAI's logit_bias: adds the bias of each listed token
    BannedStrings    -inf on every token that would complete a banned string, inside the token or
                     across the boundary with the text so far ("...Acm" + "e"); case folded if asked
    WordLimits       end-of-text masked below min_words; only end-of-text once the text is past
                     max_chars or max_words (the job layer then cuts it back to a word boundary)
    RequiredTerms    once the text ends with the first 4+ characters of a missing required term at a
                     word boundary, only tokens that go on spelling it
    JsonGrammar      xgrammar's token bitmask for a JSON schema (or any JSON object)

Vocabulary lookups (token texts, sorted for prefix search) are built once per tokenizer.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from functools import cached_property

import torch

from workers.runtime.tokenizer import Tokenizer
from workers.runtime.types import DecodingControls, LogitsProcessor

_WORD = re.compile(r"\S+")
_TAIL_TOKENS = 16  # decoding this many last tokens gives every banned string's cross-boundary tail


class Vocabulary:
    """The token texts of one tokenizer, for string-level masks ([V] lists, V = the logits' width)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.size = vocab_size
        raw = tokenizer.token_bytes + [b""] * (vocab_size - len(tokenizer.token_bytes))
        self.raw = raw[:vocab_size]
        self.texts = [b.decode("utf-8", errors="ignore") for b in self.raw]
        self.eos_ids = list(tokenizer.special.eos_ids)
        self._containing: dict[tuple[str, bool], list[int]] = {}

    @cached_property
    def lowered(self) -> list[str]:
        return [t.lower() for t in self.texts]

    def _sorted(self, case_insensitive: bool) -> tuple[list[str], list[int]]:
        key = "_sorted_ci" if case_insensitive else "_sorted_cs"
        if key not in self.__dict__:
            texts = self.lowered if case_insensitive else self.texts
            order = sorted((t, i) for i, t in enumerate(texts) if t)
            self.__dict__[key] = ([t for t, _ in order], [i for _, i in order])
        return self.__dict__[key]

    def starting_with(self, prefix: str, case_insensitive: bool) -> list[int]:
        """Ids of the tokens whose text starts with prefix."""
        texts, ids = self._sorted(case_insensitive)
        lo = bisect.bisect_left(texts, prefix)
        hi = bisect.bisect_left(texts, prefix + "\U0010ffff")
        return ids[lo:hi]

    def containing(self, term: str, case_insensitive: bool) -> list[int]:
        """Ids of the tokens whose text holds term (cached: every request of a batch bans the same)."""
        key = (term, case_insensitive)
        if key not in self._containing:
            texts = self.lowered if case_insensitive else self.texts
            self._containing[key] = [i for i, t in enumerate(texts) if term in t]
        return self._containing[key]

    def tail(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids[-_TAIL_TOKENS:]))


class _FollowedText:
    """The decoded text of a request's output, kept in step with its growing token list."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._detokenizer = tokenizer.detokenizer()
        self._seen = 0
        self.text = ""

    def update(self, token_ids: Sequence[int]) -> str:
        for token_id in token_ids[self._seen:]:
            self.text += self._detokenizer.push(token_id)
        self._seen = len(token_ids)
        return self.text


class LogitBias:
    def __init__(self, bias: dict[int, float], vocab_size: int) -> None:
        ids = [i for i in bias if 0 <= i < vocab_size]
        self.ids = torch.tensor(ids, dtype=torch.int64)
        self.values = torch.tensor([float(bias[i]) for i in ids], dtype=torch.float32)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        logits.index_add_(0, self.ids.to(logits.device), self.values.to(logits.device))


class BannedStrings:
    def __init__(self, banned: list[str], case_insensitive: bool, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.case_insensitive = case_insensitive
        self.banned = [b.lower() for b in banned] if case_insensitive else list(banned)
        always = sorted({i for b in self.banned for i in vocab.containing(b, case_insensitive)})
        self.always = torch.tensor(always, dtype=torch.int64)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        logits[self.always.to(logits.device)] = float("-inf")
        if not output_token_ids or all(len(b) == 1 for b in self.banned):
            return
        tail = self.vocab.tail(output_token_ids)
        if self.case_insensitive:
            tail = tail.lower()
        ids = [i for b in self.banned for k in range(1, len(b)) if tail.endswith(b[:k])
               for i in self.vocab.starting_with(b[k:], self.case_insensitive)]
        if ids:
            logits[torch.tensor(ids, dtype=torch.int64, device=logits.device)] = float("-inf")


class WordLimits:
    CLOSING = 8  # words before max_words from which a sentence end is favoured
    PERIOD_BIAS = 3.0

    def __init__(self, controls: DecodingControls, vocab: Vocabulary) -> None:
        self.periods = torch.tensor([i for i, t in enumerate(vocab.texts) if t in (".", ".\"", ". ")],
                                    dtype=torch.int64)
        self.min_words = controls.min_words
        self.max_chars = controls.max_chars
        self.max_words = controls.max_words
        self.text = _FollowedText(vocab.tokenizer)
        self.eos = torch.tensor(vocab.eos_ids, dtype=torch.int64)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        text = self.text.update(output_token_ids).strip()
        words = len(_WORD.findall(text))
        eos = self.eos.to(logits.device)
        over = (self.max_chars is not None and len(text) > self.max_chars) or \
            (self.max_words is not None and words > self.max_words)
        if over:
            keep = logits[eos].clone()
            logits.fill_(float("-inf"))
            logits[eos] = keep
        elif words < self.min_words:
            logits[eos] = float("-inf")
        if not over and self.max_words is not None and words >= max(self.min_words, self.max_words - self.CLOSING):
            logits[self.periods.to(logits.device)] += self.PERIOD_BIAS  # finish the sentence before the limit


class RequiredTerms:
    """A missing term's first token is favoured at word starts (+BIAS); once the text ends with the
    term's first token, or its first 4+ characters, at a word boundary, only its spelling goes on."""

    _TRIGGER = 4
    BIAS = 4.0

    def __init__(self, required: list[str], vocab: Vocabulary) -> None:
        self.terms = [t.lower() for t in required]
        self.vocab = vocab
        self.text = _FollowedText(vocab.tokenizer)
        tokenizer = vocab.tokenizer
        # The term's first token after a space and at the start of the text: the model's ways to begin it.
        self.openers = {term: sorted({tokenizer.encode(" " + t, add_bos=False)[0] for t in (term, term.title())} |
                                     {tokenizer.encode(t, add_bos=False)[0] for t in (term, term.title())})
                        for term in required}
        self.first_pieces = {t.lower(): {vocab.lowered[i].strip() for i in ids} for t, ids in self.openers.items()}

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        text = self.text.update(output_token_ids).lower()
        for term, openers in zip(self.terms, self.openers.values(), strict=True):
            if term in text:
                continue
            rest = self._rest(text, term)
            if rest is None:
                if not text or text[-1].isspace() or not text[-1].isalnum():
                    logits[torch.tensor(openers, dtype=torch.int64, device=logits.device)] += self.BIAS
                continue
            allowed = set(self.vocab.starting_with(rest, True))
            allowed.update(i for k in range(1, len(rest)) for i in self._exact(rest[:k]))
            if allowed:
                mask = torch.full_like(logits, float("-inf"))
                index = torch.tensor(sorted(allowed), dtype=torch.int64, device=logits.device)
                mask[index] = 0.0
                logits.add_(mask)
                return

    def _rest(self, text: str, term: str) -> str | None:
        """What is left to type of term when the text ends with its beginning at a word start."""
        shortest = min([self._TRIGGER, len(term) - 1, *(len(p) for p in self.first_pieces[term] if p)])
        for k in range(len(term) - 1, max(1, shortest) - 1, -1):
            start = len(text) - k
            if text.endswith(term[:k]) and (start == 0 or not text[start - 1].isalnum()):
                if k >= self._TRIGGER or term[:k] in self.first_pieces[term]:
                    return term[k:]
        return None

    def _exact(self, piece: str) -> list[int]:
        return [i for i in self.vocab.starting_with(piece, True) if self.vocab.lowered[i] == piece]


class JsonGrammar:
    """xgrammar's matcher for one request: accepts each new token, then masks the next step's logits."""

    def __init__(self, schema: str, compiler: object, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        compiled = compiler.compile_json_schema(schema, any_whitespace=False) if schema != "{}" \
            else compiler.compile_builtin_json_grammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._seen = 0

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        for token_id in output_token_ids[self._seen:]:
            self.matcher.accept_token(int(token_id))
        self._seen = len(output_token_ids)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask.to(logits.device))


class ControlFactory:
    """Builds a request's processors from its DecodingControls; one per engine (its vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab = Vocabulary(tokenizer, vocab_size)

    @cached_property
    def grammar_compiler(self) -> object:
        import xgrammar as xgr

        info = xgr.TokenizerInfo(self.vocab.raw, xgr.VocabType.RAW, vocab_size=self.vocab.size,
                                 stop_token_ids=self.vocab.eos_ids)
        return xgr.GrammarCompiler(info)

    def processors(self, controls: DecodingControls) -> list[LogitsProcessor]:
        out: list[LogitsProcessor] = []
        if controls.logit_bias:
            out.append(LogitBias(controls.logit_bias, self.vocab.size))
        if controls.json_schema is not None:
            out.append(JsonGrammar(controls.json_schema, self.grammar_compiler, self.vocab.size))
        if controls.banned:
            out.append(BannedStrings(controls.banned, controls.banned_case_insensitive, self.vocab))
        if controls.required:
            out.append(RequiredTerms(controls.required, self.vocab))
        if controls.min_words or controls.max_chars or controls.max_words:
            out.append(WordLimits(controls, self.vocab))  # last: its forced end-of-text overrides a bias
        return out

