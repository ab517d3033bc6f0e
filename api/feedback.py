"""/v1/batches/{id}/feedback (genq extension): rate a batch's lines, list the ratings, export a fine-tune file.

A rating is "good", "bad" or an integer 1-5, with an optional corrected answer and comment; a later
rating of the same line replaces the earlier one. Only lines with a result (succeeded or failed) can
be rated: a failed line's correction is still a supervised example. The export turns the ratings
into an OpenAI DPO or supervised training file (purpose "fine-tune") for POST /v1/fine_tuning/jobs.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy.orm import Session

from api.auth import TenantDep
from api.batch_input import MAX_CUSTOM_ID_CHARS
from api.batch_service import tenant_batch
from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import InvalidRequest
from api.feedback_files import export_feedback_file
from api.schemas import FileObject, _CursorPage
from api.uploads import MAX_FILENAME_CHARS
from db.feedback import BatchFeedback, NewRating, known_custom_ids, list_ratings, upsert_ratings
from db.models import Batch
from genq.feedback_export import ExportFormat, RatingError, correction_text, rating_score
from genq.json_guard import has_control_character

router = APIRouter(prefix="/v1", tags=["feedback"])
MAX_RATINGS_PER_CALL = 10_000  # the JSON body cap (api/input_guard.py, 1 MiB) usually binds first
MAX_CORRECTED_CHARS = 100_000
MAX_COMMENT_CHARS = 4_000
FEEDBACK_ID = re.compile(r"feedback_([0-9]{1,18})")


class Rating(BaseModel):
    """One line's rating in POST /v1/batches/{id}/feedback."""

    model_config = ConfigDict(extra="forbid")  # a misspelt "corected" must not be dropped silently

    custom_id: Annotated[str, Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)]
    rating: str | int  # "good" | "bad" | 1-5
    corrected: Annotated[str, Field(max_length=MAX_CORRECTED_CHARS)] | None = None  # blank: no correction
    comment: Annotated[str, Field(max_length=MAX_COMMENT_CHARS)] | None = None

    @field_validator("rating", mode="before")
    @classmethod
    def _known_rating(cls, value: Any) -> Any:
        try:
            rating_score(value)
        except RatingError as exc:
            raise PydanticCustomError("invalid_rating", str(exc)) from None
        return value

    def new_rating(self) -> NewRating:
        return NewRating(custom_id=self.custom_id, rating=str(self.rating), score=rating_score(self.rating),
                         corrected=correction_text(self.corrected), comment=self.comment or None)


class CreateFeedbackRequest(BaseModel):
    ratings: Annotated[list[Rating], Field(min_length=1, max_length=MAX_RATINGS_PER_CALL)]


class ExportFeedbackRequest(BaseModel):
    format: ExportFormat  # "dpo" | "supervised"
    filename: Annotated[str, Field(min_length=1, max_length=MAX_FILENAME_CHARS)] | None = None

    @field_validator("filename")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and has_control_character(value):
            raise PydanticCustomError("invalid_filename", "must not hold a control character")
        return value


class FeedbackObject(BaseModel):
    id: str  # "feedback_<n>", the cursor for after=
    object: Literal["batch.feedback"] = "batch.feedback"
    batch_id: str
    custom_id: str
    rating: str | int  # as given: "good", "bad" or 1-5
    score: int  # 1-5: good 5, bad 1
    corrected: str | None = None
    comment: str | None = None
    created_at: int  # the line's first rating
    updated_at: int  # its latest

    @classmethod
    def from_row(cls, row: BatchFeedback) -> FeedbackObject:
        return cls(id=f"feedback_{row.id}", batch_id=row.batch_id, custom_id=row.custom_id,
                   rating=int(row.rating) if row.rating.isdigit() else row.rating, score=row.score,
                   corrected=row.corrected, comment=row.comment, created_at=row.created_at, updated_at=row.updated_at)


class FeedbackList(_CursorPage):
    data: list[FeedbackObject]


def owned_batch(batch_id: str, tenant_id: TenantDep, session: SessionDep) -> Batch:
    """The tenant's batch of the path, or 404 (as for one that exists nowhere) before the body is read."""
    return tenant_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)


OwnedBatch = Annotated[Batch, Depends(owned_batch)]


def _after_id(after: str | None) -> int | None:
    if after is None:
        return None
    match = FEEDBACK_ID.fullmatch(after)
    if match is None:
        raise InvalidRequest(f"after must be a feedback id such as 'feedback_12', not {after!r}.", param="after",
                             code="invalid_value")
    return int(match.group(1))


def _check_known(session: Session, batch: Batch, ratings: list[Rating]) -> None:
    """400 unknown_custom_id naming the first rating whose line has no result in the batch."""
    known = known_custom_ids(session=session, batch_id=batch.id, custom_ids=[r.custom_id for r in ratings])
    unknown = [(index, r.custom_id) for index, r in enumerate(ratings) if r.custom_id not in known]
    if unknown:
        index, custom_id = unknown[0]
        more = f" ({len(unknown) - 1} more rating(s) name unknown lines too)" if len(unknown) > 1 else ""
        raise InvalidRequest(f"Batch {batch.id} has no result for custom_id {custom_id!r}: it is not one of the "
                             f"batch's requests, or has not run yet{more}. Nothing was stored.",
                             param=f"ratings[{index}].custom_id", code="unknown_custom_id")


@router.post("/batches/{batch_id}/feedback", response_model=FeedbackList)
def rate(body: CreateFeedbackRequest, batch: OwnedBatch, session: SessionDep) -> FeedbackList:
    """Stores the ratings (all or none), each replacing an earlier rating of its line; returns them as stored."""
    _check_known(session, batch, body.ratings)
    rows = upsert_ratings(session=session, tenant_id=batch.tenant_id, batch_id=batch.id,
                          ratings=[rating.new_rating() for rating in body.ratings])
    session.commit()
    return FeedbackList(data=[FeedbackObject.from_row(row) for row in rows], has_more=False)


@router.get("/batches/{batch_id}/feedback", response_model=FeedbackList)
def list_feedback(batch: OwnedBatch, session: SessionDep, after: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20) -> FeedbackList:
    """A page of the batch's ratings, in the order their lines were first rated."""
    rows, has_more = list_ratings(session=session, tenant_id=batch.tenant_id, batch_id=batch.id,
                                  after_id=_after_id(after), limit=limit)
    return FeedbackList(data=[FeedbackObject.from_row(row) for row in rows], has_more=has_more)


@router.post("/batches/{batch_id}/feedback/export", response_model=FileObject)
def export(body: ExportFeedbackRequest, batch: OwnedBatch, session: SessionDep, settings: SettingsDep,
           store: StoreDep) -> FileObject:
    """A new fine-tune file of the batch's ratings in body.format; 400 no_feedback_pairs (saying why) if empty."""
    row = export_feedback_file(session=session, store=store, settings=settings, batch=batch,
                               export_format=body.format, filename=body.filename)
    return FileObject.from_row(row)
