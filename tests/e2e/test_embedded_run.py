"""`genq run` as a user runs it: no servers; a bad file exits 2 naming the line; Ctrl-C keeps what
finished and reports the rest as batch_cancelled. Uses the tiny random model (fast on a CPU)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.e2e.conftest import REPO, TINY, genq, write_jsonl

pytestmark = pytest.mark.slow


def embedded_env(models_file, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    return {**env, "GENQ_MODELS_FILE": str(models_file), "GENQ_DEVICE": "cpu", **extra}


def lines(n: int, max_tokens: int = 5) -> list[dict]:
    return [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": TINY, "messages": [{"role": "user", "content": f"say {i}"}], "temperature": 0,
                      "max_tokens": max_tokens}} for i in range(n)]


def test_invalid_file_exits_2_with_the_line(tiny_models_file, tmp_path):
    bad = lines(3)
    bad[1]["body"]["temperature"] = 5
    done = subprocess.run(genq("run", str(write_jsonl(tmp_path / "bad.jsonl", bad)), "--home", str(tmp_path / "h")),
                          cwd=REPO, env=embedded_env(tiny_models_file), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Line 2" in done.stderr and "temperature" in done.stderr
    assert not (tmp_path / "bad.output.jsonl").exists()


def test_ctrl_c_keeps_finished_requests(tiny_models_file, tmp_path):
    home = tmp_path / "home"
    path = write_jsonl(tmp_path / "in.jsonl", lines(48, max_tokens=400))  # long enough to interrupt midway
    env = embedded_env(tiny_models_file, GENQ_SHARD_SIZE="12", GENQ_MAX_BATCH_SIZE="4")
    process = subprocess.Popen(genq("run", str(path), "--home", str(home)), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    stored = 0
    while stored == 0:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
        try:
            with sqlite3.connect(home / "genq.db", timeout=5) as db:
                stored = db.execute("select count(*) from request_results").fetchone()[0]
        except sqlite3.OperationalError:
            pass  # not migrated yet
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    output = [json.loads(x) for x in (tmp_path / "in.output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "in.errors.jsonl").read_text().splitlines()]
    assert 1 <= len(output) < 48 and len(output) + len(errors) == 48
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert "cancelled" in stderr


def test_a_catalog_csv_runs_with_a_template_and_joins_back(tiny_models_file, tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,title\nA1,Sock\nB2,Bottle\nC3,Tote\n")
    template = tmp_path / "t.j2"
    template.write_text("Describe {{ title }}.")
    env = embedded_env(tiny_models_file)
    out = tmp_path / "out.jsonl"
    done = subprocess.run(genq("run", str(catalog), "--template", str(template), "--model", TINY, "-o", str(out),
                               "--home", str(tmp_path / "h")), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 3
    enriched = tmp_path / "enriched.csv"
    done = subprocess.run(genq("catalog", "join", str(catalog), str(out), "-o", str(enriched)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = enriched.read_text().splitlines()
    assert table[0] == "sku,title,generated,error" and len(table) >= 4
    bad = tmp_path / "bad.j2"
    bad.write_text("{{ colour }}")
    done = subprocess.run(genq("run", str(catalog), "--template", str(bad), "--home", str(tmp_path / "h2")),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "row 1" in done.stderr + done.stdout and "'colour'" in done.stderr + done.stdout
