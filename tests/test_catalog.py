"""Catalog in, catalog out: rows rendered into batch lines (errors naming the row before anything is
written), per-row constraints, and results joined back (choices as columns or rows, JSON fields, errors)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genq.catalog import CatalogError, build_batch, join_results, read_catalog
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
    assert rows[1]["generated.title"] == "B" and rows[1]["generated.bullets"] == "x | y"
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
