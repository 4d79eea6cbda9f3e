"""Replay is refused across workers, replicas and restarts: the feedback store they share records a
prediction once (409 the second time), on SQLite by default and on PostgreSQL by URL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import catsdogs.feedback
from catsdogs.feedback.store import VERSION_TABLE, FeedbackStore, FeedbackStoreError, store_url
from catsdogs.serve.feedback import PredictionClaim
from catsdogs.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SOURCE_MIGRATIONS = Path(catsdogs.feedback.__file__).parent / "migrations"
SECRET = "k1:replicas-share-this-0123456789"


def _claim(nonce: str = "n1") -> PredictionClaim:
    return PredictionClaim(
        model_version="3", label="cat", confidence=0.9, issued_at=1.8e9, nonce=nonce, kid="k1"
    )


def _replay_is_refused_by_a_second_service(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, url: str
) -> None:
    first = make_client(feedback_secrets=SECRET, feedback_store_url=url)
    second = make_client(feedback_secrets=SECRET, feedback_store_url=url)
    prediction_id = first.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).json()["prediction_id"]
    body = {"prediction_id": prediction_id, "label": "dog"}
    assert second.post("/feedback", json=body).status_code == 200
    again = first.post("/feedback", json=body)
    assert again.status_code == 409
    assert again.json()["error"] == "duplicate_feedback"


def test_two_services_sharing_a_sqlite_store_accept_an_id_once(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    _replay_is_refused_by_a_second_service(make_client, cat_jpeg, f"sqlite:///{tmp_path / 'shared.db'}")


def test_two_services_sharing_a_postgresql_store_accept_an_id_once(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, postgres_url: str
) -> None:
    _replay_is_refused_by_a_second_service(make_client, cat_jpeg, postgres_url)


def test_the_log_keeps_what_retraining_needs(postgres_url: str) -> None:
    store = FeedbackStore(store_url(Settings(feedback_store_url=postgres_url)))
    store.open()
    try:
        assert store.record(_claim(), label="dog") is True
        assert store.record(_claim(), label="cat") is False
        with sa.create_engine(postgres_url).connect() as connection:
            rows = connection.execute(sa.text("SELECT * FROM feedback")).mappings().all()
            version = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    finally:
        store.close()
    assert version == "0003"
    assert len(rows) == 1
    row = rows[0]
    assert (row["nonce"], row["kid"], row["model_version"], row["predicted"], row["label"]) == (
        "n1",
        "k1",
        "3",
        "cat",
        "dog",
    )
    assert row["correct"] is False
    assert row["predicted_at"].timestamp() == 1.8e9
    assert row["received_at"].tzinfo is not None


_OPEN_AND_RECORD = """
import sys
from catsdogs.serve.feedback import PredictionClaim
from catsdogs.feedback.store import FeedbackStore, store_url
from catsdogs.settings import Settings

store = FeedbackStore(store_url(Settings(feedback_store_url=sys.argv[1])))
store.open()
claim = PredictionClaim(model_version="3", label="cat", confidence=0.9, issued_at=1.8e9, nonce="n1", kid="k1")
print(store.record(claim, label="cat"))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_starting_together_migrate_once_and_record_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    workers = [  # like the workers of a pod (or replicas) starting at once on a fresh database
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_RECORD, url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    results = [worker.communicate(timeout=60) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err.decode()[-2000:] for _, err in results]
    assert sorted(out.decode().strip() for out, _ in results) == ["False", "False", "True"]


def test_the_default_store_is_a_wal_sqlite_file_in_the_cache_dir(settings: Settings) -> None:
    store = FeedbackStore(store_url(settings))
    store.open()
    store.close()
    path = settings.cache_dir / "feedback.sqlite3"
    assert path.is_file()
    with sa.create_engine(f"sqlite:///{path}").connect() as connection:
        assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


def test_an_in_memory_store_works_from_any_thread() -> None:
    store = FeedbackStore(store_url(Settings(feedback_store_url="sqlite://")))
    store.open()
    try:
        with ThreadPoolExecutor(2) as pool:  # /feedback writes from the thread pool
            assert list(
                pool.map(lambda nonce: store.record(_claim(nonce), label="cat"), ["a", "b", "a"])
            ) == [
                True,
                True,
                False,
            ]
    finally:
        store.close()


def test_a_plain_postgresql_url_uses_psycopg_3() -> None:
    url = store_url(Settings(feedback_store_url="postgresql://u:p@db:5432/feedback"))
    assert url.drivername == "postgresql+psycopg"


def test_an_unreachable_store_answers_503_not_500(
    make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    client = make_client(feedback_secrets=SECRET)
    prediction_id = client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).json()["prediction_id"]
    client.app.state.service.feedback_log.close()  # as if the database went away
    response = client.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"})
    assert response.status_code == 503
    assert response.json()["error"] == "feedback_store_unavailable"


def test_a_bad_store_url_stops_the_start(tmp_path: Path) -> None:
    unusable = tmp_path / "a-file"
    unusable.write_text("")
    store = FeedbackStore(store_url(Settings(feedback_store_url=f"sqlite:///{unusable}/under/a/file.db")))
    with pytest.raises(FeedbackStoreError, match="is unusable"):
        store.open()


@pytest.mark.integration
def test_replay_is_refused_after_a_restart(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes, tmp_path: Path
) -> None:
    env = {
        "CATSDOGS_MODEL_URI": str(bundle_a),
        "CATSDOGS_FEEDBACK_SECRETS": SECRET,
        "CATSDOGS_FEEDBACK_STORE_URL": f"sqlite:///{tmp_path / 'feedback.db'}",
    }
    before = start_server(env)
    prediction_id = httpx.post(f"{before.url}/predict", files={"file": ("c.jpg", cat_jpeg)}).json()[
        "prediction_id"
    ]
    body = {"prediction_id": prediction_id, "label": "cat"}
    assert httpx.post(f"{before.url}/feedback", json=body).status_code == 200
    before.stop()
    after = start_server(env)  # a new process: nothing of the first one's memory survives
    assert httpx.post(f"{after.url}/feedback", json=body).status_code == 409


def test_the_migrations_ship_in_the_wheel(tmp_path: Path) -> None:
    """Package data: alembic needs env.py and versions/*.py next to each other in the installed package."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("catsdogs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = "catsdogs/feedback/migrations/"
    shipped = {path.relative_to(SOURCE_MIGRATIONS).as_posix() for path in SOURCE_MIGRATIONS.rglob("*.py")}
    assert {"env.py", "versions/0001_feedback_log.py", "versions/0003_shadow_predictions.py"} <= shipped
    assert {f"{migrations}{name}" for name in shipped} <= names
