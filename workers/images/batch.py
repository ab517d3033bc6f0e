"""Image lines of a batch shard (/v1/images/generations): the trained model's draws as PNGs, one output line each.

run_shard (workers/batches/shard_runner.py) claims the shard, skips stored results, quarantines a
line that killed a worker and hands the rest here; the lease, heartbeat, cancel and finalize are the
chat shards'. Each line is drawn by its own forward pass (never batched with another line: the same
seed then gives the same bytes whatever else the shard holds), from z ~ N(0, I) seeded by the line's
seed (or one fixed per batch and custom_id). A line that cannot be drawn fails alone with its error
line; a model deleted meanwhile (or a checkpoint pruned) fails every line with model_not_found.

    response_format "url"       each PNG is a file of the tenant (purpose batch_output) whose id is fixed
                                by (batch, custom_id, index) and whose bytes lie under the batch's
                                prefix, so a retried attempt rewrites the same object, and retention
                                removes rows and objects (an uncommitted attempt's too) with the
                                batch; the rows are inserted in the transaction that stores the
                                results, fenced by the attempt. url = <api base>/files/<id>/content.
    response_format "b64_json"  the PNG inline.
The output line's body is OpenAI's images response: {"created", "data": [{"url" | "b64_json",
"revised_prompt": null}], "output_format": "png", "size": "SxS"}, each data item with genq's "file_id"
(url only) and "seed".
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from db.files import BATCH_OUTPUT_PURPOSE, create_file
from db.fine_tuning import any_model
from db.leases import ResultRow
from db.models import RequestOutcome
from db.session import session_scope
from genq.settings import Settings
from storage import store_from_settings
from storage.keys import batch_image_key
from workers.batches.chat import output_line, stable_id, stable_seed
from workers.batches.image_contract import ImageRequest, check_against_card, parse_image_body
from workers.batches.request_contract import RequestError
from workers.batches.shard_files import InputLine
from workers.heartbeat import Heartbeat, while_storage_is_down
from workers.images.artifact import MODEL_CARD_FILE, MODEL_WEIGHTS_FILE, ImageModelCard, load_network
from workers.images.data import ImageDataError, decode_image
from workers.images.sampling import sample, to_png, to_uint8
from workers.runtime.errors import ModelLoadError
from workers.runtime.loader import resolve_device

log = logging.getLogger(__name__)
LINES_PER_COMMIT = 16  # lines whose results (and files) are stored in one transaction
CACHED_MODELS = 8

_cache: OrderedDict[str, tuple[torch.nn.Module, ImageModelCard]] = OrderedDict()
_cache_lock = threading.Lock()


def load_image_model(settings: Settings, model_id: str, tenant_id: str, heartbeat: Heartbeat
                     ) -> tuple[torch.nn.Module, ImageModelCard]:
    """The tenant's trained image model (a checkpoint too) on the worker's device, cached per process (a
    model's files never change once published); ModelLoadError when the tenant has no such model."""
    with session_scope(settings.resolved_database_url()) as session:  # asked each time: it may be deleted
        row = any_model(session=session, model_id=model_id)
        if row is None or row.image_spec is None or row.tenant_id != tenant_id:
            raise ModelLoadError(model_id, "no such image model (deleted, or a checkpoint pruned?)")
        prefix = row.adapter_key
    with _cache_lock:
        if model_id in _cache:
            _cache.move_to_end(model_id)
            return _cache[model_id]
    store = store_from_settings(settings)
    files = {name: while_storage_is_down(lambda name=name: store.get_bytes(f"{prefix}{name}"), heartbeat,
                                         settings.storage_outage_seconds)
             for name in (MODEL_CARD_FILE, MODEL_WEIGHTS_FILE)}
    loaded = load_network(files, resolve_device(settings))
    with _cache_lock:
        _cache[model_id] = loaded
        while len(_cache) > CACHED_MODELS:
            _cache.popitem(last=False)
    return loaded


@torch.no_grad()
def draw(network: torch.nn.Module, card: ImageModelCard, request: ImageRequest, seed: int) -> list[bytes]:
    """The line's PNGs: n samples of the prompt's class, its reconstruction, or its interpolation."""
    device = next(network.parameters()).device
    label = card.class_names.index(request.prompt) if card.class_names else None
    if request.mode == "reconstruct":
        try:
            x = decode_image(request.image or b"", card.image_size, card.channels, name="body.image").to(device)
        except ImageDataError as exc:
            raise RequestError(str(exc), "invalid_image", "image") from None
        y = None if label is None else torch.tensor([label], device=device)
        pixels = to_uint8(network.reconstruct(x, y))
    elif request.mode == "interpolate":
        noise = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn(1, card.latent_dim, generator=noise, device=device)
        t = torch.linspace(0.0, 1.0, request.n, device=device)
        pixels = to_uint8(network.decode_between(z, label, card.class_names.index(request.to_prompt), t))
    else:
        pixels = sample(network, [label] * request.n if label is not None else request.n, seed, device)
    return [to_png(np.asarray(image)) for image in pixels]


def draw_lines(*, settings: Settings, batch_id: str, tenant_id: str, model_id: str, items: list[InputLine],
               store_rows: Callable[[list[ResultRow], Callable[[Any], None]], None],
               failure_row: Callable[[InputLine, RequestError], ResultRow], heartbeat: Heartbeat,
               before_line: Callable[[InputLine], bool] | None = None) -> None:
    """Draws every item and stores its output line (and its files) LINES_PER_COMMIT at a time, via
    store_rows(rows, add_files) which runs add_files(session) in the results' fenced transaction.
    before_line(item), when given, runs before each line is drawn and stops the shard if False."""
    try:
        network, card = load_image_model(settings, model_id, tenant_id, heartbeat)
    except ModelLoadError:
        gone = RequestError(f"The model {model_id!r} no longer exists (deleted, or a checkpoint pruned since the "
                            "batch was created)", "model_not_found", "model", status_code=404)
        store_rows([failure_row(item, gone) for item in items], lambda session: None)
        return
    store = store_from_settings(settings)
    base_url = settings.client_base_url().rstrip("/")
    for start in range(0, len(items), LINES_PER_COMMIT):
        rows: list[ResultRow] = []
        files: list[_StoredPng] = []
        for item in items[start : start + LINES_PER_COMMIT]:
            if heartbeat.should_stop() or (before_line is not None and not before_line(item)):
                store_rows(rows, _file_rows(tenant_id, files))  # what was drawn is kept (or refused if fenced out)
                return
            try:
                request = parse_image_body(item.body, strict=False)
                check_against_card(request, card.as_dict())
                seed = request.seed if request.seed is not None else stable_seed(batch_id, item.custom_id)
                pngs = draw(network, card, request, seed)
            except RequestError as error:
                rows.append(failure_row(item, error))
                continue
            except (MemoryError, torch.OutOfMemoryError):
                raise  # the worker's trouble, not the line's: the shard is retried
            except Exception as exc:  # a bug met by this line only: it fails alone
                log.exception("image line %s of batch %s could not be drawn", item.custom_id, batch_id)
                rows.append(failure_row(item, RequestError(f"drawing failed: {type(exc).__name__}: {exc}",
                                                           "generation_failed", None, type="server_error",
                                                           status_code=500)))
                continue
            data = []
            for index, png in enumerate(pngs):
                if request.response_format == "b64_json":
                    data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None, "seed": seed})
                    continue
                stored = _StoredPng.of(batch_id, item.custom_id, index, len(png))
                while_storage_is_down(lambda key=stored.key, png=png: store.put_bytes(key, png), heartbeat,
                                      settings.storage_outage_seconds)
                files.append(stored)
                data.append({"url": f"{base_url}/files/{stored.file_id}/content", "revised_prompt": None,
                             "file_id": stored.file_id, "seed": seed})
            body = {"created": int(time.time()), "data": data, "output_format": "png",
                    "size": f"{card.image_size}x{card.image_size}"}
            rows.append(ResultRow(custom_id=item.custom_id, line_number=item.line, outcome=RequestOutcome.SUCCEEDED,
                                  output_line=output_line(batch_id=batch_id, custom_id=item.custom_id,
                                                          status_code=200, body=body)))
        store_rows(rows, _file_rows(tenant_id, files))


def _file_rows(tenant_id: str, files: list[_StoredPng]) -> Callable[[Any], None]:
    """What store_rows runs in the results' transaction: a file row per stored PNG."""

    def add(session: Any) -> None:
        for png in files:
            create_file(session=session, tenant_id=tenant_id, file_id=png.file_id, filename=png.filename,
                        purpose=BATCH_OUTPUT_PURPOSE, size=png.size, storage_key=png.key)

    return add


@dataclass(frozen=True)
class _StoredPng:
    file_id: str
    key: str
    filename: str
    size: int

    @classmethod
    def of(cls, batch_id: str, custom_id: str, index: int, size: int) -> _StoredPng:
        file_id = f"file-{stable_id(batch_id, custom_id, str(index))}"
        return cls(file_id, batch_image_key(batch_id, file_id), f"{batch_id}-{custom_id}-{index}.png"[:512], size)
