"""The web UI end to end: real headless Chromium (Debian's package, driven by
Playwright for Python) against a real ``lanner serve`` process on the bundled
SmolLM2, served as two models like ``make run`` (``smollm2`` and
``smollm2-q4_1``).

One server process and one browser for the module; each test opens its own
browser context. The steps: the first load's size and time to the chat input;
a streamed answer, its token probabilities and a reload that keeps it;
stopping a generation; an uploaded document answered with a citation that
opens the passage (streamed in, and stopped mid-way); compare; an arena vote.
Screenshots of each step, and the load figures as JSON, go to
``test-artifacts/ui-e2e/`` (``LANNER_TEST_ARTIFACTS`` moves it).

Generation on a loaded 2-core machine is slow, so steps that wait for the
model allow minutes, and every answer is kept short (``max_tokens``,
temperature 0).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import browserkit
from browserkit import (
    Artifacts,
    ask,
    expect,
    needs_chromium,
    shown_before_citations,
    watch_answer,
)
from lanner import paths
from lanner.store import Store

pytestmark = [pytest.mark.slow, needs_chromium]
browser = browserkit.browser
page = browserkit.page
ARTIFACTS = Artifacts("ui-e2e")
shot = ARTIFACTS.shot

MODELS = ("smollm2", "smollm2-q4_1")
GENERATION_MS = 300_000
"""How long a step may wait for the model: minutes, for a 2-core machine under load."""
FIRST_LOAD_BYTES = 300_000
FIRST_LOAD_MS = 1000
DOC = "The Kelvsund lighthouse was built in 1871.\n"
OTHER_DOC = "The Marrow Street bakery opened in 1923 and sells rye bread.\n"
QUESTION = "When was the Kelvsund lighthouse built? End your answer with [1]."
"""With a one-passage collection and temperature 0, the 135M model answers this
with a citation (checked on the F16 build; it cites nothing without the hint)."""


class Served:
    """A ``lanner serve`` process on a free loopback port, with its own home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        env = {**os.environ, "LANNER_HOME": str(home), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        env.pop("LANNER_API_KEY", None)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lanner", "serve", *MODELS, "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lanner serve exited ({self.process.returncode}):\n"
                                   f"{self.log.read_text()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"lanner serve did not answer in {timeout_s} s:\n{self.log.read_text()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return dict(json.load(response))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("e2e-home"))
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def sampling(page: Any, *, temperature: str = "0", max_tokens: int = 24) -> None:
    """The Sampling controls: short, greedy answers unless told otherwise."""
    page.click("details summary")
    page.eval_on_selector(
        "#temperature",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", temperature)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#seed", "0")


def answered(page: Any) -> Any:
    """The last answer, once the model has finished it."""
    expect(page.locator("#send")).to_be_enabled(timeout=GENERATION_MS)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".meta")).not_to_be_empty()
    return answer


def conversation_id(page: Any) -> str:
    return str(page.evaluate("localStorage.getItem('lanner-conversation')"))


def logged_turns(server: Served, conversation: str, count: int) -> list[Any]:
    """The conversation's turns in the server's log, once ``count`` are written
    (the server writes each turn just after the answer ends)."""
    deadline = time.monotonic() + 30
    while True:
        with Store(paths.db_path(server.home)) as store:
            turns = store.turns(limit=None, conversation_id=conversation)
        if len(turns) >= count or time.monotonic() > deadline:
            return turns
        time.sleep(0.1)


# A rAF loop from navigation start: the first frame in which the chat input is
# laid out and visible, in ms since navigation start.
_WATCH_INPUT = """
(() => {
  const look = () => {
    const el = document.getElementById('prompt');
    if (el && el.checkVisibility() && el.getBoundingClientRect().height > 0) {
      window.__inputVisibleAt = performance.now();
    } else {
      requestAnimationFrame(look);
    }
  };
  requestAnimationFrame(look);
})();
"""


def _first_load(browser: Any, url: str) -> dict[str, float]:
    """One load in a fresh context (empty cache): bytes over the wire and times."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.add_init_script(_WATCH_INPUT)
    finished: list[Any] = []
    page.on("requestfinished", lambda request: finished.append(request))
    start = time.perf_counter()
    page.goto(url)
    expect(page.locator("#prompt")).to_be_visible()
    seen_s = time.perf_counter() - start
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.wait_for_function("window.__inputVisibleAt !== undefined")
    figures = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const all = [nav, ...performance.getEntriesByType('resource')];
        return {
            transfer_bytes: all.reduce((s, e) => s + e.transferSize, 0),
            body_bytes: all.reduce((s, e) => s + e.encodedBodySize, 0),
            entries: all.length,
            input_visible_ms: window.__inputVisibleAt,
            dom_content_loaded_ms: nav.domContentLoadedEventEnd,
            load_event_ms: nav.loadEventEnd,
        };
    }""")
    sizes = [r.sizes() for r in finished]
    figures["playwright_bytes"] = sum(s["responseBodySize"] + s["responseHeadersSize"]
                                      for s in sizes)
    figures["requests"] = len(finished)
    figures["wall_input_visible_ms"] = seen_s * 1000
    context.close()
    return dict(figures)


def test_first_load_is_under_300_kb_and_shows_the_input_within_1_s(
    browser: Any, server: Served,
) -> None:
    _first_load(browser, server.url + "/")  # warm-up: the server's first requests, disk cache
    runs = [_first_load(browser, server.url + "/") for _ in range(3)]
    (ARTIFACTS.folder() / "first-load.json").write_text(json.dumps(runs, indent=2))
    print("first load:", json.dumps(runs))
    for run in runs:
        # everything the page fetched until it was ready, API calls included
        assert run["requests"] >= 10
        assert 0 < run["transfer_bytes"] < FIRST_LOAD_BYTES
        assert 0 < run["playwright_bytes"] < FIRST_LOAD_BYTES
    assert min(r["input_visible_ms"] for r in runs) < FIRST_LOAD_MS
    assert sorted(r["input_visible_ms"] for r in runs)[1] < FIRST_LOAD_MS  # the median


# Every distinct text the answer being written shows while the model streams.
_RECORD_PARTIALS = """() => {
  window.__partials = [];
  const thread = document.getElementById('thread');
  new MutationObserver(() => {
    if (!document.getElementById('send').disabled) return;
    const body = thread.querySelector('.msg.assistant:last-child .body');
    const text = body ? body.textContent : '';
    const seen = window.__partials;
    if (text && text !== '…' && text !== seen[seen.length - 1]) seen.push(text);
  }).observe(thread, { childList: true, subtree: true, characterData: true });
}"""


def test_an_answer_streams_in_shows_token_probabilities_and_survives_a_reload(
    page: Any, server: Served,
) -> None:
    sampling(page, max_tokens=24)
    page.evaluate(_RECORD_PARTIALS)
    ask(page, "What is the capital of France?")
    expect(page.locator("#stop")).to_be_visible()
    answer = answered(page)
    text = answer.locator(".body").inner_text().strip()
    partials = page.evaluate("window.__partials")
    assert text
    # streamed: the answer appeared in pieces, each longer than the one before
    assert len(partials) >= 2, partials
    assert len(partials[0]) < len(partials[-1]) <= len(text) + 1, (partials, text)
    expect(answer.locator(".meta")).to_contain_text(re.compile(r"\d+ tokens"))
    expect(page.locator("#context-text")).to_contain_text(re.compile(r"^\d+ / \d+ tokens$"))
    shot(page, "01-streamed-answer")

    answer.get_by_role("button", name="Token probabilities").click()
    tokens = answer.locator(".tok")
    assert tokens.count() >= 2
    tokens.first.hover()
    tip = page.locator("#tip")
    expect(tip).to_be_visible()
    expect(tip.locator("tr")).to_have_count(5)  # top_logprobs: 5
    expect(tip.locator("tr").first).to_have_class("chosen")  # temperature 0: the likeliest
    expect(tip.locator("div.chosen")).to_contain_text(re.compile(r"\d+\.\d%"))
    shot(page, "02-token-probabilities")

    page.keyboard.press("Escape")
    answer.get_by_role("button", name="Token probabilities").click()
    turns = logged_turns(server, conversation_id(page), 1)
    assert [t.prompt for t in turns] == ["What is the capital of France?"]
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".msg.user .body")).to_have_text(["What is the capital of France?"])
    expect(page.locator(".msg.assistant .body")).to_have_text([text])
    expect(page.locator("#conversations button[aria-current=true]")).to_have_text(
        "What is the capital of France?")
    shot(page, "03-after-reload")


def test_stop_ends_the_generation_on_the_server_and_keeps_what_came(
    page: Any, server: Served,
) -> None:
    sampling(page, temperature="0.8", max_tokens=400)
    ask(page, "Write a very long story about a dragon who learns to bake bread.")
    live = page.locator(".msg.assistant").last.locator(".body")
    expect(live).to_have_text(re.compile(r"\w{3}.*\w{3}", re.S), timeout=GENERATION_MS)
    page.click("#stop")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    kept = answer.locator(".body").inner_text().strip()
    assert kept
    shot(page, "04-stopped")
    (turn,) = logged_turns(server, conversation_id(page), 1)
    assert turn.finish_reason == "cancelled"
    assert 0 < turn.completion_tokens < 400
    # the log holds what was shown (and perhaps a few tokens sent while the stop
    # was on its way); compared by words, as the page shows it rendered
    shown = re.findall(r"\w+", kept)[:-1]  # the last word may have been cut
    assert re.findall(r"\w+", turn.response)[:len(shown)] == shown
    _until_idle(server)


def _until_idle(server: Served) -> None:
    """Nothing keeps generating once the page has stopped (a request still in
    retrieval, before generation, ends once that is done: allow a minute)."""
    deadline = time.monotonic() + 60
    while server.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["in_flight"] == 0


def test_an_answer_from_an_uploaded_document_cites_and_opens_the_passage(
    page: Any, server: Served,
) -> None:
    page.click("#tab-documents")
    page.fill("#collection-name", "kelvsund")
    page.set_input_files("#files", files=[
        {"name": "lighthouse.txt", "mimeType": "text/plain", "buffer": DOC.encode()}])
    page.click("#upload-form button[type=submit]")
    row = page.locator('#uploads li[data-file="lighthouse.txt"]')
    expect(row.locator(".status")).to_have_text("added: 1 passages", timeout=GENERATION_MS)
    expect(page.locator("#collections")).to_contain_text("kelvsund")
    shot(page, "05-uploaded")

    page.click("#tab-chat")
    sampling(page, max_tokens=40)
    page.select_option("#chat-collection", "kelvsund")
    watch_answer(page)
    ask(page, QUESTION)
    answer = answered(page)
    expect(answer.locator(".body")).to_contain_text("1871")
    # it streamed in: at least two growing pieces before the citations came
    pieces = shown_before_citations(page)
    assert len(pieces) >= 2, pieces
    assert all(b.startswith(a.rstrip()) for a, b in zip(pieces, pieces[1:], strict=False)), pieces
    cite = answer.locator("button.cite")
    expect(cite).to_have_count(1)
    expect(cite).to_have_text("1")  # verified: "1?" would mark a failed check
    expect(cite).not_to_have_class(re.compile("unverified"))
    shot(page, "06-cited-answer")
    cite.click()
    dialog = page.locator("#passage-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#passage-title")).to_have_text("[1] lighthouse.txt")
    expect(dialog.locator("#passage-where")).to_contain_text(
        re.compile(r"uploads/kelvsund/lighthouse\.txt, characters 0-42$"))
    expect(dialog.locator("mark")).to_have_text(DOC.strip())
    expect(dialog.locator("#passage-check")).to_contain_text("Verified")
    shot(page, "07-cited-passage")
    dialog.get_by_role("button", name="Close").click()

    # (Stop during a documents answer is covered in test_ui.py with a paced
    # fake model: with this fast 135M model the answer could end before the
    # click, a race CI lost once.)
    _until_idle(server)
    turns = logged_turns(server, conversation_id(page), 1)
    assert [t.prompt for t in turns] == [QUESTION]

    # the log keeps the answer's citations: reopened, it still opens its passage
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".msg.user .body")).to_have_text([QUESTION])
    reopened = page.locator(".msg.assistant").first
    expect(reopened.locator("button.cite")).to_have_text(["1"])
    reopened.locator("button.cite").click()
    expect(dialog.locator("#passage-title")).to_have_text("[1] lighthouse.txt")
    expect(dialog.locator("mark")).to_have_text(DOC.strip())
    shot(page, "08-cited-answer-reopened")


def test_an_answer_that_cites_nothing_shows_the_right_passage(page: Any) -> None:
    """Two files; the 135M model answers this question without citing (at
    temperature 0), so the page shows the sentence it came from, copied from
    the lighthouse file's passage and not the bakery's."""
    page.click("#tab-documents")
    page.fill("#collection-name", "harbour")
    page.set_input_files("#files", files=[
        {"name": "lighthouse.txt", "mimeType": "text/plain", "buffer": DOC.encode()},
        {"name": "bakery.txt", "mimeType": "text/plain", "buffer": OTHER_DOC.encode()}])
    page.click("#upload-form button[type=submit]")
    for name in ("lighthouse.txt", "bakery.txt"):
        expect(page.locator(f'#uploads li[data-file="{name}"] .status')).to_have_text(
            "added: 1 passages", timeout=GENERATION_MS)

    page.click("#tab-chat")
    page.click("#new-chat")
    sampling(page, max_tokens=40)
    page.select_option("#chat-collection", "harbour")
    ask(page, "When was the Kelvsund lighthouse built?")
    answer = answered(page)
    expect(answer.locator(".body")).to_contain_text("1871")
    expect(answer.locator(".body button.cite")).to_have_count(0)
    note = answer.locator(".extracted")
    expect(note).to_contain_text("The answer cites no passage")
    expect(note.locator("li")).to_have_count(1)  # the bakery's passage shares no word
    expect(note.locator("li q")).to_have_text(DOC.strip())
    shot(page, "09-uncited-answer-extracted")
    note.locator("button.cite").click()
    dialog = page.locator("#passage-dialog")
    expect(dialog.locator("#passage-title")).to_have_text(re.compile(r"^\[\d\] lighthouse\.txt$"))
    expect(dialog.locator("#passage-where")).to_contain_text("uploads/harbour/lighthouse.txt")
    expect(dialog.locator("mark")).to_have_text(DOC.strip())
    shot(page, "10-extracted-passage")


def test_compare_streams_two_models_side_by_side(page: Any) -> None:
    page.click("#tab-compare")
    checked = page.locator("#compare-models input:checked")
    expect(checked).to_have_count(2)
    assert [checked.nth(i).get_attribute("value") for i in range(2)] == list(MODELS)
    page.fill("#compare-prompt", "Say hello in five words.")
    page.click("#compare-send")
    columns = page.locator("#compare-columns .column")
    expect(columns).to_have_count(2)
    expect(columns.locator("h3")).to_have_text(list(MODELS))
    expect(page.locator("#compare-send")).to_be_enabled(timeout=GENERATION_MS)
    for i in range(2):
        expect(columns.nth(i).locator(".meta")).to_have_text(
            re.compile(r"^\d+ tokens, (stop|length)$"))
        assert columns.nth(i).locator(".body").inner_text().strip()
    shot(page, "11-compare")


def test_an_arena_vote_reveals_the_models_and_changes_the_ratings(page: Any) -> None:
    page.click("#tab-arena")
    expect(page.locator("#ratings-caption")).to_have_text("No votes yet.")
    expect(page.locator("#ratings tr")).to_have_count(0)
    expect(page.locator("#arena-vote")).to_be_hidden()  # no battle, nothing to vote on
    page.fill("#arena-prompt", "Say hello in five words.")
    page.click("#arena-send")
    expect(page.locator("#arena-status")).to_have_text("Two models are answering…")
    expect(page.locator("#arena-vote")).to_be_hidden()
    expect(page.locator("#arena-vote")).to_be_visible(timeout=GENERATION_MS)
    expect(page.locator("#arena-answers h3")).to_have_text(["Answer A", "Answer B"])
    shot(page, "12-arena-blind")
    page.get_by_role("button", name="A is better").click()
    heads = page.locator("#arena-answers h3")
    expect(heads.first).to_have_text(re.compile(r"^A: smollm2(-q4_1)?$"))
    expect(heads.last).to_have_text(re.compile(r"^B: smollm2(-q4_1)?$"))
    winner = heads.first.inner_text().removeprefix("A: ")
    expect(page.locator("#ratings-caption")).to_have_text("1 vote")
    rows = page.locator("#ratings tr")
    expect(rows).to_have_count(2)
    # the winner is rated above the loser, with one win and no losses
    expect(rows.first.locator("td")).to_have_text(
        [winner, re.compile(r"^\d+$"), re.compile(r"^\d+ to \d+$"), "1", "0", "0"])
    ratings = [int(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(2)]
    assert ratings[0] > ratings[1]
    shot(page, "13-arena-ratings")
