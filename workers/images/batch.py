"""Image lines of a batch shard (/v1/images/generations): the trained model's draws as PNGs, one output line each.

run_shard (workers/batches/shard_runner.py) claims the shard, skips stored results and hands the rest
here; the lease, heartbeat, cancel and finalize are the chat shards'. Each line is drawn by its own
forward pass (never batched with another line: the same seed then gives the same bytes whatever else
the shard holds), from z ~ N(0, I) seeded by the line's seed (or one fixed per batch and custom_id).

    response_format "url"       each PNG is stored as a file of the tenant (purpose batch_output) with
                                an id fixed by (batch, custom_id, index), so a retried attempt rewrites
                                the same bytes under the same id instead of leaving orphans; the rows
                                are inserted in the transaction that stores the results, fenced by the
                                attempt. url = <api base>/files/<id>/content (the Files API serves it).
    response_format "b64_json"  the PNG inline.
The output line's body is OpenAI's images response: {"created", "data": [{"url" | "b64_json",
"revised_prompt": null}], "output_format": "png", "size": "SxS"}, each data item with genq's "file_id"
(url only) and "seed".
"""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from db.files import BATCH_OUTPUT_PURPOSE, create_file, file_storage_key
from db.fine_tuning import any_model
from db.leases import ResultRow
from db.models import RequestOutcome
from db.session import session_scope
from genq.settings import Settings
from storage import Store, store_from_settings
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

LINES_PER_COMMIT = 16  # lines whose results (and files) are stored in one transaction
CACHED_MODELS = 8

_cache: OrderedDict[str, tuple[torch.nn.Module, ImageModelCard]] = OrderedDict()
_cache_lock = threading.Lock()


def load_image_model(settings: Settings, model_id: str) -> tuple[torch.nn.Module, ImageModelCard]:
    """The trained image model (a checkpoint too) on the worker's device, cached per process (a model's
    files never change once published)."""
    with _cache_lock:
        if model_id in _cache:
            _cache.move_to_end(model_id)
            return _cache[model_id]
    with session_scope(settings.resolved_database_url()) as session:
        row = any_model(session=session, model_id=model_id)
        if row is None or row.image_spec is None:
            raise ModelLoadError(model_id, "no such image model (deleted?)")
        prefix = row.adapter_key
    store = store_from_settings(settings)
    files = {name: store.get_bytes(f"{prefix}{name}") for name in (MODEL_CARD_FILE, MODEL_WEIGHTS_FILE)}
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
               failure_row: Callable[[InputLine, RequestError], ResultRow], heartbeat: Heartbeat) -> None:
    """Draws every item and stores its output line (and its files) LINES_PER_COMMIT at a time, via
    store_rows(rows, add_files) which runs add_files(session) in the results' fenced transaction."""
    network, card = load_image_model(settings, model_id)
    store = store_from_settings(settings)
    base_url = settings.client_base_url().rstrip("/")
    for start in range(0, len(items), LINES_PER_COMMIT):
        if heartbeat.should_stop():
            return
        rows: list[ResultRow] = []
        files: list[tuple[str, str, int]] = []  # (file id, filename, bytes)
        for item in items[start : start + LINES_PER_COMMIT]:
            try:
                request = parse_image_body(item.body, strict=False)
                check_against_card(request, card.as_dict())
                seed = request.seed if request.seed is not None else stable_seed(batch_id, item.custom_id)
                pngs = draw(network, card, request, seed)
            except RequestError as error:
                rows.append(failure_row(item, error))
                continue
            data = [_data_item(store, heartbeat, settings, batch_id, item.custom_id, i, png, request, seed, base_url,
                               files) for i, png in enumerate(pngs)]
            body = {"created": int(time.time()), "data": data, "output_format": "png",
                    "size": f"{card.image_size}x{card.image_size}"}
            rows.append(ResultRow(custom_id=item.custom_id, line_number=item.line, outcome=RequestOutcome.SUCCEEDED,
                                  output_line=output_line(batch_id=batch_id, custom_id=item.custom_id,
                                                          status_code=200, body=body)))

        def add_files(session: Any, files: list[tuple[str, str, int]] = files) -> None:
            for file_id, filename, size in files:
                create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename=filename,
                            purpose=BATCH_OUTPUT_PURPOSE, size=size)

        store_rows(rows, add_files)


def _data_item(store: Store, heartbeat: Heartbeat, settings: Settings, batch_id: str, custom_id: str, index: int,
               png: bytes, request: ImageRequest, seed: int, base_url: str,
               files: list[tuple[str, str, int]]) -> dict[str, Any]:
    if request.response_format == "b64_json":
        return {"b64_json": base64.b64encode(png).decode(), "revised_prompt": None, "seed": seed}
    file_id = f"file-{stable_id(batch_id, custom_id, str(index))}"
    while_storage_is_down(lambda: store.put_bytes(file_storage_key(file_id), png), heartbeat,
                          settings.storage_outage_seconds)
    files.append((file_id, f"{batch_id}-{custom_id}-{index}.png"[:512], len(png)))
    return {"url": f"{base_url}/files/{file_id}/content", "revised_prompt": None, "file_id": file_id, "seed": seed}
