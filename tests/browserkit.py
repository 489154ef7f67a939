"""Headless Chromium for the web UI's tests (Debian's package, driven by
Playwright for Python): the ``browser`` and ``page`` fixtures, the skip where
it is missing, and where screenshots go.

A test module takes the fixtures by naming them (``browser = browserkit.browser``,
``page = browserkit.page``) and defines a ``server`` fixture whose ``url`` is
the server to open. Where /usr/bin/chromium is missing its tests skip
(``needs_chromium``); ``.ci/run`` refuses to start without it, so CI runs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium (`make install` "
    "installs it as root; or `apt-get install chromium`)")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--headless", "--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    """The UI of the module's ``server`` in a fresh 1200x800 context, once it
    says it is ready."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto(server.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    context.close()


def ask(page: Any, text: str) -> None:
    """Type ``text`` into the chat input and send it."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


_WATCH = """() => {
    window.__answer = [];
    new MutationObserver(() => {
        const body = [...document.querySelectorAll('#thread .msg.assistant .body')].pop();
        if (body) window.__answer.push({text: body.textContent,
                                        cited: !!body.querySelector('button.cite')});
    }).observe(document.getElementById('thread'),
               {childList: true, subtree: true, characterData: true});
}"""


def watch_answer(page: Any) -> None:
    """Record what the newest answer's body shows at every change, from now on."""
    page.evaluate(_WATCH)


def shown_before_citations(page: Any) -> list[str]:
    """The texts the newest answer showed (placeholder and repeats left out)
    before its citation buttons first appeared; see ``watch_answer``."""
    seen: list[dict[str, Any]] = page.evaluate("window.__answer")
    cited = next((i for i, s in enumerate(seen) if s["cited"]), len(seen))
    texts = [s["text"] for s in seen[:cited] if s["text"].strip() not in ("", "…")]
    return list(dict.fromkeys(texts))


class Artifacts:
    """A test module's screenshots and figures: ``test-artifacts/<name>/``
    (``LANNER_TEST_ARTIFACTS`` moves it), created when first written to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def folder(self) -> Path:
        folder = Path(os.environ.get("LANNER_TEST_ARTIFACTS", "test-artifacts")) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def shot(self, page: Any, name: str) -> None:
        """A full-page screenshot, ``<name>.png``."""
        page.screenshot(path=str(self.folder() / f"{name}.png"), full_page=True)
