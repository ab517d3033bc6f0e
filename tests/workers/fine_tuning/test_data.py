"""The training-file contract (every refusal with its code and line) and tokenization with loss masks."""

from __future__ import annotations

import json

import pytest

from tests.workers.fine_tuning.conftest import chat_lines, pair_lines
from workers.fine_tuning.data import (
    Method,
    PreferenceExample,
    TrainingFileError,
    TrainingFileErrorCode,
    check_example,
    check_validation_format,
    detect_file_format,
    read_training_file,
    validate_training_file,
)
from workers.fine_tuning.prepare import prepare, split_validation

Code = TrainingFileErrorCode
SYSTEM = {"role": "system", "content": "greet"}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def chat(*messages: dict, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


def pair(messages: list[dict], preferred, non_preferred, *, keys=("preferred_output", "non_preferred_output")) -> str:
    return json.dumps({"input": {"messages": messages}, keys[0]: preferred, keys[1]: non_preferred})


BAD_SUPERVISED = {
    "not json": ("{\"messages\": [", Code.INVALID_TRAINING_FILE, "not valid JSON"),
    "not an object": ("[1, 2]", Code.INVALID_TRAINING_FILE, "JSON object"),
    "no messages": (json.dumps({"prompt": "a", "completion": "b"}), Code.INVALID_TRAINING_FILE, "missing \"messages\""),
    "empty messages": (chat(), Code.INVALID_TRAINING_FILE, "non-empty array"),
    "message not an object": (json.dumps({"messages": ["hi"]}), Code.INVALID_TRAINING_FILE, "messages[0] must be"),
    "tool role": (chat(USER, {"role": "tool", "content": "42"}, ASSISTANT), Code.INVALID_TRAINING_FILE,
                  "messages[1].role 'tool'"),
    "tool calls": (chat(USER, {"role": "assistant", "content": "", "tool_calls": []}), Code.INVALID_TRAINING_FILE,
                   "tool and function calls"),
    "tools list": (chat(USER, ASSISTANT, tools=[{"type": "function"}]), Code.INVALID_TRAINING_FILE, "'tools'"),
    "content not a string": (chat(USER, {"role": "assistant", "content": None}), Code.INVALID_TRAINING_FILE,
                             "messages[1].content must be a string"),
    "weight on user": (chat({**USER, "weight": 1}, ASSISTANT), Code.INVALID_TRAINING_FILE, "only allowed on assistant"),
    "weight 2": (chat(USER, {**ASSISTANT, "weight": 2}), Code.INVALID_TRAINING_FILE, "weight must be 0 or 1"),
    "weight true": (chat(USER, {**ASSISTANT, "weight": True}), Code.INVALID_TRAINING_FILE, "weight must be 0 or 1"),
    "no assistant": (chat(SYSTEM, USER), Code.MISSING_ASSISTANT_TURN, "no non-empty assistant"),
    "assistant weight 0 only": (chat(USER, {**ASSISTANT, "weight": 0}), Code.MISSING_ASSISTANT_TURN, "weight 1"),
    "assistant empty": (chat(USER, {"role": "assistant", "content": " \n "}), Code.MISSING_ASSISTANT_TURN,
                        "no non-empty assistant"),
    "a DPO line": (pair([USER], [ASSISTANT], [{"role": "assistant", "content": "no"}]), Code.INVALID_TRAINING_FILE,
                   "this is a DPO example"),
}

NO = {"role": "assistant", "content": "no"}
BAD_DPO = {
    "not json": ("{", Code.INVALID_TRAINING_FILE, "not valid JSON"),
    "a chat line": (chat(USER, ASSISTANT), Code.INVALID_DPO_LINE, "this is a supervised chat example"),
    "input not an object": (json.dumps({"input": [], "preferred_output": [ASSISTANT], "non_preferred_output": [NO]}),
                            Code.INVALID_DPO_LINE, "\"input\" must be an object"),
    "prompt ends with assistant": (pair([USER, ASSISTANT], [ASSISTANT], [NO]), Code.INVALID_DPO_LINE,
                                   "must end with a non-empty user message"),
    "no non-preferred": (json.dumps({"input": {"messages": [USER]}, "preferred_output": [ASSISTANT]}),
                         Code.INVALID_DPO_LINE, "missing \"non_preferred_output\""),
    "two preferred": (pair([USER], [ASSISTANT, ASSISTANT], [NO]), Code.INVALID_DPO_LINE, "exactly one"),
    "preferred by user": (pair([USER], [USER], [NO]), Code.INVALID_DPO_LINE, "role \"assistant\""),
    "empty preferred": (pair([USER], [{"role": "assistant", "content": "  "}], [NO]), Code.INVALID_DPO_LINE,
                        "non-empty string"),
    "identical outputs": (pair([USER], [ASSISTANT], [ASSISTANT]), Code.INVALID_DPO_LINE, "identical"),
    "tool role in input": (pair([{"role": "tool", "content": "x"}, USER], [ASSISTANT], [NO]), Code.INVALID_DPO_LINE,
                           "input.messages[0].role 'tool'"),
}


@pytest.mark.parametrize("case", list(BAD_SUPERVISED))
def test_supervised_refusals_name_code_and_line(case):
    bad, code, fragment = BAD_SUPERVISED[case]
    lines = chat_lines(12)
    lines.insert(3, bad)  # line 4
    with pytest.raises(TrainingFileError) as e:
        read_training_file(lines, Method.SUPERVISED)
    assert e.value.code is code and e.value.line == 4
    assert e.value.message.startswith("line 4: ") and fragment in e.value.message, e.value.message


@pytest.mark.parametrize("case", list(BAD_DPO))
def test_dpo_refusals_name_code_and_line(case):
    bad, code, fragment = BAD_DPO[case]
    lines = pair_lines(12)
    lines.insert(3, bad)
    with pytest.raises(TrainingFileError) as e:
        read_training_file(lines, Method.DPO)
    assert e.value.code is code and e.value.line == 4
    assert e.value.message.startswith("line 4: ") and fragment in e.value.message, e.value.message


def test_invalid_utf8_is_refused_with_its_line():
    lines = [line.encode() for line in chat_lines(12)]
    lines[6] = b"{\"messages\": \"\xff\"}"
    with pytest.raises(TrainingFileError) as e:
        read_training_file(lines, "supervised")
    assert e.value.code is Code.INVALID_TRAINING_FILE and e.value.line == 7 and "UTF-8" in e.value.message


def test_too_few_examples_counts_distinct_ones():
    with pytest.raises(TrainingFileError) as e:
        read_training_file(chat_lines(9), Method.SUPERVISED)
    assert e.value.code is Code.TOO_FEW_EXAMPLES and e.value.line is None
    lines = chat_lines(8) + chat_lines(3)  # 11 lines, 3 of them repeats
    with pytest.raises(TrainingFileError) as e:
        read_training_file(lines, Method.SUPERVISED)
    assert "8 distinct examples (3 duplicates dropped)" in e.value.message
    assert len(read_training_file(chat_lines(3), Method.SUPERVISED, min_examples=1).examples) == 3


def test_normalisation_nfc_strip_empty_turns_and_duplicates():
    decomposed = "Cafe\u0301"  # e + combining acute
    lines = chat_lines(10) + [
        chat({"role": "system", "content": "   "}, {"role": "user", "content": f"  {decomposed} \n"},
             {"role": "assistant", "content": "ok"}),
        chat({"role": "user", "content": "Caf\u00e9"}, {"role": "assistant", "content": " ok "}),  # same after NFC
        "",  # blank lines are skipped, not examples
    ]
    training = read_training_file(lines, Method.SUPERVISED)
    assert training.lines == 12 and len(training.examples) == 11
    assert training.empty_turns_dropped == 1 and training.duplicates_dropped == 1
    last = training.examples[-1]
    assert [m.role for m in last.messages] == ["user", "assistant"] and last.messages[0].content == "Caf\u00e9"
    assert last.line == 11
    assert len(validate_training_file(lines, "supervised")) == 11


def test_dpo_accepts_both_spellings_of_the_outputs():
    lines = pair_lines(10) + [pair([USER], [ASSISTANT], [NO], keys=("preferred_completion",
                                                                     "non_preferred_completion"))]
    examples = validate_training_file(lines, Method.DPO)
    assert examples[-1] == PreferenceExample(prompt=examples[-1].prompt, chosen="hello", rejected="no", line=11)
    assert check_example(json.loads(lines[0]), "dpo").chosen == "yes 0"


def test_format_detection_and_validation_file_mismatch():
    assert detect_file_format(["", chat_lines(1)[0]]) is Method.SUPERVISED
    assert detect_file_format(pair_lines(1)) is Method.DPO
    with pytest.raises(TrainingFileError) as e:
        detect_file_format([json.dumps({"prompt": "a", "completion": "b"})])
    assert e.value.code is Code.INVALID_TRAINING_FILE and e.value.line == 1
    check_validation_format("supervised", chat_lines(2))
    with pytest.raises(TrainingFileError) as e:
        check_validation_format(Method.SUPERVISED, pair_lines(2))
    assert e.value.code is Code.FORMAT_MISMATCH


# ---------------------------------------------------------------- tokenization


def test_loss_mask_covers_assistant_replies_and_their_end_token(tiny_lm):
    lines = chat_lines(10) + [chat(SYSTEM, USER, {"role": "assistant", "content": "skip me", "weight": 0},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "learn me"})]
    data = prepare(read_training_file(lines, Method.SUPERVISED), tiny_lm.tokenizer, tiny_lm.chat_template,
                   max_length=128, seed=0)
    data_all = data.train + data.validation
    tok = tiny_lm.tokenizer
    for example in data_all:
        assert len(example.input_ids) == len(example.loss_mask)
    [multi] = [e for e in data_all if "learn me" in tok.decode(list(e.input_ids))]
    learned = [t for t, m in zip(multi.input_ids, multi.loss_mask, strict=True) if m]
    assert tok.decode(learned) == "learn me" and learned[-1] in tok.special.eos_ids  # <|im_end|>, not the "\n"
    text = tok.decode(list(multi.input_ids))
    assert "skip me" in text  # weight 0: kept as context, not learned
    # The prompt before a reply is tokenized as at inference (render_chat with the generation prompt).
    prompt_ids = tiny_lm.render_chat([{"role": "system", "content": "greet"}, {"role": "user", "content": "hi"}])
    assert list(multi.input_ids[: len(prompt_ids)]) == prompt_ids


def test_truncation_is_counted_and_chats_without_targets_are_dropped(tiny_lm):
    training = read_training_file(chat_lines(12), Method.SUPERVISED)
    full = prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=256, seed=0)
    longest = full.stats["max_tokens"]
    cut = prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=longest - 2, seed=0)
    assert cut.stats["truncated"] >= 1 and max(len(e.input_ids) for e in cut.train) <= longest - 2
    # Cut right after the shortest prompt's first reply token: chats with longer prompts lose every target.
    first_target = min(e.loss_mask.index(1) for e in full.train + full.validation)
    some_left = prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=first_target + 1, seed=0)
    assert 0 < some_left.stats["dropped_no_target"] < some_left.stats["truncated"] == 12
    assert all(sum(e.loss_mask) == 1 for e in some_left.train)
    with pytest.raises(TrainingFileError) as e:
        prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=8, seed=0)
    assert e.value.code is Code.MISSING_ASSISTANT_TURN


def test_validation_split_is_deterministic_by_seed():
    examples = list(range(240))
    train, valid = split_validation(examples, seed=7)
    assert len(valid) == 24 and sorted(train + valid) == examples and train == sorted(train)
    assert split_validation(examples, seed=7) == (train, valid)
    assert split_validation(examples, seed=8)[1] != valid
    assert len(split_validation(list(range(10)), seed=0)[1]) == 1


def test_prepare_stats_and_validation_file(tiny_lm):
    training = read_training_file(chat_lines(16), Method.SUPERVISED)
    validation = read_training_file(chat_lines(3), Method.SUPERVISED, min_examples=1)
    data = prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, validation=validation, max_length=64)
    s = data.stats
    assert (s["train_examples"], s["validation_examples"], s["validation_source"]) == (16, 3, "file")
    assert s["train_tokens"] == sum(len(e.input_ids) for e in data.train)
    assert s["train_target_tokens"] == sum(sum(e.loss_mask) for e in data.train)
    assert s["max_tokens"] == max(len(e.input_ids) for e in data.train)
    with pytest.raises(TrainingFileError) as e:
        prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template,
                validation=read_training_file(pair_lines(10), Method.DPO))
    assert e.value.code is Code.FORMAT_MISMATCH


def test_dpo_pairs_tokenize_prompt_and_replies(tiny_pairs, tiny_lm):
    tok = tiny_lm.tokenizer
    example = tiny_pairs.train[0]
    # the generation prompt closes the prompt; control tokens decode to nothing
    assert tok.decode(list(example.prompt_ids)) == "user\nok Ada?\nassistant\n"
    assert example.prompt_ids == tuple(tiny_lm.render_chat([{"role": "user", "content": "ok Ada?"}]))
    assert example.chosen_ids[-1] in tok.special.eos_ids and example.rejected_ids[-1] in tok.special.eos_ids
    assert tok.decode(list(example.chosen_ids)).startswith("yes")
    assert tiny_pairs.stats["train_tokens"] == sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                                                   for e in tiny_pairs.train)
