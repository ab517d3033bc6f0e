"""Validated examples -> token ids under the model's chat template, loss masks, a validation split.

Torch-free. A chat is tokenized piece by piece: the text before each assistant reply (ending with the
template's generation prompt, e.g. "<|im_start|>assistant\\n") and the reply itself (its content and
end-of-turn token). That is exactly what the model sees at inference, where the prompt is tokenized
alone and the reply is generated token by token, so no token straddles a prompt/reply boundary.

Loss masks mark targets: mask[t] = 1 when token t is to be predicted (from tokens < t). Reply tokens
with weight 1 are targets up to and including the last end-of-turn id; what a template writes after
it (ChatML's "\\n") is context only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.fine_tuning.data import (
    ChatMessage,
    Method,
    PreferenceExample,
    SupervisedExample,
    TrainingFile,
    TrainingFileError,
    TrainingFileErrorCode,
)
from workers.runtime.chat_template import render_chat_template

if TYPE_CHECKING:
    from workers.runtime.tokenizer import Tokenizer

VALIDATION_FRACTION = 0.1  # held out of the training file when no validation file is given
MAX_SPLIT_VALIDATION = 1000  # at most this many examples are held out (evaluation stays cheap)


@dataclass(frozen=True)
class TokenizedChat:
    """A supervised example as the trainer sees it."""

    input_ids: tuple[int, ...]  # [L] the whole chat, at most max_length tokens
    loss_mask: tuple[int, ...]  # [L] 1 where input_ids[t] is a target, predicted from input_ids[:t]


@dataclass(frozen=True)
class TokenizedPair:
    """A DPO example: one prompt, two replies (each ends with the end-of-turn id unless truncated)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


TokenizedExample = TokenizedChat | TokenizedPair


@dataclass
class PreparedData:
    """The tokenized training and validation sets of a job, and the statistics of their preparation."""

    method: Method
    train: list[TokenizedExample]
    validation: list[TokenizedExample]  # may be empty (every held-out example was dropped)
    stats: dict[str, Any]  # plain values, for the job's first event (see prepare)


class ChatRenderer:
    """Chat template + tokenizer: messages -> ids of the text pieces that make up a training example."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template
        self.eos_ids = frozenset(tokenizer.special.eos_ids)

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool) -> str:
        special = self.tokenizer.special
        return render_chat_template(self.template, [{"role": m.role, "content": m.content} for m in messages],
                                    add_generation_prompt=add_generation_prompt, bos_token=special.bos_token,
                                    eos_token=special.eos_token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False) if text else []

    def reply_mask(self, ids: list[int]) -> list[int]:
        """1 for reply tokens up to and including its last end-of-turn id; 0 for what follows it."""
        last = max((i for i, t in enumerate(ids) if t in self.eos_ids), default=len(ids) - 1)
        return [1 if i <= last else 0 for i in range(len(ids))]

    def chat(self, example: SupervisedExample) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole chat, assistant turns with weight 1 learned."""
        messages = list(example.messages)
        full = self.render(messages, add_generation_prompt=False)
        ids: list[int] = []
        mask: list[int] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            start = len(self._prefix(messages[:i], full, example.line, add_generation_prompt=True))
            end = len(self._prefix(messages[: i + 1], full, example.line, add_generation_prompt=False))
            context = self.encode(full[cursor:start])
            reply = self.encode(full[start:end])
            ids += context + reply
            mask += [0] * len(context) + (self.reply_mask(reply) if m.weight else [0] * len(reply))
            cursor = end
        tail = self.encode(full[cursor:])
        return ids + tail, mask + [0] * len(tail)

    def pair(self, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen ids, rejected ids); replies end at their end-of-turn id."""
        prompt = list(example.prompt)
        prompt_text = self.render(prompt, add_generation_prompt=True)
        replies = []
        for content in (example.chosen, example.rejected):
            full = self.render(prompt + [ChatMessage("assistant", content)], add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise self._not_incremental(example.line)
            reply = self.encode(full[len(prompt_text):])
            replies.append([t for t, keep in zip(reply, self.reply_mask(reply), strict=True) if keep])
        return self.encode(prompt_text), replies[0], replies[1]

    def _prefix(self, messages: list[ChatMessage], full: str, line: int, *, add_generation_prompt: bool) -> str:
        text = self.render(messages, add_generation_prompt=add_generation_prompt) if messages else ""
        if not full.startswith(text):
            raise self._not_incremental(line)
        return text

    @staticmethod
    def _not_incremental(line: int) -> TrainingFileError:
        return TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE,
                                 "the model's chat template does not render this conversation turn by turn "
                                 "(a shorter chat is not a prefix of the longer one)", line)


def split_validation(examples: list, seed: int, fraction: float = VALIDATION_FRACTION) -> tuple[list, list]:
    """(train, validation): max(1, round(fraction * n)) examples (at most MAX_SPLIT_VALIDATION) held out,
    drawn with random.Random(seed); both keep file order."""
    n = len(examples)
    k = min(max(1, round(fraction * n)), MAX_SPLIT_VALIDATION, n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def tokenize_chat(renderer: ChatRenderer, example: SupervisedExample, max_length: int) -> tuple[TokenizedChat | None,
                                                                                                 bool]:
    """(the chat cut to max_length tokens, whether it was cut); None when no target token survives the cut."""
    ids, mask = renderer.chat(example)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):  # position 0 predicts nothing
        return None, truncated
    return TokenizedChat(tuple(ids), tuple(mask)), truncated


def tokenize_pair(renderer: ChatRenderer, example: PreferenceExample, max_length: int) -> tuple[TokenizedPair,
                                                                                                  bool]:
    """(the pair fitted to max_length per sequence, whether it was cut).

    Replies keep their start: each is cut to max(max_length - prompt, max_length // 2) tokens; the
    prompt then keeps its end (the question right before the reply) to fit beside the longer reply.
    """
    prompt, chosen, rejected = renderer.pair(example)
    reply_cap = max(max_length - len(prompt), max_length // 2)
    chosen_cut, rejected_cut = chosen[:reply_cap], rejected[:reply_cap]
    prompt_cap = max_length - max(len(chosen_cut), len(rejected_cut))
    prompt_cut = prompt[-prompt_cap:]
    truncated = (len(prompt_cut), len(chosen_cut), len(rejected_cut)) != (len(prompt), len(chosen), len(rejected))
    return TokenizedPair(tuple(prompt_cut), tuple(chosen_cut), tuple(rejected_cut)), truncated


def prepare(train: TrainingFile, tokenizer: Tokenizer, chat_template: str, *, validation: TrainingFile | None = None,
            max_length: int = 2048, seed: int = 0) -> PreparedData:
    """Tokenized train/validation sets; without a validation file, split_validation(train, seed) is used.

    stats: train_examples, validation_examples, validation_source ("file" | "split"), duplicates_dropped,
    empty_turns_dropped, truncated, dropped_no_target (chats whose every target was cut), max_length,
    train_tokens (tokens run per epoch: a DPO prompt counts twice), train_target_tokens (SFT: tokens
    with loss), mean_tokens and max_tokens (per sequence).
    """
    if validation is not None and validation.method is not train.method:
        raise TrainingFileError(TrainingFileErrorCode.FORMAT_MISMATCH,
                                f"the validation file holds {validation.method.value} examples but the training "
                                f"file holds {train.method.value} examples")
    renderer = ChatRenderer(tokenizer, chat_template)
    if validation is None:
        train_examples, validation_examples = split_validation(train.examples, seed)
    else:
        train_examples, validation_examples = train.examples, validation.examples
    truncated = dropped = 0

    def tokenize(examples: list) -> list[TokenizedExample]:
        nonlocal truncated, dropped
        out: list[TokenizedExample] = []
        for example in examples:
            if train.method is Method.SUPERVISED:
                tokenized, cut = tokenize_chat(renderer, example, max_length)
            else:
                tokenized, cut = tokenize_pair(renderer, example, max_length)
            truncated += cut
            if tokenized is None:
                dropped += 1
            else:
                out.append(tokenized)
        return out

    train_set, validation_set = tokenize(train_examples), tokenize(validation_examples)
    if not train_set:
        raise TrainingFileError(TrainingFileErrorCode.MISSING_ASSISTANT_TURN,
                                f"no example keeps an assistant token within max_length={max_length}")
    lengths = [n for e in train_set for n in sequence_lengths(e)]
    stats: dict[str, Any] = {
        "train_examples": len(train_set), "validation_examples": len(validation_set),
        "validation_source": "split" if validation is None else "file",
        "duplicates_dropped": train.duplicates_dropped + (validation.duplicates_dropped if validation else 0),
        "empty_turns_dropped": train.empty_turns_dropped + (validation.empty_turns_dropped if validation else 0),
        "truncated": truncated, "dropped_no_target": dropped, "max_length": max_length,
        "train_tokens": sum(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "max_tokens": max(lengths),
    }
    if train.method is Method.SUPERVISED:
        stats["train_target_tokens"] = sum(sum(e.loss_mask[1:]) for e in train_set)
    return PreparedData(method=train.method, train=train_set, validation=validation_set, stats=stats)


def sequence_lengths(example: TokenizedExample) -> list[int]:
    """Tokens of each sequence the trainer runs for an example (a DPO pair runs prompt + each reply)."""
    if isinstance(example, TokenizedChat):
        return [len(example.input_ids)]
    return [len(example.prompt_ids) + len(example.chosen_ids), len(example.prompt_ids) + len(example.rejected_ids)]
