"""``POST /feedback``: the true label for an earlier prediction, joined through its signed id."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from catsdogs.feedback.store import FeedbackStoreError
from catsdogs.serve.errors import ApiError
from catsdogs.serve.feedback import InvalidTokenError
from catsdogs.serve.schemas import ErrorBody, FeedbackIn, FeedbackOut
from catsdogs.serve.security import require_api_key
from catsdogs.serve.service import ServiceDep

logger = logging.getLogger(__name__)
router = APIRouter(tags=["feedback"], dependencies=[Depends(require_api_key)])


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    responses={
        400: {"model": ErrorBody},
        409: {"model": ErrorBody},
        422: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
    summary="Report the true label of a prediction (feeds live accuracy)",
)
async def feedback(body: FeedbackIn, request: Request, service: ServiceDep) -> FeedbackOut:
    classes = service.settings.classes
    if body.label not in classes:
        raise ApiError(422, "unknown_label", f"label must be one of {list(classes)}")
    try:
        claim = service.signer.verify(body.prediction_id)
    except InvalidTokenError as exc:
        raise ApiError(400, "invalid_prediction_id", str(exc)) from None
    try:  # a database round trip: off the event loop
        first = await run_in_threadpool(service.feedback_log.record, claim, label=body.label)
    except FeedbackStoreError as exc:
        logger.error("feedback not recorded: %s", exc)
        raise ApiError(
            503, "feedback_store_unavailable", "feedback cannot be recorded now; retry later"
        ) from None
    if not first:
        raise ApiError(409, "duplicate_feedback", "this prediction already received feedback")
    correct = claim.label == body.label
    service.live.add(correct)
    service.metrics.feedback.labels(str(correct).lower(), claim.model_version).inc()
    accuracy = service.live.accuracy
    if accuracy is not None:
        service.metrics.live_accuracy.set(accuracy)
    request.state.log.update(model_version=claim.model_version, feedback_correct=correct)
    return FeedbackOut(
        correct=correct,
        predicted=claim.label,
        label=body.label,
        model_version=claim.model_version,
        live_accuracy=accuracy,
    )
