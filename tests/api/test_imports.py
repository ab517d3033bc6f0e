"""api/ must stay importable on a machine without torch."""

import subprocess
import sys

# The runtime's torch-free seam (workers/runtime/types.py, errors.py) is what the request contract returns.
TORCH_FREE = ("workers.runtime", "workers.runtime.types", "workers.runtime.errors")


def test_api_never_imports_torch() -> None:
    code = ("import sys; import api.main, api.batch_service; api.main.create_app; "
            f"bad = [m for m in sys.modules if m not in {TORCH_FREE!r} and (m == 'torch' or "
            "m.startswith(('torch.', 'workers.runtime', 'kernels')))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
