"""The worker's admission budget: images and upload bytes, returned when the last holder is done."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from catsdogs.serve.admission import Admission
from catsdogs.serve.errors import ApiError


class Watched(Admission):
    """4 images, 100 bytes; records the gauge updates and the refusals it reports."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, int]] = []
        self.refusals = 0
        super().__init__(max_images=4, max_bytes=100, on_change=self._changed, on_refuse=self._refused)

    def _changed(self, images: int, nbytes: int) -> None:
        self.changes.append((images, nbytes))

    def _refused(self) -> None:
        self.refusals += 1


@pytest.fixture
def admission() -> Watched:
    return Watched()


def test_bytes_past_the_budget_are_503_and_a_request_larger_than_it_is_413(admission: Watched) -> None:
    first = admission.ticket(60)
    with pytest.raises(ApiError) as busy:
        admission.ticket(50)
    assert (busy.value.status, busy.value.code, busy.value.headers) == (
        503,
        "overloaded",
        {"Retry-After": "1"},
    )
    with pytest.raises(ApiError) as never:
        admission.ticket(101)
    assert (never.value.status, never.value.code) == (413, "upload_too_large")
    assert admission.bytes == 60 and admission.refusals == 1
    first.drop()
    assert admission.bytes == 0
    admission.ticket(100)


def test_a_body_of_unknown_length_grows_its_reservation_chunk_by_chunk(admission: Watched) -> None:
    other = admission.ticket(30)
    growing = admission.ticket()
    for received in (10, 40, 70):
        growing.reserve_bytes(received)
    assert admission.bytes == 100
    with pytest.raises(ApiError) as info:
        growing.reserve_bytes(71)
    assert info.value.status == 503
    other.drop()
    growing.reserve_bytes(71)
    assert admission.bytes == 71


def test_images_past_the_queue_limit_are_503(admission: Watched) -> None:
    with admission.ticket(10) as ticket:
        ticket.reserve_images(3)
        with pytest.raises(ApiError) as info:
            admission.ticket().reserve_images(2)
        assert info.value.status == 503
        assert admission.images == 3
    assert (admission.images, admission.bytes) == (0, 0)


def test_the_reservation_is_returned_when_the_last_job_ends_not_when_the_request_leaves(
    admission: Watched,
) -> None:
    with admission.ticket(40) as ticket:
        ticket.reserve_images(2)
        ticket.hold()  # two pool jobs start for the request
        ticket.hold()
    assert (admission.images, admission.bytes) == (2, 40)  # the request answered (say 504); jobs run on
    ticket.drop()
    assert (admission.images, admission.bytes) == (2, 40)
    ticket.drop()
    assert (admission.images, admission.bytes) == (0, 0)
    assert admission.changes[-1] == (0, 0)


def test_a_chunked_upload_past_the_in_flight_budget_is_refused_while_it_streams(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_inflight_bytes=1024 * 1024)
    chunks = (b"\0" * 65536 for _ in range(32))  # 2 MiB without a Content-Length
    response = client.post("/predict", content=chunks, headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert response.json()["error"] == "upload_too_large"
    assert "in-flight limit" in response.json()["detail"]
    assert client.app.state.service.predictor.admission.bytes == 0  # type: ignore[attr-defined]


def test_a_declared_batch_body_is_reserved_before_it_is_read(
    make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    client = make_client()
    predictor = client.app.state.service.predictor  # type: ignore[attr-defined]
    held = predictor.admit(predictor.admission.max_bytes - len(cat_jpeg))  # another request's upload
    response = client.post("/predict/batch", files=[("files", ("a.jpg", cat_jpeg))])
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    held.drop()
    assert client.post("/predict/batch", files=[("files", ("a.jpg", cat_jpeg))]).status_code == 200
