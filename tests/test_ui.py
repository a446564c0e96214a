"""The web page at /ui in a real headless Chromium (Debian's, driven by Playwright): sign in with
a key, browse cubes, search, open an item with its versions and provenance, edit, delete.
Screenshots of each step go to test-artifacts/ui/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                                                         "(.ci/run installs it)")


def test_the_web_page(server):
    from playwright.sync_api import expect, sync_playwright

    from memstack import Client

    token = server.key("ann")
    ann = Client(server.url, token)
    first = ann.add([{"role": "user", "name": "Ann", "content": "I keep two hives of bees"}],
                    user_id="ann", session_id="garden", observed_at="2024-05-01")
    ann.update(first.ids[0], "I keep three hives of bees", reason="a new hive")
    ann.add("My sister lives in Porto", user_id="ann", session_id="family")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{server.url}/ui")
        page.fill("#key", "msk_wrong_key")
        page.click("#signin-button")
        expect(page.locator("#signin-error")).to_contain_text("unknown or revoked")
        page.fill("#key", token)
        page.click("#signin-button")
        expect(page.locator("#who")).to_have_text("ann (user)")
        expect(page.locator("li.cube")).to_contain_text(["~ann"])
        page.screenshot(path=str(SHOTS / "1-signed-in.png"))

        page.fill("#query", "how many beehives")
        page.click("#search-button")
        expect(page.locator("li.hit").first).to_contain_text("three hives of bees")
        page.screenshot(path=str(SHOTS / "2-search.png"))

        page.locator("li.hit").first.click()
        expect(page.locator("#versions tr")).to_have_count(2)
        expect(page.locator("#versions")).to_contain_text("a new hive")
        expect(page.locator("#item-meta")).to_contain_text("session garden")
        page.screenshot(path=str(SHOTS / "3-item-with-versions.png"))

        page.fill("#item-content", "I keep four hives of bees")
        page.click("#save-button")
        expect(page.locator("#versions tr")).to_have_count(3)
        assert ann.get(first.ids[0]).content == "I keep four hives of bees"
        page.screenshot(path=str(SHOTS / "4-edited.png"))

        page.on("dialog", lambda dialog: dialog.accept())
        page.click("#delete-button")
        expect(page.locator("#item-empty")).to_be_visible()
        page.screenshot(path=str(SHOTS / "5-deleted.png"))
        browser.close()
    with pytest.raises(Exception):
        ann.get(first.ids[0])
    assert len(list(SHOTS.glob("*.png"))) >= 5


def test_the_page_shows_memory_text_as_text(server):
    """A memory holding HTML is shown as text, never run (the page never uses innerHTML)."""
    from playwright.sync_api import expect, sync_playwright

    from memstack import Client

    token = server.key("mallory")
    Client(server.url, token).add('<img src=x onerror="document.title=\'pwned\'"> hello')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(f"{server.url}/ui")
        page.fill("#key", token)
        page.click("#signin-button")
        expect(page.locator("li.hit").first).to_contain_text("<img src=x")
        assert page.title() == "memstack"
        browser.close()


def test_feedback_buttons_and_a_correction(server):
    """Helpful / not helpful on a search hit, and Correct… on a memory (issue 18)."""
    from playwright.sync_api import expect, sync_playwright

    from memstack import Client

    token = server.key("ann")
    ann = Client(server.url, token)
    wrong = ann.add("My sister lives in Porto", user_id="ann").ids[0]
    ann.add("I keep three hives of bees", user_id="ann")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{server.url}/ui")
        page.fill("#key", token)
        page.click("#signin-button")
        page.fill("#query", "where does my sister live")
        page.click("#search-button")
        hit = page.locator("li.hit").first
        expect(hit).to_contain_text("Porto")
        hit.locator("button[data-signal=negative]").click()
        expect(hit.locator("button[data-signal=negative]")).to_have_text("thanks")
        hit.click()
        page.once("dialog", lambda dialog: dialog.accept("My sister lives in Lisbon now"))
        page.click("#correct-button")
        page.screenshot(path=str(SHOTS / "6-feedback.png"))
        browser.close()
    given = ann.get_all(kinds=["feedback"], limit=10)
    assert {f.metadata["signal"] for f in given} == {"negative"} and len(given) == 2
    assert any(f.content == "where does my sister live" for f in given)  # the hit's query
    corrections = [f.metadata["correction_id"] for f in given if f.metadata["correction_id"]]
    assert ann.get(corrections[0]).metadata["corrects"] == wrong
    hits = ann.search("where does my sister live", user_id=None)
    assert hits[0].item.content == "My sister lives in Lisbon now"
