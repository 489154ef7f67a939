"""The web UI in real headless Chromium (Debian's package, driven by Playwright
for Python), against the server on scripted fake models: streamed answers and
stop, the probability view, markup in replies shown as text, the API-key
prompt, uploads with an error per file and cited answers, compare, the arena,
and a reload that keeps the conversation. Screenshots of each step go to
``test-artifacts/ui/`` (``LANNER_TEST_ARTIFACTS`` moves it)."""

from __future__ import annotations

import re
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
from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.server.app import create_app
from serverkit import LiveServer, serving

pytestmark = needs_chromium
browser = browserkit.browser
page = browserkit.page
shot = Artifacts("ui").shot

XSS = 'Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> done.'
DOC = ("The Kelvsund lighthouse was built in 1871 after three ships were lost on the reef. "
       "Its lamp burned paraffin until electricity reached the cape in 1952.")
LONG = "Once upon a time " + "the sea was calm and " * 300
REPLY_LIGHTHOUSE = "The lighthouse was built in 1871 [1]. It was painted blue in 1990 [1]."


def reply(prompt: str) -> str:
    """The fake model's script: what it answers depends on the question."""
    if "markup" in prompt:
        return XSS
    if "long story" in prompt:
        return LONG
    if "lighthouse" in prompt:
        return REPLY_LIGHTHOUSE
    return "Hello! Some **bold** text and `code`."


def make_server(home: Path, api_key: str | None = None) -> Iterator[LiveServer]:
    engine = Engine(home)
    engine.attach("fake", FakeBackend(reply, n_ctx=8192, delay_s=0.002))
    engine.attach("fake-2", FakeBackend(["The second model's answer."], n_ctx=8192))
    with serving(create_app(engine, ["fake", "fake-2"], embedder=None, api_key=api_key)) as live:
        yield live


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from make_server(tmp_path_factory.mktemp("home"))


def last_answer(page: Any) -> Any:
    return page.locator(".msg.assistant").last


def test_an_answer_streams_in_and_a_reload_keeps_the_conversation(page: Any) -> None:
    ask(page, "Say hello")
    answer = last_answer(page)
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("code")).to_have_text("code")
    expect(page.locator("#context-text")).to_contain_text("/ 8192 tokens")
    shot(page, "01-chat-answer")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".msg.user .body").first).to_have_text("Say hello")
    expect(last_answer(page).locator("strong")).to_have_text("bold")
    expect(page.locator("#conversations button[aria-current=true]")).to_have_text("Say hello")
    shot(page, "02-chat-after-reload")


def test_markup_in_a_reply_is_shown_as_text_never_run(page: Any) -> None:
    ask(page, "Reply with markup")
    answer = last_answer(page)
    expect(answer.locator(".body")).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(answer.locator(".body")).to_contain_text("<script>window.__xss=2</script>")
    assert page.locator("#thread img, #thread script").count() == 0
    assert page.evaluate("window.__xss") is None
    # and the user's own text is never parsed either
    ask(page, "<b>not bold</b> markup")
    expect(page.locator(".msg.user .body").last).to_have_text("<b>not bold</b> markup")
    assert page.locator("#thread b").count() == 0
    shot(page, "03-markup-as-text")


def test_stop_ends_a_streaming_answer_and_keeps_what_came(page: Any) -> None:
    ask(page, "Tell me a long story")
    expect(page.locator("#stop")).to_be_visible()
    expect(last_answer(page)).to_contain_text("Once upon a time")
    page.click("#stop")
    expect(last_answer(page).locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    kept = last_answer(page).locator(".body").inner_text()
    assert kept.startswith("Once upon a time") and len(kept) < len(LONG.strip())
    shot(page, "04-stopped")
    # The log holds the cut-short answer (as "cancelled"), so a reload keeps it. It
    # may hold a few more characters than were shown: those sent while the stop
    # was on its way.
    logged = _logged_messages(page)[-1]["content"]
    assert logged.startswith(kept.strip()) and len(logged) < len(LONG)
    page.reload()
    expect(last_answer(page).locator(".body")).to_have_text(logged.strip())


def _logged_messages(page: Any) -> list[dict[str, str]]:
    """The open conversation as the log has it, once its last answer is written."""
    script = """async () => {
        const id = localStorage.getItem('lanner-conversation');
        return (await (await fetch('/v1/lanner/conversations/' + id)).json()).messages;
    }"""
    for _ in range(100):
        messages: list[dict[str, str]] = page.evaluate(script)
        if messages and messages[-1]["role"] == "assistant":
            return messages
        page.wait_for_timeout(50)
    raise AssertionError(f"the stopped answer was not logged: {messages}")


def test_hovering_a_token_shows_its_probability_and_alternatives(page: Any) -> None:
    ask(page, "Say hello")
    answer = last_answer(page)
    answer.get_by_role("button", name="Token probabilities").click()
    first = answer.locator(".tok").first
    expect(first).to_have_text("H")
    first.hover()
    tip = page.locator("#tip")
    expect(tip).to_be_visible()
    expect(tip).to_contain_text("90.0%")
    expect(tip.locator("tr")).to_have_count(3)
    expect(tip).to_contain_text("5.0%")  # the alternative "?"
    shot(page, "05-token-probabilities")
    # keyboard users reach the same view by focus
    page.keyboard.press("Escape")
    answer.locator(".tok").nth(1).focus()
    expect(tip).to_contain_text("e")


def test_compare_streams_each_model_in_its_column(page: Any) -> None:
    page.click("#tab-compare")
    page.fill("#compare-prompt", "Say hello")
    page.click("#compare-send")
    columns = page.locator("#compare-columns .column")
    expect(columns).to_have_count(2)
    expect(columns.nth(0)).to_contain_text("Hello! Some bold text")
    expect(columns.nth(1)).to_contain_text("The second model's answer.")
    expect(columns.nth(1).locator(".meta")).to_contain_text("tokens, stop")
    shot(page, "06-compare")


def test_an_arena_vote_reveals_the_models_and_updates_the_ratings(page: Any) -> None:
    page.click("#tab-arena")
    votes_before = _votes(page)
    page.fill("#arena-prompt", "Say hello")
    page.click("#arena-send")
    expect(page.locator("#arena-answers .column")).to_have_count(2)
    expect(page.locator("#arena-answers h3").first).to_have_text("Answer A")
    shot(page, "07-arena-blind")
    page.get_by_role("button", name="A is better").click()
    expect(page.locator("#arena-answers h3").first).to_have_text(re.compile(r"A: fake(-2)?$"))
    expect(page.locator("#ratings-caption")).to_have_text(
        f"{votes_before + 1} vote{'' if votes_before == 0 else 's'}")
    rows = page.locator("#ratings tr")
    expect(rows).to_have_count(2)
    expect(rows.first.locator("td").nth(2)).to_have_text(re.compile(r"^\d+ to \d+$"))
    shot(page, "08-arena-ratings")


PANEL = {"temperature": 0, "top_p": 0.5, "top_k": 3, "max_tokens": 5, "seed": 7}


def set_sampling_panel(page: Any) -> None:
    page.click("#panel-chat details summary")
    for field, value in PANEL.items():
        page.fill(f"#{field}", str(value))
    expect(page.locator("#temperature-value")).to_have_text("0")


def test_compare_and_the_arena_answer_with_the_sampling_panels_settings(page: Any) -> None:
    set_sampling_panel(page)
    page.click("#tab-compare")
    expect(page.locator("#compare-sampling")).to_have_text(
        "Sampling (set under Chat): temperature 0, top-p 0.5, top-k 3, max tokens 5, seed 7")
    page.fill("#compare-prompt", "Say hello")
    with page.expect_request("**/v1/lanner/compare") as sent:
        page.click("#compare-send")
    body = sent.value.post_data_json
    assert {field: body.get(field) for field in PANEL} == PANEL
    assert "logprobs" not in body and "top_logprobs" not in body
    columns = page.locator("#compare-columns .column")
    expect(columns.nth(0).locator(".body")).to_have_text("Hello")
    expect(columns.nth(1).locator(".body")).to_have_text("The s")
    expect(columns.nth(1).locator(".meta")).to_have_text("5 tokens, length")
    shot(page, "15-compare-sampling")

    page.click("#tab-arena")
    expect(page.locator("#arena-sampling")).to_contain_text("max tokens 5, seed 7")
    page.fill("#arena-prompt", "Say hello")
    with page.expect_request("**/v1/lanner/arena/battles") as sent:
        page.click("#arena-send")
    body = sent.value.post_data_json
    assert {field: body.get(field) for field in PANEL} == PANEL
    assert "logprobs" not in body
    expect(page.locator("#arena-answers .column")).to_have_count(2)
    answers = page.locator("#arena-answers .column .body").all_inner_texts()
    assert sorted(a.strip() for a in answers) == ["Hello", "The s"]


def _votes(page: Any) -> int:
    caption = page.locator("#ratings-caption").inner_text()
    return 0 if caption.startswith("No") else int(caption.split()[0])


def test_uploads_show_an_error_per_failed_file_and_answers_cite_the_passage(page: Any) -> None:
    page.click("#tab-documents")
    page.fill("#collection-name", "harbour")
    page.set_input_files("#files", files=[
        {"name": "lighthouse.txt", "mimeType": "text/plain", "buffer": DOC.encode()},
        {"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG"},
        {"name": "empty.txt", "mimeType": "text/plain", "buffer": b"   "},
    ])
    page.click("#upload-form button[type=submit]")
    good = page.locator('#uploads li[data-file="lighthouse.txt"]')
    expect(good.locator(".status")).to_have_text("added: 1 passages", timeout=120_000)
    expect(page.locator('#uploads li[data-file="photo.png"] .status')).to_contain_text(
        "Error: filename: photo.png: unsupported file type")
    expect(page.locator('#uploads li[data-file="empty.txt"] .status')).to_contain_text(
        "Error: filename: empty.txt: no text found")
    expect(page.locator("#collections")).to_contain_text("harbour")
    shot(page, "09-uploads")

    page.click("#tab-chat")
    page.select_option("#chat-collection", "harbour")
    watch_answer(page)
    ask(page, "When was the lighthouse built?")
    answer = last_answer(page)
    cites = answer.locator("button.cite")
    expect(cites).to_have_count(2)
    # The answer streamed in: it grew in pieces (the model's words as written)
    # before the citations came and turned the markers into buttons.
    pieces = shown_before_citations(page)
    assert len(pieces) >= 2, pieces
    assert all(REPLY_LIGHTHOUSE.startswith(p) for p in pieces), pieces
    expect(cites.nth(0)).to_have_text("1")
    expect(cites.nth(1)).to_have_text("1?")
    expect(cites.nth(1)).to_have_class(re.compile("unverified"))
    shot(page, "10-cited-answer")
    cites.nth(0).click()
    dialog = page.locator("#passage-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#passage-title")).to_have_text("[1] lighthouse.txt")
    expect(dialog.locator("mark")).to_contain_text("built in 1871")
    expect(dialog.locator("#passage-where")).to_contain_text("characters 0-")
    shot(page, "11-cited-passage")
    page.keyboard.press("Escape")

    # Stop works while a documents answer is being written.
    ask(page, "Tell me a long story about the lighthouse keeper")
    expect(last_answer(page)).to_contain_text("Once upon a time")
    page.click("#stop")
    expect(last_answer(page).locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    kept = last_answer(page).locator(".body").inner_text()
    assert kept.startswith("Once upon a time") and len(kept) < len(LONG.strip())


def test_first_load_is_small_and_shows_the_input_fast(browser: Any, server: LiveServer) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#prompt")).to_be_visible()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    timing = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const input = performance.getEntriesByType('resource')
            .concat([nav]).reduce((sum, e) => sum + e.transferSize, 0);
        return {bytes: input, domReady: nav.domContentLoadedEventEnd};
    }""")
    context.close()
    assert 0 < timing["bytes"] < 300_000
    assert timing["domReady"] < 1000


def test_a_server_with_a_key_asks_for_it_once_per_tab(
    browser: Any, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    servers = make_server(tmp_path_factory.mktemp("keyed"), api_key="open-sesame")
    live = next(servers)
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(live.url + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        expect(page.locator("#key-error")).to_have_text("That key was refused.")
        shot(page, "12-api-key")
        page.fill("#key-input", "open-sesame")
        page.press("#key-input", "Enter")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#model option")).to_have_count(2)
        page.reload()
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(dialog).to_be_hidden()
        context.close()
    finally:
        next(servers, None)


def test_a_phone_width_screen_shows_the_chat_without_sideways_scrolling(
    browser: Any, server: LiveServer,
) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    ask(page, "Say hello")
    expect(last_answer(page).locator("strong")).to_have_text("bold")
    last_answer(page).get_by_role("button", name="Token probabilities").tap()
    last_answer(page).locator(".tok").nth(2).tap()
    expect(page.locator("#tip")).to_contain_text("90.0%")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    expect(page.locator("#send")).to_be_in_viewport()
    shot(page, "13-phone")
    context.close()


@pytest.mark.slow
def test_the_bundled_model_streams_a_real_answer_with_probabilities(
    browser: Any, smollm2_gguf: Path, tmp_path: Path,
) -> None:
    engine = Engine(tmp_path)
    with serving(create_app(engine, ["smollm2"], embedder=None)) as live:
        context = browser.new_context()
        page = context.new_page()
        page.goto(live.url + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        page.click("details summary")
        page.fill("#max_tokens", "24")
        ask(page, "What is the capital of France?")
        expect(page.locator("#send")).to_be_enabled(timeout=120_000)
        answer = last_answer(page)
        expect(answer.locator(".meta")).to_contain_text("tokens")
        assert answer.locator(".body").inner_text().strip()
        answer.get_by_role("button", name="Token probabilities").click()
        answer.locator(".tok").first.hover()
        expect(page.locator("#tip tr")).to_have_count(5)
        expect(page.locator("#context-text")).to_contain_text(" tokens")
        shot(page, "14-bundled-model")
        context.close()
