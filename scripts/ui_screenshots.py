"""The README's screenshots of the web UI, with real answers from the bundled
SmolLM2-135M-Instruct: a chat answer, the token-probability view, and a cited
answer from an uploaded document with its passage open.

    python scripts/ui_screenshots.py            # writes docs/img/ui-*.png

Runs ``lanner serve``'s app in this process on a fresh temporary Lanner home
(nothing touches your own data folder) and drives Debian's chromium
(/usr/bin/chromium) through Playwright.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from lanner.engine.engine import Engine  # noqa: E402
from lanner.server.app import create_app  # noqa: E402
from serverkit import serving  # noqa: E402

DOC = """# The Kelvsund lighthouse

The Kelvsund lighthouse was built in 1871, after three ships were lost on the reef
in a single winter. Its lamp burned paraffin until electricity reached the cape in 1952.

The keeper's house beside the tower became a small museum in 1989. It is open from
May to September.
"""


def settle(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=60_000)


def temperature(page: Page, value: str) -> None:
    page.eval_on_selector(
        "#temperature", f"el => {{ el.value = '{value}'; el.dispatchEvent(new Event('input')); }}")


def ask(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    expect(page.locator("#send")).to_be_enabled(timeout=180_000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        engine = Engine(Path(home))
        app = create_app(engine, ["smollm2", "smollm2-q4_1"], embedder=None)
        with serving(app) as live:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(live.url + "/")
            settle(page)
            page.click("details summary")  # the sampling controls, open in the picture
            page.fill("#seed", "3")
            temperature(page, "0.3")
            page.fill("#system", "You are a concise, helpful assistant.")
            ask(page, "What is the capital of France? Answer in two sentences.")
            page.screenshot(path=str(args.out / "ui-chat.png"))

            answer = page.locator(".msg.assistant").last
            answer.get_by_role("button", name="Token probabilities").click()
            tokens = answer.locator(".tok")
            texts = [tokens.nth(i).inner_text() for i in range(tokens.count())]
            target = next((i for i, t in enumerate(texts) if "Paris" in t), 2)
            tokens.nth(target).hover()
            expect(page.locator("#tip")).to_be_visible()
            page.screenshot(path=str(args.out / "ui-probabilities.png"))

            page.click("#tab-documents")
            page.fill("#collection-name", "harbour")
            page.set_input_files("#files", files=[
                {"name": "kelvsund.md", "mimeType": "text/markdown", "buffer": DOC.encode()}])
            page.click("#upload-form button[type=submit]")
            expect(page.locator("#uploads .status")).to_contain_text("added", timeout=180_000)
            page.click("#tab-chat")
            page.select_option("#chat-collection", "harbour")
            temperature(page, "0.7")
            cite = page.locator(".msg.assistant button.cite").first
            # A 135M model cites only now and then (and its citations rarely pass
            # the check): a few seeds until an answer cites a passage.
            for seed in range(1, 9):
                page.click("#new-chat")
                page.fill("#seed", str(seed))
                ask(page, "When was the Kelvsund lighthouse built?")
                if cite.count():
                    break
            page.screenshot(path=str(args.out / "ui-cited-answer.png"))
            if cite.count():
                cite.click()
                page.screenshot(path=str(args.out / "ui-cited-passage.png"))
            else:
                print("note: no answer cited a passage", file=sys.stderr)
            browser.close()
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
