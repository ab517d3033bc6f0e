"""api/ must stay importable on a machine without torch."""

import subprocess
import sys


def test_api_never_imports_torch() -> None:
    code = ("import sys; import api.main, api.batch_service; api.main.create_app; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'workers.runtime', 'kernels'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
