"""Catalog in, catalog out: rows rendered into batch lines (errors naming the row before anything is
written), per-row constraints, and results joined back (choices as columns or rows, JSON fields, errors)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genq.catalog import CatalogError, batch_file_from_csv, build_batch, join_results, read_catalog
from genq.cli import app

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"sku": "A1", "title": "Trail Sock", "material": "merino wool"},
        {"sku": "B2", "title": "Bottle", "material": "steel"},
        {"sku": "C3", "title": "Tote", "material": "canvas"}]


def ok_line(custom_id: str, *texts: str) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": {"choices": choices}}, "error": None}


def test_rows_become_chat_lines_with_per_row_constraints():
    lines = build_batch(ROWS, "Describe {{ title }} ({{ material }}).", system="Be brief.", custom_id_column="sku",
                        n=3, constraints={"max_words": 40, "required": ["{{ material }}"]},
                        body_extra={"temperature": 0.7})
    assert [line["custom_id"] for line in lines] == ["A1", "B2", "C3"]
    body = lines[0]["body"]
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Describe Trail Sock (merino wool)."}]
    assert body["n"] == 3 and body["temperature"] == 0.7
    assert body["constraints"] == {"max_words": 40, "required": ["merino wool"]}
    assert lines[2]["body"]["constraints"]["required"] == ["canvas"]


def test_a_missing_column_names_the_row_and_the_columns():
    with pytest.raises(CatalogError) as err:
        build_batch(ROWS, "{{ title }} in {{ materal }}", source="c.csv")
    assert err.value.row == 1 and "row 1 (line 2 of c.csv)" in str(err.value) and "'materal'" in str(err.value)
    assert "columns: sku, title, material" in str(err.value)


def test_duplicate_and_empty_ids_are_refused():
    with pytest.raises(CatalogError, match="row 2 .*'A1' repeats row 1"):
        build_batch([ROWS[0], {**ROWS[1], "sku": "A1"}], "{{ title }}", custom_id_column="sku")
    with pytest.raises(CatalogError, match="row 1 .*empty sku"):
        build_batch([{**ROWS[0], "sku": " "}], "{{ title }}", custom_id_column="sku")


def test_join_one_choice_errors_and_missing_results():
    errors = [{"custom_id": "B2", "response": {"status_code": 400, "body": {"error": {
        "message": "required: 'steel' missing", "code": "constraints_not_met"}}}, "error": None}]
    names, rows = join_results(ROWS, [ok_line("A1", "Soft merino socks.")], errors, custom_id_column="sku")
    assert names == ["sku", "title", "material", "generated", "error"]
    assert [r["generated"] for r in rows] == ["Soft merino socks.", "", ""]
    assert [r["error"] for r in rows] == ["", "required: 'steel' missing", "no result"]


def test_join_variants_as_columns_or_rows_and_json_fields():
    out = [ok_line("A1", "one", "two", "three"), ok_line("B2", json.dumps({"title": "B", "bullets": ["x", "y"]})),
           {"custom_id": "C3", "response": None, "error": {"code": "batch_expired", "message": "expired"}}]
    names, rows = join_results(ROWS, out, [], custom_id_column="sku")
    assert rows[0]["generated_1"] == "one" and rows[0]["generated_3"] == "three" and len(rows) == 3
    # numbered for every row once one has several choices: the CSV's columns do not depend on the row
    assert rows[1]["generated_1.title"] == "B" and rows[1]["generated_1.bullets"] == "x | y"
    assert names == ["sku", "title", "material", "generated_1", "generated_1.title", "generated_1.bullets",
                     "generated_2", "generated_3", "error"]
    assert rows[2]["error"] == "expired" and names[-1] == "error"
    _, by_row = join_results(ROWS, out, [], custom_id_column="sku", variants="rows")
    assert [(r["sku"], r["variant"]) for r in by_row[:3]] == [("A1", "1"), ("A1", "2"), ("A1", "3")]
    assert len(by_row) == 5


def test_cli_build_refuses_a_bad_template_before_writing(tmp_path):
    catalog = tmp_path / "c.csv"
    catalog.write_text("sku,title\nA1,Sock\nB2,Bottle\n")
    template = tmp_path / "t.j2"
    template.write_text("{{ title }} made of {{ material }}")
    out = tmp_path / "batch.jsonl"
    result = CliRunner().invoke(app, ["catalog", "build", str(catalog), "--template", str(template), "-o", str(out)])
    assert result.exit_code == 2 and "row 1" in result.output and "'material'" in result.output
    assert not out.exists()


def test_cli_build_then_join_on_the_sample_catalog(tmp_path):
    catalog = REPO / "examples/catalog_sample.csv"
    out = tmp_path / "batch.jsonl"
    result = CliRunner().invoke(app, [
        "catalog", "build", str(catalog), "--template", str(REPO / "examples/catalog_description.j2"),
        "--system", str(REPO / "examples/catalog_system.txt"), "--custom-id-column", "sku", "--n", "2",
        "--constraints", '{"min_words": 40, "max_words": 60, "banned": ["!"], "required": ["{{ material }}"]}',
        "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    rows = read_catalog(catalog)
    assert len(lines) == len(rows) == 300
    assert lines[0]["body"]["messages"][1]["content"].startswith("Product data:\nTitle: Cobalt Rain Jacket")
    assert lines[0]["body"]["constraints"]["required"] == ["3-layer Gore-Tex"]
    results = tmp_path / "batch.output.jsonl"
    results.write_text("".join(json.dumps(ok_line(x["custom_id"], "a", "b")) + "\n" for x in lines[:250]))
    enriched = tmp_path / "enriched.csv"
    result = CliRunner().invoke(app, ["catalog", "join", str(catalog), str(results), "--custom-id-column", "sku",
                                      "--column", "description", "-o", str(enriched)])
    assert result.exit_code == 0, result.output
    with enriched.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 300 and table[0]["description_2"] == "b" and table[299]["error"] == "no result"


def flat(text: str) -> str:
    return " ".join(text.split())  # the console may wrap a long path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_template_and_system_prompt_reproduce_the_demo_requests():
    demo = [json.loads(x) for x in (REPO / "examples/catalog_demo.jsonl").read_text().splitlines()]
    catalog = read_catalog(REPO / "examples/catalog_sample.csv")
    lines = build_batch(catalog[: len(demo)], (REPO / "examples/catalog_description.j2").read_text(),
                        system=(REPO / "examples/catalog_system.txt").read_text().strip())
    assert [line["body"]["messages"] for line in lines] == [d["body"]["messages"] for d in demo]


def test_rows_know_their_lines_across_quoted_newlines_and_blank_lines(tmp_path):
    catalog = read_catalog(write(tmp_path / "c.csv", "\ufeffsku, title ,features\n"
                                 "A1,Sock,\"warm;\nsoft\"\n\n"
                                 "B2,Bottle,light\n"))
    assert catalog == [{"sku": "A1", "title": "Sock", "features": "warm;\nsoft"},
                       {"sku": "B2", "title": "Bottle", "features": "light"}]
    assert catalog.lines == [2, 5] and catalog.columns == ["sku", "title", "features"]
    for template in ("{{ title }} in {{ materal }}", "{{ row.materal }}", "{{ row['materal'] }}",
                     "{% if materal %}x{% endif %}"):
        with pytest.raises(CatalogError) as err:
            build_batch(catalog, "{% if row.sku == 'B2' %}" + template + "{% endif %}")
        assert str(err.value) == ("row 2 (line 5 of c.csv): the template uses 'materal', which is not a column "
                                  "(columns: sku, title, features)") and err.value.row == 2
    # a template may test for a column it can do without
    lines = build_batch(catalog, "{{ title }}{% if material is defined %} in {{ material }}{% endif %}")
    assert lines[0]["body"]["messages"] == [{"role": "user", "content": "Sock"}]


@pytest.mark.parametrize(("text", "error"), [
    ("sku,title\nA1,Sock\nB2,Bottle,extra\n",
     "row 2 (line 3 of c.csv): 3 fields, but the header names 2 (quote a field that holds a comma)"),
    ("sku,title,sku\nA1,Sock,x\n", "c.csv line 1: the header names 'sku' twice"),
    ("sku,,title\n", "c.csv line 1: column 2 of the header has no name"),
    ("sku,title\n\n", "c.csv: no data rows"),
])
def test_a_bad_csv_names_its_line(tmp_path, text, error):
    with pytest.raises(CatalogError) as err:
        read_catalog(write(tmp_path / "c.csv", text))
    assert str(err.value).startswith(error)


def test_a_spreadsheet_saved_as_latin_1_is_named_as_not_utf8(tmp_path):
    (tmp_path / "c.csv").write_bytes("sku,title\nA1,Caf\xe9 mug\n".encode("latin-1"))
    with pytest.raises(CatalogError, match="c.csv: not UTF-8 text"):
        read_catalog(tmp_path / "c.csv")


def test_constraint_templates_render_per_row_and_a_blank_term_is_dropped():
    rows = [*ROWS, {"sku": "D4", "title": "Mug", "material": ""}]
    lines = build_batch(rows, "{{ title }}", constraints={"required": ["{{ material }}", "{{ title }}"],
                                                          "banned": ["!"], "max_words": 60})
    assert [line["body"]["constraints"]["required"] for line in lines] == [
        ["merino wool", "Trail Sock"], ["steel", "Bottle"], ["canvas", "Tote"], ["Mug"]]
    assert lines[3]["body"]["constraints"] == {"required": ["Mug"], "banned": ["!"], "max_words": 60}
    assert [line["custom_id"] for line in lines] == ["row-1", "row-2", "row-3", "row-4"]
    assert "n" not in lines[0]["body"] and "constraints" not in build_batch(ROWS, "x")[0]["body"]
    with pytest.raises(CatalogError, match=r"row 1 \(line 2 of the catalog\): constraints.required\[0\] uses "
                                           r"'colour', which is not a column"):
        build_batch(ROWS, "{{ title }}", constraints={"required": ["{{ colour }}"]})


def test_repeated_ids_name_both_rows_and_an_unknown_id_column_is_refused():
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "sku": " A1 "}]
    with pytest.raises(CatalogError) as err:
        build_batch(rows, "{{ title }}", custom_id_column="sku", source="c.csv")
    assert str(err.value) == "row 3 (line 4 of c.csv): sku 'A1' repeats row 1 (line 2 of c.csv)"
    with pytest.raises(CatalogError, match="there is no column 'id' for the custom ids"):
        build_batch(ROWS, "{{ title }}", custom_id_column="id")


def test_a_template_error_other_than_a_missing_column_names_the_row():
    with pytest.raises(CatalogError, match=r"row 1 .*: the template failed: .*"):
        build_batch(ROWS, "{{ title + 1 }}")
    with pytest.raises(CatalogError, match="the template does not compile: line 1"):
        build_batch(ROWS, "{{ title ")


def test_join_both_error_shapes_a_retry_that_succeeded_and_rows_mode_errors():
    output = [ok_line("A1", "Soft."),
              {"custom_id": "B2", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}}]
    errors = [{"custom_id": "A1", "response": None, "error": {"code": "batch_expired", "message": "expired"}},
              {"custom_id": "C3", "response": {"status_code": 400, "body": {"error": {
                  "message": "context too long", "code": "context_length_exceeded"}}}, "error": None}]
    _, rows = join_results(ROWS, output, errors, custom_id_column="sku", column="description")
    assert [(r["description"], r["error"]) for r in rows] == [("Soft.", ""), ("", "boom"), ("", "context too long")]
    names, rows = join_results(ROWS, output, [], custom_id_column="sku", variants="rows")
    assert names == ["sku", "title", "material", "variant", "generated", "error"]
    assert [(r["sku"], r["variant"], r["generated"], r["error"]) for r in rows] == [
        ("A1", "1", "Soft.", ""), ("B2", "", "", "boom"), ("C3", "", "", "no result")]


def test_json_fields_become_cells():
    text = json.dumps({"title": "Sock", "bullets": ["warm", 2], "price": 9.5, "new": True, "meta": {"a": 1}})
    _, rows = join_results(ROWS[:1], [ok_line("row-1", text)], [])
    assert {k: v for k, v in rows[0].items() if k.startswith("generated")} == {
        "generated.title": "Sock", "generated.bullets": "warm | 2", "generated.price": "9.5",
        "generated.new": "true", "generated.meta": '{"a": 1}'}


def test_join_refuses_ids_of_another_column_and_a_clashing_column_name():
    with pytest.raises(CatalogError, match="join with the custom-id column the batch was built with"):
        join_results(ROWS, [ok_line("A1", "x")], [])  # built with --custom-id-column sku, joined without
    with pytest.raises(CatalogError, match="the catalog already has a column 'title'"):
        join_results(ROWS, [ok_line("A1", "x")], [], custom_id_column="sku", column="title")


def test_batch_file_from_csv_writes_nothing_when_a_row_fails(tmp_path):
    catalog = write(tmp_path / "c.csv", "sku,title,material\nA1,Sock,wool\nB2,Bottle,\n")
    out = tmp_path / "b.jsonl"
    template = write(tmp_path / "t.j2", "{{ title }} in {{ material }}\n")
    assert batch_file_from_csv(catalog, template, out, custom_id_column="sku", n=2) == 2
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"custom_id": "A1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Sock in wool"}], "n": 2}}
    out.unlink()
    with pytest.raises(CatalogError, match="row 2"):
        batch_file_from_csv(catalog, write(tmp_path / "u.j2", "{{ title }}{% if row.sku == 'B2' %}{{ x }}"
                                                              "{% endif %}"), out)
    assert not out.exists()
    with pytest.raises(CatalogError, match="bad.j2 does not compile"):
        batch_file_from_csv(catalog, write(tmp_path / "bad.j2", "{% if %}"), out)


def test_cli_build_options_and_bad_json(tmp_path):
    catalog = write(tmp_path / "c.csv", "sku,title\nA1,Sock\n")
    template = write(tmp_path / "t.j2", "{{ title }}")
    out = tmp_path / "b.jsonl"
    base = ["catalog", "build", str(catalog), "--template", str(template), "-o", str(out)]
    result = CliRunner().invoke(app, [*base, "--model", "m", "--max-tokens", "64", "--temperature", "0.5",
                                      "--response-format", '{"type": "json_object"}'])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["body"] == {
        "model": "m", "messages": [{"role": "user", "content": "Sock"}], "max_tokens": 64, "temperature": 0.5,
        "response_format": {"type": "json_object"}}
    out.unlink()
    for option, value, error in (("--constraints", "{max_words: 3}", "--constraints is not JSON"),
                                 ("--constraints", "[1]", "--constraints must be a JSON object"),
                                 ("--response-format", "json", "--response-format is not JSON")):
        result = CliRunner().invoke(app, [*base, option, value])
        assert result.exit_code == 2 and error in flat(result.output) and not out.exists()
    result = CliRunner().invoke(app, [*base, "--constraints", '{"required": ["{{ colour }}"]}'])
    assert result.exit_code == 2 and "constraints.required[0] uses 'colour'" in flat(result.output)


def test_cli_join_finds_the_error_file_of_genq_run_and_names_a_bad_line(tmp_path):
    catalog = write(tmp_path / "c.csv", "sku,title\nA1,Sock\nB2,Bottle\nC3,Tote\n")
    results = write(tmp_path / "b.output.jsonl", json.dumps(ok_line("row-1", "Warm.")) + "\n"
                    + json.dumps(ok_line("row-9", "Stray.")) + "\n")
    write(tmp_path / "b.errors.jsonl", json.dumps({"custom_id": "row-2", "response": None, "error": {
        "code": "worker_failed", "message": "the worker failed"}}) + "\n")
    enriched = tmp_path / "out" / "e.csv"
    result = CliRunner().invoke(app, ["catalog", "join", str(catalog), str(results), "-o", str(enriched)])
    assert result.exit_code == 0, result.output
    assert "1 result line(s) name no row" in flat(result.output)
    with enriched.open(newline="") as f:
        assert list(csv.reader(f)) == [["sku", "title", "generated", "error"], ["A1", "Sock", "Warm.", ""],
                                       ["B2", "Bottle", "", "the worker failed"], ["C3", "Tote", "", "no result"]]
    write(results, json.dumps(ok_line("row-1", "Warm.")) + "\n{oops\n")
    result = CliRunner().invoke(app, ["catalog", "join", str(catalog), str(results), "-o", str(enriched)])
    assert result.exit_code == 2 and "b.output.jsonl line 2: not JSON" in flat(result.output)
