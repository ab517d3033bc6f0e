"""The catalog brief with and without genq's output controls, through `genq run`, side by side.

    python bench/catalog_controls.py [--limit 300]

Builds one batch per configuration from examples/catalog_sample.csv with the demo's brief (the system
prompt of examples/catalog_demo.jsonl, temperature 0.7, top_p 0.9), runs each with `genq run` in a
fresh home, and scores every output with bench/brief_score.py:

    plain       the brief in the prompt only (max_tokens 96, the demo's)
    limits      + constraints {min_words 40, max_words 60, banned ["!", "\\n"]} (max_tokens 120)
    brief       + required: [the row's material], the whole brief as controls

It prints the share obeying each rule and the whole brief, hard-limit violations (must be 0), the
candidates per line, and output tokens/s (every candidate's tokens over the run's wall time, model
load included); the last line reads `brief_compliance=... plain_compliance=... limits_tok_s_ratio=...`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.brief_score import RULES, score  # noqa: E402

USER = ("Product data:\nTitle: {title}\nBrand: {brand}\nCategory: {category}\nMaterial: {material}\n"
        "Variant: {variant}\nColor: {color}\nPrice: ${price_usd}\nFeatures: {features}\n\nWrite the description.")


def lines_for(rows: list[dict], system: str, config: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        body = {"model": "smollm2-135m-instruct", "temperature": 0.7, "top_p": 0.9, "seed": i, "max_tokens": 96,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": USER.format(**row)}]}
        if config != "plain":
            body["max_tokens"] = 120
            body["constraints"] = {"min_words": 40, "max_words": 60, "banned": ["!", "\n"]}
        if config == "brief":
            body["constraints"]["required"] = [row["material"]]
        out.append({"custom_id": row["sku"], "method": "POST", "url": "/v1/chat/completions", "body": body})
    return out


def run(config: str, lines: list[dict], rows: list[dict], workdir: Path) -> dict:
    src = workdir / f"{config}.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = workdir / f"{config}.output.jsonl"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "genq.cli", "run", str(src), "-o", str(out), "--home",
                    str(workdir / f"home-{config}")], check=True, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"},
                   stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    results = {}
    for raw in out.read_text().splitlines():
        line = json.loads(raw)
        body = line["response"]["body"]
        results[line["custom_id"]] = (body["choices"][0]["message"]["content"], body["usage"])
    errors = out.with_name(out.name.removesuffix(".output.jsonl") + ".errors.jsonl")
    failed = len(errors.read_text().splitlines()) if errors.exists() else 0
    tokens = sum(u["completion_tokens"] for _, u in results.values())
    per_rule = {rule: 0 for rule in RULES}
    whole = limit_breaks = 0
    for row in rows:
        text = results.get(row["sku"], ("", {}))[0]
        s = score(text, row["material"])
        for rule in RULES:
            per_rule[rule] += s[rule]
        whole += all(s.values())
        if config != "plain" and row["sku"] in results:
            limit_breaks += not (s["length"] and s["no_bang"] and s["paragraph"])
    n = len(rows)
    return {"config": config, "obeys": whole / n, **{r: per_rule[r] / n for r in RULES}, "failed": failed,
            "limit_breaks": limit_breaks, "candidates": sum(u.get("candidates", 1) for _, u in results.values())
            / max(1, len(results)), "tok_s": tokens / wall, "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--configs", default="plain,limits,brief", help="a subset, in this order")
    args = parser.parse_args()
    configs = args.configs.split(",")
    with (ROOT / "examples/catalog_sample.csv").open() as f:
        rows = list(csv.DictReader(f))[: args.limit]
    system = json.loads((ROOT / "examples/catalog_demo.jsonl").read_text().splitlines()[0])["body"]["messages"][0][
        "content"]
    with tempfile.TemporaryDirectory() as tmp:
        table = [run(config, lines_for(rows, system, config), rows, Path(tmp)) for config in configs]
    head = f"{'config':8} {'obeys':>6} " + " ".join(f"{r:>9}" for r in RULES) + \
        f" {'failed':>6} {'limit_breaks':>12} {'cand/line':>9} {'tok/s':>7} {'wall s':>7}"
    print(f"{len(rows)} products of examples/catalog_sample.csv, the demo's brief")
    print(head)
    for r in table:
        print(f"{r['config']:8} {r['obeys']:6.1%} " + " ".join(f"{r[x]:9.1%}" for x in RULES) +
              f" {r['failed']:6d} {r['limit_breaks']:12d} {r['candidates']:9.2f} {r['tok_s']:7.1f} {r['wall']:7.1f}")
    by = {r["config"]: r for r in table}
    summary = [f"{c}_compliance={by[c]['obeys']:.3f}" for c in configs]
    if "plain" in by:
        summary += [f"{c}_tok_s_ratio={by[c]['tok_s'] / by['plain']['tok_s']:.3f}" for c in configs if c != "plain"]
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
