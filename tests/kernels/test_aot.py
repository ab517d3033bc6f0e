"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 with its launcher's configs, no GPU needed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80_without_a_driver():
    from kernels.aot import kernel_builds

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no device, even where there is one
    result = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "--arch", "90", "--arch", "80"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    expected = 2 * len(kernel_builds())
    assert f"kernels.aot: {expected}/{expected} compiled" in result.stdout
    for kernel in ("_sample_kernel", "_prefill_kernel", "_decode_split_kernel", "_decode_merge_kernel"):
        assert f"ok   sm_90 {kernel}" in result.stdout and f"ok   sm_80 {kernel}" in result.stdout
