"""``POST /feedback``: the true label for an earlier prediction, joined through its signed id."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from catsdogs.serve.errors import ApiError
from catsdogs.serve.feedback import InvalidTokenError
from catsdogs.serve.schemas import ErrorBody, FeedbackIn, FeedbackOut
from catsdogs.serve.security import require_api_key
from catsdogs.serve.service import ServiceDep

router = APIRouter(tags=["feedback"], dependencies=[Depends(require_api_key)])


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    responses={400: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}},
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
    correct = service.live.add(claim, body.label)
    if correct is None:
        raise ApiError(409, "duplicate_feedback", "this prediction already received feedback")
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
