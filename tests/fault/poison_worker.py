"""`genq worker` whose model kills its whole process, as the kernel's OOM killer would, on any
request whose prompt holds kinds.POISON. Only the crash is injected: Celery, Redis, the database,
storage and the tiny model are the real ones.

Usage: python tests/fault/poison_worker.py worker --models MODEL ... (the `genq` arguments)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fault.kinds import POISON  # noqa: E402
from workers.runtime import loader  # noqa: E402

_real_load_model = loader.load_model


class _Poisoned:
    """The loaded model, except that submitting the poison request ends the process at once."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def submit(self, requests):
        if any(POISON in self._model.decode(r.prompt_token_ids) for r in requests):
            os._exit(137)
        return self._model.submit(requests)


def _load_model(model_id: str):
    return _Poisoned(_real_load_model(model_id))


loader.load_model = _load_model

if __name__ == "__main__":
    from genq.cli import app

    sys.argv = ["genq", *sys.argv[1:]]
    app()
