"""JSON-schema output, n variants and ad-channel presets on the catalog, through `genq run`.

    python bench/catalog_formats.py [--json 200] [--variants 32] [--headlines 500]

    json        --json products, response_format json_schema with 4 required fields (title, headline
                under 40 characters, description, bullets: 3 strings): how many outputs parse and validate
    variants    --variants products with n 8 (temperature 0.9): distinct choices per request, the
                same choices again from the same seeds, and the engine's prefix-cache hit rate (the
                prompt is computed once for a request's 8 choices: at most 7/8 of its tokens come from
                cache, less the last partial block that each choice computes)
    headlines   --headlines headlines with constraints.preset google_ads_headline (30 characters):
                how many are at most 30 characters, and how many were cut mid-word (against the same
                lines run without the preset)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "headline", "description", "bullets"],
          "properties": {"title": {"type": "string", "maxLength": 80},
                         "headline": {"type": "string", "maxLength": 39},
                         "description": {"type": "string", "maxLength": 300},
                         "bullets": {"type": "array", "minItems": 3, "maxItems": 3,
                                     "items": {"type": "string", "maxLength": 80}}}}


def product(row: dict) -> str:
    return (f"Title: {row['title']}\nBrand: {row['brand']}\nCategory: {row['category']}\nMaterial: {row['material']}\n"
            f"Color: {row['color']}\nFeatures: {row['features']}")


def line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}}


def genq_run(name: str, lines: list[dict], workdir: Path) -> tuple[dict[str, dict], dict[str, dict], float, str]:
    src = workdir / f"{name}.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = workdir / f"{name}.output.jsonl"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "genq.cli", "run", str(src), "-o", str(out), "--home",
                           str(workdir / f"home-{name}")], cwd=ROOT, env={**os.environ, "NO_COLOR": "1",
                                                                         "COLUMNS": "200"},
                          capture_output=True, text=True, check=True)
    wall = time.monotonic() - started
    if not out.exists():
        raise SystemExit(f"{name}: genq run wrote no output file\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ok = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    errors_path = out.with_name(out.name.removesuffix(".output.jsonl") + ".errors.jsonl")
    errors = {x["custom_id"]: x for x in map(json.loads, errors_path.read_text().splitlines())} \
        if errors_path.exists() else {}
    return ok, errors, wall, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=int, default=200)
    parser.add_argument("--variants", type=int, default=32)
    parser.add_argument("--headlines", type=int, default=500)
    args = parser.parse_args()
    with (ROOT / "examples/catalog_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        valid = 0
        # JSON schema
        ask = "Write the product's listing as JSON with a "
        lines = [] if not args.json else [line(f"j{i}", f"{product(rows[i % len(rows)])}\n\n{ask}"
                 "title, a short headline, a description and three bullets.", max_tokens=400, temperature=0.7,
                 seed=i, response_format={"type": "json_schema", "json_schema": {"name": "listing",
                                                                                  "schema": SCHEMA}})
                 for i in range(args.json)]
        ok, errors, wall, log = genq_run("json", lines, work) if lines else ({}, {}, 0.0, "")
        print(log[-600:]) if os.environ.get("BENCH_VERBOSE") else None
        for x in ok.values():
            try:
                jsonschema.validate(json.loads(x["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        print(f"json: {valid}/{args.json} outputs valid against the schema ({len(errors)} error lines, "
              f"{sum(x['response']['body']['usage'].get('candidates', 1) for x in ok.values()) / max(1, len(ok)):.2f} "
              f"candidates per line, {wall:.0f} s)")
        # Variants
        lines = [line(f"v{i}", f"{product(rows[i])}\n\nWrite a one-sentence ad for this product.", n=8,
                      temperature=0.9, seed=i, max_tokens=48) for i in range(args.variants)]
        runs = [genq_run(f"variants{k}", lines, work) for k in range(2)] if lines else [({}, {}, 0.0, "")] * 2
        choices = [{cid: [c["message"]["content"] for c in x["response"]["body"]["choices"]] for cid, x in r[0].items()}
                   for r in runs]
        distinct = [len(set(v)) for v in choices[0].values()]
        hits = re.search(r"prefix cache: ([\d.]+%)", runs[0][3])
        print(f"variants: {len(choices[0])}/{args.variants} lines, {sum(d == 8 for d in distinct)} with 8 distinct "
              f"choices (min {min(distinct, default=0)}), same choices from the same seeds: "
              f"{choices[0] == choices[1]}; prefix cache hits {hits.group(1) if hits else 'n/a'} of prompt tokens "
              f"({runs[0][2]:.0f} s)")
        # Headlines
        lines = [line(f"h{i}", f"{product(rows[i % len(rows)])}\n\nWrite a Google Ads headline for this product.",
                      temperature=0.8, seed=i, max_tokens=24, constraints={"preset": "google_ads_headline"})
                 for i in range(args.headlines)]
        ok, errors, wall, _ = genq_run("headlines", lines, work) if lines else ({}, {}, 0.0, "")
        # The same lines without the preset: up to the limit, the same tokens (same seed, no other
        # control; bf16 logits can differ with the batch, so a few twins diverge), so each headline
        # must be a prefix of its twin that ends where a word ends.
        for x in lines:
            del x["body"]["constraints"]
        twins, _, _, _ = genq_run("headlines_plain", lines, work) if lines else ({}, {}, 0.0, "")
        texts = {cid: x["response"]["body"]["choices"][0]["message"]["content"] for cid, x in ok.items()}
        over = sum(len(t) > 30 for t in texts.values())
        mean = sum(map(len, texts.values())) / max(1, len(texts))
        first_try = [cid for cid, x in ok.items() if x["response"]["body"]["usage"].get("candidates", 1) == 1]
        mid_word = diverged = 0
        for cid in first_try:
            text, twin = texts[cid], twins[cid]["response"]["body"]["choices"][0]["message"]["content"].strip()
            if not twin.startswith(text):  # bf16 logits vary with the batch: the twin took another token
                diverged += 1
            elif len(twin) > len(text) and twin[len(text)].isalnum() and text[-1:].isalnum():
                mid_word += 1
                print(f"  cut mid-word: {cid}: {text!r} of {twin!r}")
        print(f"headlines: {len(texts)}/{args.headlines} written ({len(errors)} error lines), {over} over 30 "
              f"characters, longest {max(map(len, texts.values()), default=0)}, mean {mean:.1f}; "
              f"{mid_word} of the {len(first_try)} first candidates cut mid-word ({diverged} not comparable: their "
              f"twin diverged before the cut) ({wall:.0f} s)")
        print(f"json_valid={valid}/{args.json} headlines_over_30={over} headlines_cut_mid_word={mid_word} "
              f"variants_all_distinct="
              f"{sum(d == 8 for d in distinct)}/{len(distinct)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
