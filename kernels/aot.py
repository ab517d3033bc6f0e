"""Ahead-of-time compilation of every Triton kernel, with the CUDA configs its launcher uses, on any host.

    python -m kernels.aot --arch 90 --arch 80

Builds each kernel with triton.compile for GPUTarget("cuda", arch, 32); no driver is touched, so
this runs on a CPU-only CI machine and fails (non-zero exit) as soon as a kernel stops compiling or
its shared memory outgrows the architecture. TRITON_INTERPRET must be unset: the interpreter
replaces the kernels with Python functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Usable shared memory per block (opt-in maximum), bytes.
_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_FLOAT_ARGS = {"qk_scale"}  # every other non-pointer, non-constexpr argument is an int32


@dataclass(frozen=True)
class KernelBuild:
    """One kernel specialisation: what the launcher would JIT-compile for a CUDA call."""

    module: str  # kernels.<module> holding the kernel
    kernel: str  # the @triton.jit function's name
    pointers: dict[str, str]  # pointer argument -> element type ("fp32", "bf16", "i32", ...)
    constexprs: dict[str, object]
    options: dict[str, object] = field(default_factory=dict)  # num_warps, num_stages, enable_fp_fusion

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        dtypes = "/".join(sorted(set(self.pointers.values())))
        return f"{self.kernel}[{dtypes}; {consts}; {self.options}]"


def kernel_builds() -> list[KernelBuild]:
    """Every specialisation the CUDA launchers use (dtypes x head dims x split on/off)."""
    import torch

    from kernels.attention_decode import CUDA_DECODE_CONFIG, MAX_SPLITS
    from kernels.attention_prefill import CUDA_PREFILL_CONFIGS
    from kernels.dispatch import TRITON_ATTENTION_DTYPES, TRITON_HEAD_DIMS
    from kernels.sampling import CUDA_SAMPLING_CONFIG

    triton_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

    builds = []
    cfg = CUDA_SAMPLING_CONFIG
    for dtype in ("fp32", "bf16", "fp16"):
        pointers = {"logits_ptr": dtype, "work_ptr": "fp32", "top_k_ptr": "i32", "seed_ptr": "i64"}
        pointers |= {"position_ptr": "i32", "counts_ptr": "i32", "prompt_ptr": "u8", "tokens_ptr": "i64"}
        for name in ("temperature", "top_p", "min_p", "presence", "frequency", "repetition", "logprobs"):
            pointers[f"{name}_ptr"] = "fp32"
        builds.append(
            KernelBuild(
                "sampling",
                "_sample_kernel",
                pointers,
                {"ROWS": cfg.rows, "BLOCK_V": cfg.block_v, "NSPLIT": cfg.nsplit, "STORE_FILTERED": False},
                {"num_warps": cfg.num_warps, "enable_fp_fusion": False},
            )
        )
    for dtype in (triton_dtype[d] for d in TRITON_ATTENTION_DTYPES):
        for head_dim in TRITON_HEAD_DIMS:  # the ones dispatch sends to the kernels
            pcfg = CUDA_PREFILL_CONFIGS[head_dim]
            pointers = {n: dtype for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
            pointers |= {"cu_seqlens_ptr": "i32", "seq_lens_ptr": "i32", "block_tables_ptr": "i32"}
            builds.append(
                KernelBuild(
                    "attention_prefill",
                    "_prefill_kernel",
                    pointers,
                    {"HEAD_DIM": head_dim, "BLOCK_M": pcfg.block_m, "BLOCK_N": pcfg.block_n},
                    {"num_warps": pcfg.num_warps, "num_stages": pcfg.num_stages},
                )
            )
            dcfg = CUDA_DECODE_CONFIG
            for split in (False, True):
                pointers = {n: dtype for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
                pointers |= {"block_tables_ptr": "i32", "seq_lens_ptr": "i32"}
                pointers |= {"part_out_ptr": "fp32", "part_lse_ptr": "fp32"}
                consts = {"HEAD_DIM": head_dim, "BLOCK_H": dcfg.block_h, "BLOCK_N": dcfg.block_n, "SPLIT": split}
                opts = {"num_warps": dcfg.num_warps, "num_stages": dcfg.num_stages}
                builds.append(KernelBuild("attention_decode", "_decode_split_kernel", pointers, consts, opts))
            pointers = {"part_out_ptr": "fp32", "part_lse_ptr": "fp32", "out_ptr": dtype}
            consts = {"HEAD_DIM": head_dim, "BLOCK_S": MAX_SPLITS}
            builds.append(KernelBuild("attention_decode", "_decode_merge_kernel", pointers, consts, {"num_warps": 4}))
    return builds


def compile_build(build: KernelBuild, arch: int) -> tuple[str, int, int, float]:
    """Compiles one build for sm_<arch>; returns (label, cubin bytes, shared memory bytes, seconds)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    fn = getattr(importlib.import_module(f"kernels.{build.module}"), build.kernel)
    signature = {}
    for name in fn.arg_names:
        if name in build.constexprs:
            signature[name] = "constexpr"
        elif name in build.pointers:
            signature[name] = "*" + build.pointers[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    # Pointers from the torch allocator are 16-byte aligned; the JIT would specialise on that too.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in build.pointers}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=build.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(dict(build.options))
    compiled = triton.compile(source, target=target, options=options.__dict__)
    return build.label, len(compiled.asm["cubin"]), compiled.metadata.shared, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, e.g. 90 or 80 (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences 3.9's warning; launchers keep the default
    archs = args.arch or [90, 80]
    jobs = [(build, arch) for arch in archs for build in kernel_builds()]
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(compile_build, build, arch) for build, arch in jobs]
        for (build, arch), future in zip(jobs, futures, strict=True):
            try:
                label, cubin, shared, seconds = future.result()
            except Exception as exc:  # report every failure, not just the first
                failures += 1
                print(f"FAIL sm_{arch} {build.label}: {type(exc).__name__}: {exc}")
                continue
            limit = _SHARED_LIMIT.get(arch, 99 * 1024)
            status = "ok  " if shared <= limit else "FAIL"
            failures += shared > limit
            print(f"{status} sm_{arch} {label}: cubin {cubin} B, shared {shared} B (limit {limit}), {seconds:.1f}s")
    print(f"kernels.aot: {len(jobs) - failures}/{len(jobs)} compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
