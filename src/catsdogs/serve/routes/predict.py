"""``POST /predict`` and ``POST /predict/batch``."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from catsdogs.serve.admission import Ticket
from catsdogs.serve.errors import ApiError
from catsdogs.serve.predictor import Prediction
from catsdogs.serve.schemas import BatchItemOut, BatchOut, ErrorBody, ExplanationOut, PredictionOut
from catsdogs.serve.security import require_api_key
from catsdogs.serve.service import ServiceDep
from catsdogs.serve.uploads import (
    Part,
    admit_upload,
    is_multipart,
    read_multipart,
    read_raw,
    too_large,
    upload_budget,
)

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

_ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty upload, no `file` field, or a broken multipart body",
        401: "API key missing",
        403: "API key not valid",
        408: "the upload did not arrive within `upload_read_timeout_s`",
        413: "upload over the size limit, or larger than the worker's whole in-flight byte budget",
        415: "not an image",
        422: "an image that cannot be used (too many pixels or bytes to decode, truncated, too small)",
        503: "model not ready, or the worker's images or upload bytes are at their limit (see `Retry-After`)",
        504: "no answer within the request timeout",
    }.items()
}
_BINARY = {"type": "string", "format": "binary"}
_SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
            },
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                }
            },
        },
    }
}


def _json(model: PredictionOut | BatchOut | ExplanationOut) -> Response:
    # Serialized once by pydantic-core; the declared response_model still documents it.
    return Response(content=model.model_dump_json(), media_type="application/json")


@router.post(
    "/predict",
    response_model=PredictionOut,
    responses=_ERRORS,
    openapi_extra=_SINGLE_BODY,
    summary="Classify one image (multipart field `file`, or the raw image as the body)",
)
async def predict(request: Request, service: ServiceDep) -> Response:
    started = time.perf_counter()
    service.predictor.model()
    with admit_upload(request, service, service.settings.max_upload_bytes) as ticket:
        data = await _single_image(request, service, ticket)
        result = await service.predictor.predict(data, ticket=ticket, started=started)
    request.state.log.update(
        label=result.label, confidence=round(result.confidence, 4), model_version=result.model_version
    )
    return _json(PredictionOut(**asdict(result)))


async def _single_image(request: Request, service: ServiceDep, ticket: Ticket) -> bytes | memoryview:
    """The one image of a ``/predict`` or ``/explain`` request: multipart field ``file`` or the body."""
    limit = service.settings.max_upload_bytes
    ticket.reserve_images(1)
    budget = upload_budget(service, ticket)
    if not is_multipart(request):
        return (await read_raw(request, limit=limit, budget=budget)).data
    parts = await read_multipart(
        request,
        fields={"file"},
        part_limit=limit,
        body_limit=limit,
        max_parts=1,
        fail_fast=True,
        budget=budget,
    )
    if not parts:
        raise ApiError(400, "missing_file", "send the image in the multipart field `file`")
    return parts[0].data


@router.post(
    "/explain",
    response_model=ExplanationOut,
    responses={
        **_ERRORS,
        409: {"model": ErrorBody, "description": "the served model has no class activation maps"},
        200: {"content": {"image/png": {}}, "description": "the overlay itself with `Accept: image/png`"},
    },
    openapi_extra=_SINGLE_BODY,
    summary="Classify one image and show why: a heat map of the evidence for the predicted class",
)
async def explain(
    request: Request,
    service: ServiceDep,
    raw_map: Annotated[bool, Query(alias="map", description="Also return the raw evidence map.")] = False,
) -> Response:
    started = time.perf_counter()
    service.predictor.model()
    with admit_upload(request, service, service.settings.max_upload_bytes) as ticket:
        data = await _single_image(request, service, ticket)
        result = await service.predictor.explain(data, ticket=ticket, started=started)
    answer = result.prediction
    request.state.log.update(label=answer.label, model_version=answer.model_version, explain=True)
    png = result.overlay.png
    if "image/png" in request.headers.get("accept", ""):
        headers = {"X-Catsdogs-Label": answer.label, "X-Catsdogs-Model-Version": answer.model_version}
        return Response(content=png, media_type="image/png", headers=headers)
    values = [[round(float(v), 4) for v in row] for row in result.evidence] if raw_map else None
    return _json(
        ExplanationOut(
            **asdict(answer),
            overlay_png=base64.b64encode(png).decode("ascii"),
            overlay_size=list(result.overlay.size),
            evidence=values,
        )
    )


async def _one(service: ServiceDep, index: int, part: Part, ticket: Ticket, started: float) -> BatchItemOut:
    try:
        if part.too_large:
            raise too_large(service.settings.max_upload_bytes)
        result: Prediction = await service.predictor.predict(part.data, ticket=ticket, started=started)
    except ApiError as exc:
        if exc.code == "upload_too_large":
            service.metrics.rejected_inputs.labels(exc.code).inc()
        return BatchItemOut(index=index, filename=part.filename, error=exc.code, detail=exc.detail)
    fields = asdict(result)
    fields.pop("latency_ms")
    return BatchItemOut(index=index, filename=part.filename, **fields)


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    responses=_ERRORS,
    openapi_extra=_BATCH_BODY,
    summary="Classify up to `max_batch_images` images (multipart fields `files`), in order",
)
async def predict_batch(request: Request, service: ServiceDep) -> Response:
    started = time.perf_counter()
    settings, predictor = service.settings, service.predictor
    predictor.model()
    if not is_multipart(request):
        raise ApiError(400, "missing_file", "send the images as multipart/form-data fields `files`")
    with admit_upload(request, service, settings.max_batch_upload_bytes) as ticket:
        parts = await read_multipart(
            request,
            fields={"files", "file"},
            part_limit=settings.max_upload_bytes,
            body_limit=settings.max_batch_upload_bytes,
            max_parts=settings.max_batch_images,
            fail_fast=False,
            budget=upload_budget(service, ticket),
        )
        if not parts:
            raise ApiError(400, "missing_file", "send the images as multipart/form-data fields `files`")
        ticket.reserve_images(len(parts))
        results = await asyncio.gather(
            *(_one(service, i, part, ticket, started) for i, part in enumerate(parts))
        )
    failed = sum(item.error is not None for item in results)
    request.state.log.update(images=len(results), failed=failed)
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    return _json(BatchOut(results=results, count=len(results), failed=failed, latency_ms=latency_ms))
