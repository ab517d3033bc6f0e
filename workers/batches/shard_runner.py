"""run_shard: claim a shard's lease, submit its requests to the model's engine, write each result
fenced, finish, finalize.

The plain function behind the Celery task "genq.run_shard" and behind `genq run` (embedded mode).
Several shards run at once in one process (worker threads), all submitting to the same engine, so
the running batch stays full across shard and batch boundaries. A heartbeat thread per shard renews
its lease and watches its batch: cancel or expiry aborts this shard's requests in the engine, and a
lost lease aborts them and stops all writes; other shards' requests run on. Results already stored
are skipped, so a re-run resumes where the last attempt stopped. A request that cannot be served (bad
body, too long, or one that crashes the model when run alone) fails alone with an error line; an
engine failure (out of memory) or a database failure releases the shard for another attempt.
Image shards (/v1/images/generations) run the same way with workers/images/batch.py drawing them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.batches import batch_runs, batch_should_stop
from db.leases import (
    ResultRow,
    claim_shard,
    done_custom_ids,
    finish_shard,
    mark_suspect,
    record_results,
    release_shard,
)
from db.models import Batch, RequestOutcome, Shard, ShardStatus
from db.session import session_scope
from genq.settings import Settings
from storage import store_from_settings
from workers.batches.chat import (
    build_line,
    output_line,
    request_error_line,
    response_body,
)
from workers.batches.choices import LineChoices
from workers.batches.finalize import maybe_finalize
from workers.batches.image_contract import IMAGES_ENDPOINT
from workers.batches.request_contract import RequestError
from workers.batches.shard_files import InputLine, read_shard_lines
from workers.heartbeat import Heartbeat, while_storage_is_down
from workers.runtime.types import GenerationHandle, GenerationRequest, GenerationResult, ServedModel
from workers.shard_outcome import ShardOutcome, ShardRun

log = logging.getLogger(__name__)

ModelLoader = Callable[[str], ServedModel]
# Called after each stored result with (prompt_tokens, completion_tokens); `genq run` draws progress.
ProgressCallback = Callable[[int, int], None]


@dataclass
class _ShardJob:
    shard_id: int
    attempt: int
    batch_id: str
    endpoint: str
    model: str
    queue: str
    input_key: str
    tenant_id: str
    isolate: bool = False  # an earlier attempt's worker died: run requests one at a time, each named first
    suspect: str | None = None  # the request running alone when a worker last died
    pending: dict[str, InputLine] = field(default_factory=dict)  # custom_id -> line, not yet stored


def default_model_loader(model_id: str) -> ServedModel:
    """The runtime's cached loader, imported here so torch loads only in worker processes."""
    from workers.runtime.loader import load_model

    return load_model(model_id)


class ResultWriteError(RuntimeError):
    """Storing a result failed (database down): the shard is retried, no request is blamed."""


class ShardTimeLimitExceeded(RuntimeError):
    """The attempt ran past settings.shard_time_limit_seconds: released like a crash (retry or fail)."""


class _ResultWriter:
    """Turns generation results into stored rows, fenced by the shard's attempt."""

    def __init__(self, *, settings: Settings, job: _ShardJob, worker_id: str, lm: ServedModel | None,
                 heartbeat: Heartbeat,
                 on_progress: ProgressCallback | None) -> None:
        self.url = settings.resolved_database_url()
        self.job = job
        self.worker_id = worker_id
        self.lm = lm
        self.heartbeat = heartbeat
        self.on_progress = on_progress
        self.written = 0

    def store(self, rows: list[ResultRow], also: Callable[[Session], None] | None = None) -> None:
        """Stores rows (those still pending) in one fenced transaction, with also(session)'s rows when
        given (an image line's files); a lost fence stops the shard."""
        rows = [row for row in rows if row.custom_id in self.job.pending]
        if self.heartbeat.lease_lost.is_set() or not rows:
            return
        try:
            stored = self._record(rows, also)
        except OperationalError:  # a connection the database dropped (a restart): the pool is renewed, once more
            try:
                stored = self._record(rows, also)
            except Exception as exc:
                raise ResultWriteError(f"could not store the results of {[r.custom_id for r in rows][:3]}...: "
                                       f"{exc}") from exc
        except Exception as exc:
            raise ResultWriteError(f"could not store the results of {[r.custom_id for r in rows][:3]}...: "
                                   f"{exc}") from exc
        if not stored:
            self.heartbeat.lease_lost.set()
            return
        for row in rows:
            del self.job.pending[row.custom_id]
            self.written += 1
            if self.on_progress:
                self.on_progress(row.prompt_tokens, row.completion_tokens)

    def _record(self, rows: list[ResultRow], also: Callable[[Session], None] | None) -> bool:
        with session_scope(self.url) as session:
            stored = record_results(session=session, batch_id=self.job.batch_id, shard_id=self.job.shard_id,
                                    attempt=self.job.attempt, worker_id=self.worker_id, results=rows)
            if stored and also is not None:
                also(session)
            return stored

    def line_row(self, line: LineChoices) -> ResultRow | None:
        """The row of a finished line (its error line if it failed); None if not ours."""
        item = self.job.pending.get(line.custom_id)
        if item is None:
            return None
        if line.error is not None:
            return self.failure_row(item, line.error)
        body = response_body(endpoint=self.job.endpoint, body=item.body, batch_id=self.job.batch_id,
                             custom_id=item.custom_id, line=line, lm=self.lm)
        out = output_line(batch_id=self.job.batch_id, custom_id=item.custom_id, status_code=200, body=body)
        usage = body["usage"]
        return ResultRow(custom_id=item.custom_id, line_number=item.line, outcome=RequestOutcome.SUCCEEDED,
                         output_line=out, prompt_tokens=usage["prompt_tokens"],
                         completion_tokens=usage["completion_tokens"])

    def failure_row(self, item: InputLine, error: RequestError) -> ResultRow:
        line = request_error_line(batch_id=self.job.batch_id, custom_id=item.custom_id, error=error,
                                  attempt=self.job.attempt, worker_id=self.worker_id)
        return ResultRow(custom_id=item.custom_id, line_number=item.line, outcome=RequestOutcome.FAILED,
                         output_line=line)


def _load_job(settings: Settings, shard_id: int, worker_id: str) -> tuple[_ShardJob | None, str | None]:
    with session_scope(settings.resolved_database_url()) as session:
        attempt = claim_shard(session=session, shard_id=shard_id, worker_id=worker_id,
                              lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
                              job_runs=batch_runs())
        row = session.execute(
            select(Shard.job_id, Shard.model, Shard.queue, Shard.input_key, Shard.deaths, Shard.suspect,
                   Batch.endpoint, Batch.tenant_id)
            .join(Batch, Batch.id == Shard.job_id).where(Shard.id == shard_id)
        ).first()
    if row is None:
        return None, None
    if attempt is None:
        return None, row.job_id
    return _ShardJob(shard_id=shard_id, attempt=attempt, batch_id=row.job_id, endpoint=row.endpoint,
                     model=row.model, queue=row.queue, input_key=row.input_key, tenant_id=row.tenant_id,
                     isolate=row.deaths > 0,
                     suspect=row.suspect), row.job_id


def run_shard(*, settings: Settings, shard_id: int, worker_id: str,
              model_loader: ModelLoader = default_model_loader,
              on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> ShardOutcome:
    """Runs one shard to its end under a lease and returns what happened; never raises for job errors.

    A duplicate delivery (the shard is leased elsewhere or finished) returns NOT_CLAIMED at once.
    `cancel`, once set, stops the shard within a moment as a batch cancel would (without a heartbeat).
    """
    url = settings.resolved_database_url()
    job, batch_id = _load_job(settings, shard_id, worker_id)
    if job is None:
        finalized = maybe_finalize(settings, batch_id) if batch_id else False
        return ShardOutcome(shard_id=shard_id, status=ShardRun.NOT_CLAIMED, finalized=finalized)

    heartbeat = Heartbeat(database_url=url, shard_id=job.shard_id, attempt=job.attempt,
                          job_stopped=lambda session: batch_should_stop(session=session, batch_id=job.batch_id),
                          lease_seconds=settings.lease_seconds,
                          interval=settings.heartbeat_seconds, time_limit=settings.shard_time_limit_seconds,
                          cancel=cancel)
    heartbeat.start()
    outcome = ShardOutcome(shard_id=shard_id, status=ShardRun.DONE, attempt=job.attempt, queue=job.queue)
    try:
        _generate(settings=settings, job=job, worker_id=worker_id, model_loader=model_loader,
                  heartbeat=heartbeat, on_progress=on_progress, outcome=outcome)
    except Exception as exc:
        log.exception("shard %s attempt %s crashed", shard_id, job.attempt)
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        heartbeat.close()  # before a release: a beat after it would read the released shard as a lost lease

    if outcome.error is not None:
        with session_scope(url) as session:
            status = release_shard(session=session, shard_id=shard_id, attempt=job.attempt, error=outcome.error,
                                   max_attempts=settings.max_attempts)
        outcome.status = {ShardStatus.QUEUED: ShardRun.RELEASED, ShardStatus.FAILED: ShardRun.FAILED}.get(
            status, ShardRun.LEASE_LOST)
    elif outcome.status in (ShardRun.DONE, ShardRun.CANCELLED) and not heartbeat.lease_lost.is_set():
        final = ShardStatus.DONE if outcome.status == ShardRun.DONE else ShardStatus.CANCELLED
        with session_scope(url) as session:
            if not finish_shard(session=session, shard_id=shard_id, attempt=job.attempt, status=final):
                outcome.status = ShardRun.LEASE_LOST
    elif heartbeat.lease_lost.is_set() and outcome.status != ShardRun.FAILED:
        outcome.status = ShardRun.LEASE_LOST
    if outcome.status in (ShardRun.DONE, ShardRun.CANCELLED, ShardRun.FAILED):
        outcome.finalized = maybe_finalize(settings, job.batch_id)
    return outcome


def _generate(*, settings: Settings, job: _ShardJob, worker_id: str, model_loader: ModelLoader,
              heartbeat: Heartbeat, on_progress: ProgressCallback | None, outcome: ShardOutcome) -> None:
    store = store_from_settings(settings)
    lines = while_storage_is_down(lambda: read_shard_lines(store, job.input_key), heartbeat,
                                   settings.storage_outage_seconds)
    with session_scope(settings.resolved_database_url()) as session:
        done = done_custom_ids(session=session, shard_id=job.shard_id)
    job.pending = {item.custom_id: item for item in lines if item.custom_id not in done}
    outcome.skipped = len(lines) - len(job.pending)
    if not job.pending:
        return
    if job.endpoint == IMAGES_ENDPOINT:
        _draw_images(settings=settings, job=job, worker_id=worker_id, heartbeat=heartbeat, on_progress=on_progress,
                     outcome=outcome)
    else:
        _generate_text(settings=settings, job=job, worker_id=worker_id, model_loader=model_loader,
                       heartbeat=heartbeat, on_progress=on_progress, outcome=outcome)
    if job.pending and heartbeat.timed_out.is_set() and not heartbeat.lease_lost.is_set():
        raise ShardTimeLimitExceeded(f"shard {job.shard_id} ran past its time limit of "
                                     f"{settings.shard_time_limit_seconds:g} s with {len(job.pending)} requests left")
    if job.pending and heartbeat.stop_requested.is_set():
        outcome.status = ShardRun.CANCELLED
    elif job.pending and not heartbeat.lease_lost.is_set():
        # The runtime returned without a result for some requests: let another attempt finish them.
        raise RuntimeError(f"{len(job.pending)} requests of shard {job.shard_id} produced no result")


def _draw_images(*, settings: Settings, job: _ShardJob, worker_id: str, heartbeat: Heartbeat,
                 on_progress: ProgressCallback | None, outcome: ShardOutcome) -> None:
    from workers.images.batch import draw_lines  # torch and the image models: only for an image shard

    writer = _ResultWriter(settings=settings, job=job, worker_id=worker_id, lm=None, heartbeat=heartbeat,
                           on_progress=on_progress)
    items = [item for item in job.pending.values() if item.custom_id != job.suspect]
    writer.store([writer.failure_row(item, _quarantined(job)) for item in job.pending.values()
                  if item.custom_id == job.suspect])
    url = settings.resolved_database_url()
    draw_lines(settings=settings, batch_id=job.batch_id, tenant_id=job.tenant_id, model_id=job.model, items=items,
               store_rows=writer.store, failure_row=writer.failure_row, heartbeat=heartbeat,
               before_line=(lambda item: _named_suspect(url, job, item.custom_id, heartbeat)) if job.isolate else None)
    outcome.written = writer.written


def _generate_text(*, settings: Settings, job: _ShardJob, worker_id: str, model_loader: ModelLoader,
                   heartbeat: Heartbeat, on_progress: ProgressCallback | None, outcome: ShardOutcome) -> None:
    lm = model_loader(job.model)
    writer = _ResultWriter(settings=settings, job=job, worker_id=worker_id, lm=lm, heartbeat=heartbeat,
                           on_progress=on_progress)
    lines: list[LineChoices] = []
    refused: list[ResultRow] = []
    for item in list(job.pending.values()):
        if item.custom_id == job.suspect:  # it killed a worker while running alone: never again
            refused.append(writer.failure_row(item, _quarantined(job)))
            continue
        try:
            lines.append(build_line(endpoint=job.endpoint, body=item.body, batch_id=job.batch_id,
                                    custom_id=item.custom_id, lm=lm, default_max_tokens=settings.default_max_tokens,
                                    max_candidates_per_choice=settings.max_candidates_per_choice))
        except RequestError as error:
            refused.append(writer.failure_row(item, error))
    writer.store(refused)
    if job.isolate:
        _run_one_at_a_time(lm, lines, writer, heartbeat, url=settings.resolved_database_url(), job=job)
    else:
        _run_lines(lm, lines, writer, heartbeat)
    outcome.written = writer.written


def _quarantined(job: _ShardJob) -> RequestError:
    return RequestError(f"A worker died while running this request alone (shard {job.shard_id}, attempt "
                        f"{job.attempt - 1}); it was quarantined so that the rest of the batch could finish.",
                        "request_quarantined", None, type="server_error", status_code=500)


def _run_one_at_a_time(lm: ServedModel, lines: list[LineChoices], writer: _ResultWriter,
                       heartbeat: Heartbeat, *, url: str, job: _ShardJob) -> None:
    """After a worker death: each line alone, named as the suspect first, so that if it kills this
    worker too the next attempt knows which one to quarantine. Slower, and only for such shards."""
    for line in lines:
        if heartbeat.should_stop() or not _named_suspect(url, job, line.custom_id, heartbeat):
            return
        _run_lines(lm, [line], writer, heartbeat)


def _named_suspect(url: str, job: _ShardJob, custom_id: str, heartbeat: Heartbeat) -> bool:
    """Records custom_id as the request now running alone; False (the lease is lost) if fenced out."""
    with session_scope(url) as session:
        if mark_suspect(session=session, shard_id=job.shard_id, attempt=job.attempt, custom_id=custom_id):
            return True
    heartbeat.lease_lost.set()
    return False


def _run_lines(lm: ServedModel, lines: list[LineChoices], writer: _ResultWriter, heartbeat: Heartbeat) -> None:
    """Submits every line's candidates to the engine, checks each as it finishes (submitting another
    when one is rejected), and stores each line once its choices are in; on cancel, expiry or a lost
    lease, aborts what is still running (only this shard's requests)."""
    if not lines:
        return
    owner: dict[str, LineChoices] = {}  # candidate request id -> its line
    handles: list[GenerationHandle] = []

    def submit(candidates: list[tuple[LineChoices, GenerationRequest]]) -> None:
        if candidates:
            owner.update((request.request_id, line) for line, request in candidates)
            handles.append(lm.submit([request for _, request in candidates]))

    submit([(line, request) for line in lines for request in line.first_requests()])
    wait = min(0.5, heartbeat.interval)
    try:
        while not all(h.done for h in handles):
            if heartbeat.should_stop():
                return
            finished: list[GenerationResult] = []
            for i, handle in enumerate(h for h in handles if not h.done):
                finished += handle.results(timeout=wait if i == 0 else 0)  # one waits, the rest are polled
            more: list[tuple[LineChoices, GenerationRequest]] = []
            rows = []
            for result in finished:
                line = owner.pop(result.request_id, None)
                if line is None:
                    continue
                more += [(line, request) for request in line.take(result)]
                if line.done:
                    rows.append(writer.line_row(line))
            submit(more)
            # What finished together is stored together: one transaction per engine step, not per request.
            writer.store([row for row in rows if row is not None])
    finally:
        for handle in handles:
            handle.abort()
