"""The upload page at ``/`` in a real browser: Debian's Chromium, driven by Playwright, against a real
``catsdogs serve`` on loopback. Every request the page makes is recorded, and any request off the
service's own origin is blocked, so the page is shown to work with no CDN and no network."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from support import require_tool

pytestmark = pytest.mark.integration
ANSWER = re.compile(r"(\w+) \((\d+\.\d) %\)")  # no named groups: expect() hands it to JavaScript
PROBABILITY = re.compile(r"(\w+): (\d+\.\d) %")


def _origin(url: str) -> str:
    parts = urlsplit(url.removeprefix("blob:"))  # the preview is a blob: URL of the page's own origin
    return f"{parts.scheme}://{parts.netloc}"


class OriginGuard:
    """Records every request of a page and aborts those that leave ``origin``."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin, self.requests, self.blocked = origin, [], []
        page.on("request", lambda request: self.requests.append(request.url))
        page.route("**/*", self._route)

    def _route(self, route: Route) -> None:
        if _origin(route.request.url) == self.origin:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def foreign(self) -> list[str]:
        return [url for url in self.requests if _origin(url) != self.origin]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_tool("chromium")  # Debian's package; Playwright never downloads a browser here
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], tuple[Page, OriginGuard]]]:
    pages: list[Page] = []

    def open_(url: str) -> tuple[Page, OriginGuard]:
        page = browser.new_page()
        pages.append(page)
        guard = OriginGuard(page, _origin(url))
        page.goto(f"{url}/")
        return page, guard

    yield open_
    for page in pages:
        page.close()


def _upload(page: Page, name: str, mime: str, data: bytes) -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def test_page_shows_the_label_and_confidence_the_api_gives_for_a_cat_photo(
    start_server, bundle_a: Path, cat_jpeg: bytes, open_page
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a)})
    expected = httpx.post(f"{server.url}/predict", files={"file": ("cat.jpg", cat_jpeg)}).json()
    page, guard = open_page(server.url)
    _upload(page, "cat.jpg", "image/jpeg", cat_jpeg)

    answer = page.locator("#answer")
    expect(answer).to_have_text(ANSWER)
    shown = ANSWER.search(answer.inner_text())
    assert shown is not None and shown[1] == expected["label"]
    assert abs(float(shown[2]) - 100 * expected["confidence"]) <= 0.05 + 1e-9
    rows = {m[1]: float(m[2]) for m in PROBABILITY.finditer(page.locator("#probs").inner_text())}
    assert rows.keys() == expected["probabilities"].keys()
    for label, p in expected["probabilities"].items():
        assert abs(rows[label] - 100 * p) <= 0.05 + 1e-9
    expect(page.locator("#preview")).to_be_visible()
    assert page.locator("#answer.error").count() == 0

    assert f"{server.url}/predict" in guard.requests
    assert guard.foreign() == [] and guard.blocked == []  # no CDN: nothing left the service's origin


def test_a_text_file_gets_a_readable_sentence_not_a_json_body(
    start_server, bundle_a: Path, open_page
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a)})
    text = b"shopping list: cat food, dog food\n"
    refused = httpx.post(f"{server.url}/predict", files={"file": ("notes.txt", text, "text/plain")})
    assert refused.status_code == 415
    page, guard = open_page(server.url)
    _upload(page, "notes.txt", "text/plain", text)

    error = page.locator("#answer.error")
    expect(error).to_be_visible()
    message = error.inner_text()
    assert message == f"Not classified: {refused.json()['detail']}"
    assert not re.search(r"[{}\[\]]|Traceback|not_an_image|415", message)
    expect(page.locator("#preview")).to_be_hidden()  # no broken-image icon for a text file
    assert guard.foreign() == [] and guard.blocked == []


def test_with_api_keys_the_page_asks_for_the_key_and_then_answers(
    start_server, bundle_a: Path, cat_jpeg: bytes, open_page
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_API_KEYS": "demo-key-1"})
    page, guard = open_page(server.url)
    _upload(page, "cat.jpg", "image/jpeg", cat_jpeg)
    expect(page.locator("#answer.error")).to_have_text(re.compile(r"^Not classified: an API key is required"))
    expect(page.locator("#key")).to_be_visible()  # the key field opens by itself

    page.fill("#key", "demo-key-1")
    _upload(page, "cat.jpg", "image/jpeg", cat_jpeg)
    expect(page.locator("#answer")).to_have_text(ANSWER)
    assert page.locator("#answer.error").count() == 0
    assert guard.foreign() == [] and guard.blocked == []


def test_the_page_shows_where_the_model_looked_and_says_when_it_is_no_pet(
    start_server, trust_run, dataset_zip: Path, open_page
) -> None:
    """A model with activation maps and an unknown detector: the page shows the /explain overlay
    instead of the plain preview, and a photo of coffee is "not a cat or a dog"."""
    from support import dataset_photos
    from unfamiliar_images import skimage_photos

    result, _ = trust_run
    server = start_server({"CATSDOGS_MODEL_URI": str(result.bundle_dir)})
    page, guard = open_page(server.url)
    _upload(page, "dog.jpg", "image/jpeg", dataset_photos(dataset_zip, "dog", 1, offset=2000)[0])
    expect(page.locator("#answer")).to_have_text(ANSWER)
    expect(page.locator("#overlay")).to_be_visible()
    expect(page.locator("#why")).to_be_visible()
    assert page.locator("#overlay").get_attribute("src").startswith("data:image/png;base64,")
    assert page.locator("#preview").is_hidden()
    assert f"{server.url}/explain" in guard.requests and f"{server.url}/predict" not in guard.requests

    _upload(page, "coffee.png", "image/png", skimage_photos()["coffee.png"])
    expect(page.locator("#answer")).to_contain_text("not a cat or a dog")
    assert guard.foreign() == [] and guard.blocked == []
