"""``POST /feedback``: the true label for an earlier prediction, joined through its signed id.

JSON (``prediction_id``, ``label``), or multipart/form-data with the same two fields and the image
as ``file``: where the operator enabled ``feedback_keep_images``, that image (it must be the one
the prediction classified: its SHA-256 is in the signed id) is kept with its label, EXIF-stripped,
for ``catsdogs data ingest --feedback``.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from catsdogs.feedback.store import FeedbackStoreError, PredictionClaim
from catsdogs.preprocessing import ImageError, decode_image, store_jpeg
from catsdogs.serve.errors import ApiError, image_error
from catsdogs.serve.feedback import InvalidTokenError
from catsdogs.serve.schemas import ErrorBody, FeedbackIn, FeedbackOut
from catsdogs.serve.security import require_api_key
from catsdogs.serve.service import Service, ServiceDep
from catsdogs.serve.uploads import admit_upload, is_multipart, read_multipart, upload_budget

logger = logging.getLogger(__name__)
router = APIRouter(tags=["feedback"], dependencies=[Depends(require_api_key)])

_TEXT_FIELDS = ("prediction_id", "label")
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": FeedbackIn.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": list(_TEXT_FIELDS),
                    "properties": {
                        "prediction_id": {"type": "string"},
                        "label": {"type": "string"},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    responses={
        400: {"model": ErrorBody},
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
        422: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
    openapi_extra=_BODY,
    summary="Report the true label of a prediction (feeds live accuracy; optionally with the image)",
)
async def feedback(request: Request, service: ServiceDep) -> FeedbackOut:
    if is_multipart(request):
        body, upload = await _read_form(request, service)
    else:
        body, upload = _parse(await request.body()), None
    classes = service.settings.classes
    if body.label not in classes:
        raise ApiError(422, "unknown_label", f"label must be one of {list(classes)}")
    try:
        claim = service.signer.verify(body.prediction_id)
    except InvalidTokenError as exc:
        raise ApiError(400, "invalid_prediction_id", str(exc)) from None
    image = await _image_to_keep(service, claim, upload)
    # Expired images are purged when one is kept (and before every export), not on every label.
    retention = timedelta(days=service.settings.feedback_image_retention_days) if image else None
    try:  # a database round trip: off the event loop
        first = await run_in_threadpool(
            service.feedback_log.record, claim, label=body.label, image=image, image_retention=retention
        )
    except FeedbackStoreError as exc:
        logger.error("feedback not recorded: %s", exc)
        raise ApiError(
            503, "feedback_store_unavailable", "feedback cannot be recorded now; retry later"
        ) from None
    if not first:
        raise ApiError(409, "duplicate_feedback", "this prediction already received feedback")
    if service.shadow is not None:
        await run_in_threadpool(_count_shadow, service, claim.nonce, body.label)
    return _count(service, request, claim, body.label, image_kept=image is not None)


def _count_shadow(service: Service, nonce: str, label: str) -> None:
    """Both models' live accuracy on shadowed requests (the label was recorded either way)."""
    try:
        shadow = service.feedback_log.shadow_of(nonce)
    except FeedbackStoreError as exc:
        logger.warning("shadow accuracy not counted: %s", exc)
        return
    if shadow is not None:
        for model, answer in (("champion", shadow.champion_label), ("challenger", shadow.challenger_label)):
            service.metrics.shadow_feedback.labels(model, str(answer == label).lower()).inc()


def _parse(raw: bytes) -> FeedbackIn:
    try:
        return FeedbackIn.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _read_form(request: Request, service: Service) -> tuple[FeedbackIn, bytes | None]:
    """The form's two text fields and its ``file`` (bounded like a ``/predict`` upload)."""
    limit = service.settings.max_upload_bytes
    with admit_upload(request, service, limit) as ticket:
        parts = await read_multipart(
            request,
            fields={*_TEXT_FIELDS, "file"},
            part_limit=limit,
            body_limit=limit,
            max_parts=len(_TEXT_FIELDS) + 1,
            fail_fast=True,
            budget=upload_budget(service, ticket),
        )
    fields = {part.name: part for part in parts}
    text = {name: fields[name].data.decode("utf-8", "replace") for name in _TEXT_FIELDS if name in fields}
    try:
        body = FeedbackIn.model_validate(text)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    upload = fields.get("file")
    return body, bytes(upload.data) if upload is not None and upload.data else None


async def _image_to_keep(service: Service, claim: PredictionClaim, upload: bytes | None) -> bytes | None:
    """The stripped image to store with the label, or ``None`` when images are not kept (off, none
    sent, or an id issued while they were not kept)."""
    if upload is None or not service.settings.feedback_keep_images or claim.image_sha256 is None:
        return None
    if hashlib.sha256(upload).hexdigest() != claim.image_sha256:
        raise ApiError(422, "image_mismatch", "the image is not the one this prediction classified")
    settings = service.settings

    def strip() -> bytes:
        decoded = decode_image(
            upload,
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
            draft_size=settings.store_max_side,
            max_decode_bytes=settings.max_decode_bytes,
        )
        return store_jpeg(decoded, max_side=settings.store_max_side)

    try:
        return await run_in_threadpool(strip)
    except ImageError as exc:
        raise image_error(exc) from None


def _count(
    service: Service, request: Request, claim: PredictionClaim, label: str, *, image_kept: bool
) -> FeedbackOut:
    correct = claim.label == label
    service.live.add(correct)
    service.metrics.feedback.labels(str(correct).lower(), claim.model_version).inc()
    accuracy = service.live.accuracy
    if accuracy is not None:
        service.metrics.live_accuracy.set(accuracy)
    request.state.log.update(
        model_version=claim.model_version, feedback_correct=correct, image_kept=image_kept
    )
    return FeedbackOut(
        correct=correct,
        predicted=claim.label,
        label=label,
        model_version=claim.model_version,
        live_accuracy=accuracy,
        image_kept=image_kept,
    )
