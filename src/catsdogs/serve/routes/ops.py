"""Operations: ``/health``, ``/ready``, ``/model-info``, ``/stats``, ``/metrics``, ``/samples``.

Where the model comes from (registry URL, version tags, cache paths, load errors) is shown only to
callers who may see details (:func:`~catsdogs.serve.security.sees_details`); the public ingress routes
none of these but ``/health``, ``/ready`` and ``/samples``.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from catsdogs.serve.errors import ApiError
from catsdogs.serve.schemas import ErrorBody, HealthOut, ModelInfoOut, ReadyOut, SamplesOut, StatsOut
from catsdogs.serve.security import sees_details
from catsdogs.serve.service import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthOut, summary="The process is alive")
async def health() -> HealthOut:
    return HealthOut()


@router.get(
    "/ready",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut}},
    summary="A model is loaded and warmed up (503 before)",
)
async def ready(request: Request, service: ServiceDep) -> Response:
    model = service.store.current
    if model is None:
        detail = service.store.last_error or "the model is loading"
        if service.store.last_error and not sees_details(request):
            detail = "the model could not be loaded yet (the service log says why)"
        return JSONResponse(
            ReadyOut(ready=False, detail=detail).model_dump(), status_code=503, headers={"Retry-After": "2"}
        )
    return JSONResponse(ReadyOut(ready=True, model_version=model.version).model_dump())


@router.get(
    "/model-info",
    response_model=ModelInfoOut,
    responses={503: {"model": ErrorBody}},
    summary="What is served: name, version, alias, metrics, preprocessing, input shape",
)
async def model_info(request: Request, service: ServiceDep) -> ModelInfoOut:
    model = service.predictor.model()
    resolved = model.resolved
    info = ModelInfoOut(
        name=resolved.name,
        version=model.version,
        alias=resolved.alias,
        architecture=model.architecture,
        uri=resolved.uri,
        source=resolved.source,
        note=resolved.note,
        loaded_at=model.loaded_at,
        metrics=resolved.bundle.metrics,
        registry=resolved.registry,
        preprocessing=model.config.model_dump(mode="json"),
        input_shape=model.input_shape,
        onnx_file=resolved.bundle.onnx_path(int8=service.settings.serve_int8).name,
        samples=[path.name for path, _ in resolved.bundle.samples()],
    )
    if sees_details(request):
        return info
    return info.model_copy(update={"uri": None, "note": None, "registry": None})


@router.get(
    "/stats", response_model=StatsOut, summary="Counts by class, mean confidence, latency percentiles"
)
async def stats(service: ServiceDep) -> StatsOut:
    return StatsOut(
        pid=os.getpid(),
        queue_depth=service.predictor.in_flight,
        live_accuracy=service.live.accuracy,
        feedback_count=service.live.size,
        **service.stats.snapshot(),  # type: ignore[arg-type]
    )


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    service.drift.publish_now()  # drift scores as of this scrape (the drift thread only updates)
    body, content_type = service.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/samples", response_model=SamplesOut, summary="Names of the served bundle's sample images")
async def samples(service: ServiceDep) -> SamplesOut:
    model = service.predictor.model()
    return SamplesOut(samples=[path.name for path, _ in model.resolved.bundle.samples()])


@router.get(
    "/samples/{name}",
    responses={404: {"model": ErrorBody}},
    response_class=FileResponse,
    summary="A labelled sample image shipped in the served bundle (used by `catsdogs smoke`)",
)
async def sample(name: str, service: ServiceDep) -> FileResponse:
    model = service.predictor.model()
    for path, _label in model.resolved.bundle.samples():
        if path.name == name:
            return FileResponse(path)
    raise ApiError(404, "not_found", f"the served bundle has no sample named {name!r}")
