"""Ratings of a batch's lines (the feedback loop): one row per (batch, custom_id); a later rating replaces it.

db/models.py imports this module at its end, so that Base.metadata (and Alembic) holds the table.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import Base, RequestOutcome, RequestResult, Shard
from db.session import dialect_insert

ID_CHUNK = 1000  # custom_ids per IN (...) / rows per INSERT: far below PostgreSQL's 65,535 parameters

# rating as given -> score (ELSE 0 fails BETWEEN): the CHECK keeps every row to the mapping of rating_score.
RATING_SCORE_SQL = ("score BETWEEN 1 AND 5 AND score = CASE rating WHEN 'good' THEN 5 WHEN 'bad' THEN 1 "
                    "WHEN '1' THEN 1 WHEN '2' THEN 2 WHEN '3' THEN 3 WHEN '4' THEN 4 WHEN '5' THEN 5 ELSE 0 END")


class BatchFeedback(Base):
    """A rater's verdict on one request of a batch, with an optional better answer."""

    __tablename__ = "batch_feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # kept when re-rated
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_batch_feedback_tenant_id_tenants"))
    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_batch_feedback_batch_id_batches"))
    custom_id: Mapped[str] = mapped_column(String(512))
    rating: Mapped[str] = mapped_column(String(4))  # as given: "good", "bad" or "1".."5"
    score: Mapped[int] = mapped_column(Integer)  # 1-5: good 5, bad 1, a number itself
    corrected: Mapped[str | None] = mapped_column(Text)  # the rater's better answer
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)  # the first rating of this line
    updated_at: Mapped[int] = mapped_column(BigInteger)  # the latest
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_batch_feedback_batch_custom_id"),
        CheckConstraint(RATING_SCORE_SQL, name="ck_batch_feedback_rating_score"),
    )


@dataclass(frozen=True)
class NewRating:
    """A rating to store for one custom_id of the batch."""

    custom_id: str
    rating: str  # "good", "bad" or "1".."5"
    score: int  # its 1-5 score (genq.feedback_export.rating_score)
    corrected: str | None
    comment: str | None


@dataclass(frozen=True)
class RatedResult:
    """A stored rating joined with its request's result: what an export reads."""

    custom_id: str
    score: int
    corrected: str | None
    line_number: int  # 1-based line of the request in the batch's input file
    succeeded: bool  # False: output_line is an error line
    output_line: dict[str, Any]  # the OpenAI output (or error) line
    input_key: str  # storage key of the shard file holding the request's input line


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[start:start + ID_CHUNK] for start in range(0, len(items), ID_CHUNK)]


def known_custom_ids(*, session: Session, batch_id: str, custom_ids: Collection[str]) -> set[str]:
    """Those of custom_ids that have a result (succeeded or failed) in the batch."""
    known: set[str] = set()
    for chunk in _chunks(list(set(custom_ids))):
        known.update(session.scalars(select(RequestResult.custom_id).where(
            RequestResult.batch_id == batch_id, RequestResult.custom_id.in_(chunk))))
    return known


def upsert_ratings(*, session: Session, tenant_id: str, batch_id: str,
                   ratings: list[NewRating]) -> list[BatchFeedback]:
    """Stores ratings, each replacing an earlier one of its custom_id (within ratings too: the last wins);
    returns the stored rows, one per custom_id in order of first appearance. The caller commits.

    INSERT ... ON CONFLICT (batch_id, custom_id) DO UPDATE: a re-rating keeps the row's id and created_at."""
    latest = {rating.custom_id: rating for rating in ratings}  # dict order: first appearance, value: last
    now = int(time.time())
    stored: dict[str, BatchFeedback] = {}
    for chunk in _chunks(list(latest.values())):
        statement = dialect_insert(session, BatchFeedback).values([
            {"tenant_id": tenant_id, "batch_id": batch_id, "custom_id": r.custom_id, "rating": r.rating,
             "score": r.score, "corrected": r.corrected, "comment": r.comment, "created_at": now, "updated_at": now}
            for r in chunk])
        replaced = {name: statement.excluded[name] for name in ("rating", "score", "corrected", "comment",
                                                               "updated_at")}
        statement = statement.on_conflict_do_update(index_elements=["batch_id", "custom_id"], set_=replaced)
        rows = session.scalars(statement.returning(BatchFeedback), execution_options={"populate_existing": True})
        stored.update((row.custom_id, row) for row in rows)
    return [stored[custom_id] for custom_id in latest]


def list_ratings(*, session: Session, tenant_id: str, batch_id: str, after_id: int | None = None,
                 limit: int = 20) -> tuple[list[BatchFeedback], bool]:
    """A page of the batch's ratings in the order first rated (id), after the row id after_id; and whether
    more follow."""
    query = select(BatchFeedback).where(BatchFeedback.tenant_id == tenant_id, BatchFeedback.batch_id == batch_id)
    if after_id is not None:
        query = query.where(BatchFeedback.id > after_id)
    rows = list(session.scalars(query.order_by(BatchFeedback.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def ratings_with_results(*, session: Session, tenant_id: str, batch_id: str) -> list[RatedResult]:
    """Every rating of the batch with its request's result and shard input, in input-line order.

    One query: ratings join request_results on (batch_id, custom_id), and shards on the result's shard."""
    rows = session.execute(
        select(BatchFeedback.custom_id, BatchFeedback.score, BatchFeedback.corrected, RequestResult.line_number,
               RequestResult.outcome, RequestResult.output_line, Shard.input_key)
        .join(RequestResult, (RequestResult.batch_id == BatchFeedback.batch_id)
              & (RequestResult.custom_id == BatchFeedback.custom_id))
        .join(Shard, Shard.id == RequestResult.shard_id)
        .where(BatchFeedback.tenant_id == tenant_id, BatchFeedback.batch_id == batch_id)
        .order_by(RequestResult.line_number))
    return [RatedResult(custom_id=row.custom_id, score=row.score, corrected=row.corrected,
                        line_number=row.line_number, succeeded=row.outcome == RequestOutcome.SUCCEEDED,
                        output_line=row.output_line, input_key=row.input_key) for row in rows]
