"""Byte-level BPE tokenizer (the `tokenizers` library) built from GGUF metadata or a tokenizer.json,
and an incremental detokenizer that never emits half of a multi-byte character.

Encoding goes through `tokenizers`; decoding maps each id to its raw bytes once (the inverse of
GPT-2's bytes_to_unicode) and feeds them to a UTF-8 incremental decoder, so a character split over
two tokens appears only when its last byte arrives. Control tokens (bos, eos, <|im_end|>...) decode
to nothing, as Hugging Face's decode(skip_special_tokens=True).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> the regex that splits text before BPE.
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _spelled_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level token spelling; a token outside the alphabet is literal UTF-8 text."""
    if all(c in _BYTE_OF_CHAR for c in token):
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    return token.encode("utf-8")


def _pre_tokenizer(pre: str | None, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        # SmolLM's tokenizer.json (and llama.cpp's "smollm"): single digits, then GPT-2's split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        log.warning("unknown GGUF pre-tokenizer %r: using GPT-2's split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)


@dataclass
class SpecialTokens:
    """Ids and spellings of the tokens generation and chat templates need."""

    bos_id: int | None  # beginning of sequence
    eos_ids: tuple[int, ...]  # any of these ends a generation (eos, eot, <|im_end|>...)
    pad_id: int | None
    bos_token: str | None  # spelling, passed to chat templates
    eos_token: str | None
    add_bos: bool  # prepend bos when encoding a plain prompt


class Tokenizer:
    """encode(text) -> ids with special-token spellings matched whole; decode via raw token bytes."""

    def __init__(self, backend: BackendTokenizer, token_bytes: list[bytes], special: SpecialTokens) -> None:
        self.backend = backend
        self.token_bytes = token_bytes  # [V] raw bytes of each id; b"" for control tokens
        self.special = special

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; bos is prepended when add_bos (default: the checkpoint's add_bos_token)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.special.add_bos if add_bos is None else add_bos
        if add_bos and self.special.bos_id is not None and ids[:1] != [self.special.bos_id]:
            ids = [self.special.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids, control tokens skipped; a trailing incomplete character is dropped."""
        detok = self.detokenizer()
        return "".join(detok.push(i) for i in ids)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.token_bytes)


class IncrementalDetokenizer:
    """push(id) -> the newly complete text; bytes of an unfinished UTF-8 character are held back."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes[token_id])


def tokenizer_from_gguf(
    tokens: list[str], token_types: list[int] | None, merges: list[str], pre: str | None,
    add_prefix_space: bool, special: SpecialTokens,
) -> Tokenizer:
    """Byte-level BPE from GGUF's tokenizer.ggml.* arrays (tokenizer.ggml.model == "gpt2")."""
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(pre, add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    types = token_types or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_USER_DEFINED])
    token_bytes = [
        b"" if ty == TOKEN_TYPE_CONTROL else t.encode() if ty == TOKEN_TYPE_USER_DEFINED else _spelled_bytes(t)
        for t, ty in zip(tokens, types, strict=True)
    ]
    return Tokenizer(backend, token_bytes, special)


def tokenizer_from_json(path: Path, vocab_size: int, special: SpecialTokens) -> Tokenizer:
    """Byte-level BPE from a Hugging Face tokenizer.json; raises ValueError for other kinds."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers are supported (tokenizer.json model BPE, decoder ByteLevel)")
    backend = BackendTokenizer.from_file(str(path))
    # Llama-3-style files add bos in a post-processor: keep that as add_bos, then let encode() do it.
    probe = backend.encode("a", add_special_tokens=True).ids
    if special.bos_id is not None and probe[:1] == [special.bos_id]:
        special = dataclasses.replace(special, add_bos=True)
    backend.post_processor = None
    token_bytes = [b""] * max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    for token, i in spec["model"]["vocab"].items():
        token_bytes[i] = _spelled_bytes(token)
    for added in spec.get("added_tokens", []):
        token_bytes[added["id"]] = b"" if added.get("special") else added["content"].encode()
    return Tokenizer(backend, token_bytes, special)
