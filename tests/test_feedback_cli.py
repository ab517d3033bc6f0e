"""`genq feedback`: a batch's input and output files and a ratings CSV -> a fine-tune file, offline."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from genq.cli import app

CHAT = "/v1/chat/completions"
COLOR, SUM, TRANSLATE = "Name a primary color.", "What is 2+2?", "Translate 'chat'."


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def answer(custom_id: str, text: str) -> dict:
    body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": "stop"}]}
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{custom_id}", "body": body}, "error": None}


def write_jsonl(path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def batch_files(tmp_path):
    """A batch's input and output files (output order is not input order; e failed, so it has no line)."""
    questions = {"a": COLOR, "b": COLOR, "c": SUM, "d": "Say hi.", "e": TRANSLATE, "f": COLOR}
    write_jsonl(tmp_path / "in.jsonl", [{"custom_id": cid, "method": "POST", "url": CHAT,
                                         "body": {"model": "m", "messages": messages(q)}}
                                        for cid, q in questions.items()])
    write_jsonl(tmp_path / "out.jsonl", [answer("f", "Green."), answer("c", "5"), answer("a", "Blue."),
                                         answer("d", "Hi!"), answer("b", "I do not know.")])
    return tmp_path


def run(tmp_path, csv_text: str, *args: str):
    (tmp_path / "ratings.csv").write_text(csv_text, encoding="utf-8")
    return CliRunner().invoke(app, ["feedback", str(tmp_path / "out.jsonl"), "--input", str(tmp_path / "in.jsonl"),
                                    "--ratings", str(tmp_path / "ratings.csv"), "-o", str(tmp_path / "ft.jsonl"),
                                    *args])


RATINGS_CSV = ("\ufeffcustom_id,rating,corrected,comment\n"  # a spreadsheet's byte-order mark
               "a,good,,\n"
               "b,bad,,unhelpful\n"
               "c,1,\"4\",\n"
               "d,3,,\n"
               "e,bad,cat,\n"
               "f,4,,\n")


def test_dpo_round_trip(batch_files) -> None:
    result = run(batch_files, RATINGS_CSV)
    assert result.exit_code == 0, result.output
    assert [json.loads(x) for x in (batch_files / "ft.jsonl").read_text().splitlines()] == [
        {"input": {"messages": messages(COLOR)}, "preferred_output": assistant("Blue."),
         "non_preferred_output": assistant("I do not know.")},
        {"input": {"messages": messages(SUM)}, "preferred_output": assistant("4"),
         "non_preferred_output": assistant("5")},
    ]
    assert "2 dpo example(s) from 6 rating(s); 3 rated line(s) gave none" in result.output


def test_supervised_round_trip_with_a_multiline_correction_and_a_later_row(batch_files) -> None:
    csv_text = RATINGS_CSV + "a,bad,\"Red,\nor blue.\",changed my mind\n"  # replaces a's first row
    result = run(batch_files, csv_text, "--format", "supervised")
    assert result.exit_code == 0, result.output
    assert [json.loads(x) for x in (batch_files / "ft.jsonl").read_text().splitlines()] == [
        {"messages": [*messages(COLOR), *assistant("Red,\nor blue.")]},
        {"messages": [*messages(SUM), *assistant("4")]},
        {"messages": [*messages(TRANSLATE), *assistant("cat")]},
        {"messages": [*messages(COLOR), *assistant("Green.")]},
    ]


@pytest.mark.parametrize(("csv_text", "error"), [
    ("custom_id,rating,corrected\na,good,\nb,bad,\"multi\nline\"\nc,meh,\n",  # b's correction: lines 3-4
     "ratings.csv line 5: rating must be 'good', 'bad' or an integer from 1 to 5, not 'meh'"),
    ("custom_id,rating\na,good\n\nzzz,bad\n", "ratings.csv line 4: custom_id 'zzz' is not in the input file"),
    ("custom_id,rating\na,good\n,bad\n", "ratings.csv line 3: custom_id is empty"),
    ("custom_id,rating\na,6\n", "ratings.csv line 2: rating must be 'good', 'bad' or an integer from 1 to 5, not 6"),
    ("custom_id,rating,corrected\nc,bad,2+2 is 4, not 5\n",
     "ratings.csv line 2: 4 fields, but the header names 3 (quote a field that holds a comma)"),
    ("custom_id,score\na,good\n", "ratings.csv line 1: unknown column 'score'"),
    ("rating,corrected\ngood,x\n", "ratings.csv line 1: no 'custom_id' column"),
    ("\n\n", "ratings.csv: empty; the first line names the columns custom_id,rating,corrected,comment"),
])
def test_a_bad_csv_row_names_its_line(batch_files, csv_text, error) -> None:
    result = run(batch_files, csv_text)
    assert result.exit_code == 2
    assert error in " ".join(result.output.split()), result.output  # the console may wrap a long path
    assert not (batch_files / "ft.jsonl").exists()


def test_a_bad_jsonl_line_names_its_line(batch_files) -> None:
    (batch_files / "out.jsonl").write_text(json.dumps(answer("a", "Blue.")) + "\n{not json\n")
    result = run(batch_files, "custom_id,rating\na,good\n")
    assert result.exit_code == 2 and "out.jsonl line 2: not JSON" in result.output


def test_no_usable_pair_is_an_error_saying_why(batch_files) -> None:
    result = run(batch_files, "custom_id,rating\nd,3\n")
    assert result.exit_code == 2
    assert ("The ratings give no dpo training example: 1 rated line(s) without a correction and with no other "
            "rated line of the same messages.") in " ".join(result.output.split())
    assert not (batch_files / "ft.jsonl").exists()
