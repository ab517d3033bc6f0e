"""DecodingControls -> logits processors: the engine's half of genq's output controls.

Each processor is called once per sampled token with the tokens generated so far and the request's
logits row [V] (workers.runtime.types.LogitsProcessor) and changes the row in place:

    LogitBias        OpenAI's logit_bias: adds the bias of each listed token
    BannedStrings    -inf on every token that would complete a banned string, inside the token or
                     across the boundary with the text so far ("...Acm" + "e"); case folded if asked
    WordLimits       end-of-text masked below min_words; only end-of-text once the text is past
                     max_chars or max_words (the job layer then cuts it back to a word boundary)
    RequiredTerms    end-of-text masked while a required term is missing, its first token favoured
                     at word starts (more as the text grows); once begun, only tokens spelling it on
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


def _only(logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Masks every entry of logits [V] but ids (their values kept)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[ids.to(logits.device)] = 0.0
    logits.add_(mask)


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
        if over:  # end now, even where another processor masked end-of-text
            logits.fill_(float("-inf"))
            logits[eos] = 0.0
        elif words < self.min_words:
            logits[eos] = float("-inf")
        if not over and self.max_words is not None and words >= max(self.min_words, self.max_words - self.CLOSING):
            logits[self.periods.to(logits.device)] += self.PERIOD_BIAS  # finish the sentence before the limit


class RequiredTerms:
    """While a term is missing, end-of-text is masked and the term's first token is favoured where a
    word may start, more strongly the longer the text (BIAS + RAMP per word). Once the limits leave
    only room for the missing terms and a closing sentence, the next word the model starts is the
    term. Once the text ends with a term's first token, or its first 4+ characters, at a word
    boundary, only tokens that go on spelling it (in the case it was written, where the vocabulary allows)."""

    _TRIGGER = 4
    BIAS = 4.0
    RAMP = 0.25
    _SPARE_CHARS = 4  # characters left after a term forced under max_chars

    def __init__(self, controls: DecodingControls, vocab: Vocabulary) -> None:
        self.written = list(controls.required)
        self.terms = [t.lower() for t in self.written]
        self.max_words, self.max_chars = controls.max_words, controls.max_chars
        self.vocab = vocab
        self.text = _FollowedText(vocab.tokenizer)
        self.eos = torch.tensor(vocab.eos_ids, dtype=torch.int64)
        encode = vocab.tokenizer.encode
        spellings = [(term, term.title(), term.capitalize()) for term in self.written]
        # The model's ways to begin a term: after a word (" Gore", the token brings its space) and
        # after a space or at the start ("Gore").
        self.after_word = [self._firsts(encode(" " + t, add_bos=False) for t in ts) for ts in spellings]
        self.after_space = [self._firsts(encode(t, add_bos=False) for t in ts) for ts in spellings]
        self.first_pieces = [{vocab.lowered[i].strip() for i in a.tolist() + b.tolist()}
                             for a, b in zip(self.after_word, self.after_space, strict=True)]

    def _firsts(self, encodings) -> torch.Tensor:
        ids = {ids[0] for ids in encodings if ids and self.vocab.texts[ids[0]].strip()}
        return torch.tensor(sorted(ids), dtype=torch.int64)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> None:
        raw = self.text.update(output_token_ids)
        text = raw.lower()
        missing = [k for k, term in enumerate(self.terms) if term not in text]
        if not missing:
            return
        logits[self.eos.to(logits.device)] = float("-inf")
        for k in missing:
            allowed = self._spelling(text, k)
            if allowed:
                _only(logits, torch.tensor(allowed, dtype=torch.int64))
                return
        after_word = bool(text) and not text[-1].isspace()
        after_space = not text or text[-1].isspace() or text[-1] in "(\"'“‘"
        words = len(_WORD.findall(text))
        if self._due(raw, words, missing) and self._at_word_start(raw, logits):
            openers = self.after_word[missing[0]] if after_word else self.after_space[missing[0]]
            if len(openers):
                _only(logits, openers)
                return
        bias = self.BIAS + self.RAMP * words
        for k in missing:
            if after_word:
                logits[self.after_word[k].to(logits.device)] += bias
            if after_space:
                logits[self.after_space[k].to(logits.device)] += bias

    def _due(self, raw: str, words: int, missing: list[int]) -> bool:
        """Whether the limits leave room (text of `words` words) for little more than the missing terms."""
        need_words = sum(len(self.terms[k].split()) for k in missing)
        need_chars = sum(len(self.terms[k]) + 1 for k in missing)
        word_room = self.max_words is not None and words >= self.max_words - WordLimits.CLOSING - need_words
        return word_room or (self.max_chars is not None and
                             len(raw.strip()) + need_chars >= self.max_chars - self._SPARE_CHARS)

    def _at_word_start(self, raw: str, logits: torch.Tensor) -> bool:
        """Whether the next token starts a word: the text ends with a space or punctuation, or the
        model's own first choice begins with one (so a term never splits the word being written)."""
        if not raw or not raw[-1].isalnum():
            return True
        top = self.vocab.texts[int(logits.argmax())]
        return bool(top) and not top[0].isalnum()

    def _spelling(self, text: str, k: int) -> list[int]:
        """The tokens that go on spelling term k when the text ends with its beginning at a word start."""
        term, pieces = self.terms[k], self.first_pieces[k]
        shortest = min([self._TRIGGER, len(term) - 1, *(len(p) for p in pieces if p)])
        for n in range(len(term) - 1, max(1, shortest) - 1, -1):
            start = len(text) - n
            if text.endswith(term[:n]) and (start == 0 or not text[start - 1].isalnum()):
                if n >= self._TRIGGER or term[:n] in pieces:
                    return self._continuing(self.written[k][n:], False) or self._continuing(term[n:], True)
        return []

    def _continuing(self, rest: str, case_insensitive: bool) -> list[int]:
        """Tokens that begin with rest, or are exactly a prefix of it."""
        texts = self.vocab.lowered if case_insensitive else self.vocab.texts
        allowed = set(self.vocab.starting_with(rest, case_insensitive))
        allowed.update(i for j in range(1, len(rest)) for i in self.vocab.starting_with(rest[:j], case_insensitive)
                       if texts[i] == rest[:j])
        return sorted(allowed)


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
            out.append(RequiredTerms(controls, self.vocab))
        if controls.min_words or controls.max_chars or controls.max_words:
            out.append(WordLimits(controls, self.vocab))  # last: its forced end-of-text overrides a bias
        return out

