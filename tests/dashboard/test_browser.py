"""The page in headless Chromium against a live server: log in, runs (one still training), registry, playground.

Driven by Playwright with the system's Chromium (Debian's `chromium` package; `make test` installs it
when run as root). Screenshots land in test-artifacts/dashboard/ ($PEFTKIT_TEST_ARTIFACTS overrides).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from dashboard_helpers import HOSTILE, KEY, log_steps

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test extra is not installed
    expect = sync_playwright = None

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PEFTKIT_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
CHROMIUM = os.environ.get("PEFTKIT_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# Headless, and nothing that reaches for the network: on a machine without internet Chromium's own
# background connections (updates, sync, safe browsing) are refused many at a time otherwise.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: install Debian's `chromium` package (`make test` "
                                                "does when run as root) or set PEFTKIT_CHROMIUM to a Chrome binary"),
]
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "<b>Bold?</b> What colour is item 3?"


@pytest.fixture(scope="module")
def browser():
    expect.set_options(timeout=20_000)  # the CPU is shared with the model generating
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """Return a fresh page (its own profile and storage); the test fails on any script error or CSP refusal in it."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: "Content Security Policy" in msg.text and errors.append(msg.text))
    yield tab
    context.close()
    assert not errors, errors


def log_in(page, url: str, view: str = "") -> None:
    page.goto(f"{url}/{view}")
    page.fill("#key", KEY)
    page.click("#login-button")
    expect(page.locator("#login")).to_be_hidden()


def test_log_in_then_see_runs_with_curves_and_a_live_run_grow(page, server, runs_dir):
    page.goto(server + "/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#key", "not-the-key")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("refused")
    page.fill("#key", KEY)
    page.click("#login-button")

    expect(page.locator(".run-item")).to_have_count(3)
    hostile = page.locator(".run-item .run-name", has_text=HOSTILE)
    expect(hostile).to_have_count(1)  # shown as text ...
    assert page.locator(".run-item img").count() == 0 and page.evaluate("window.__pwned") is None  # ... never run

    page.locator('.run-item[data-run="chat-bot"]').click()
    expect(page.locator("#run-step")).to_have_text("6 / 6")
    loss = page.locator("figure.chart").first
    expect(loss.locator("path.line")).to_have_count(2)  # train and eval
    expect(loss.locator("circle.dot.s1")).to_have_count(6)
    expect(page.locator('[data-section="Evaluation"] table').first).to_contain_text("adapter")
    expect(page.locator('[data-section="Data"]')).to_contain_text("chat.jsonl")
    expect(page.locator('[data-section="Resolved config"]')).to_contain_text("method.name")
    page.screenshot(path=ARTIFACTS / "runs.png", full_page=True)

    page.locator('.run-item[data-run="live-run"]').click()
    step = page.locator("#run-step")
    expect(step).to_contain_text("/ 40")
    expect(page.locator(".live-note")).to_be_visible()
    now = int(step.inner_text().split("/")[0].replace(",", ""))
    page.evaluate("window.__same_page = true")
    log_steps(runs_dir / "live-run", range(now + 1, now + 4))
    expect(step).to_have_text(f"{now + 3} / 40")  # polled, no reload
    expect(page.locator("figure.chart").first.locator("circle.dot.s1")).to_have_count(now + 3)
    assert page.evaluate("window.__same_page") is True
    page.screenshot(path=ARTIFACTS / "runs-live.png")


def test_registry_by_domain_with_lineage_tag_untag_and_a_confirmed_remove(page, server, registry_dir, tiny_model_dir, tmp_path):
    from serving_helpers import make_adapter

    from peftkit.registry import Registry

    with Registry(registry_dir) as reg:
        reg.add(make_adapter(tiny_model_dir, tmp_path / "temp", seed=11), name="temp-bot", domain="legal",
                base_model_dir=tiny_model_dir)
    log_in(page, server, "#registry")
    expect(page.locator("section.domain h3")).to_contain_text(["legal", "support", "no domain"])
    two = page.locator('tr[data-ref="chat-bot@2"]')
    expect(two).to_contain_text("canary")
    expect(two).to_contain_text("chat-bot@1")  # its parent
    expect(two).to_contain_text("loss 3.1 → 1.4")

    ops = page.locator('tr[data-ref="ops-bot@1"]')
    ops.locator(".add-tag").click()
    page.fill("dialog.ask input", "green")
    page.click("dialog.ask .confirm")
    expect(ops.locator('.tag[data-tag="green"]')).to_be_visible()
    with Registry(registry_dir) as reg:
        assert reg.show("ops-bot:green").ref == "ops-bot@1"
    ops.locator('.tag[data-tag="green"] .untag').click()
    expect(ops.locator(".tag")).to_have_count(0)
    with Registry(registry_dir) as reg:
        assert reg.show("ops-bot@1").tags == []

    temp = page.locator('tr[data-ref="temp-bot@1"]')
    temp.locator(".remove").click()
    expect(page.locator("dialog.ask")).to_contain_text("Remove temp-bot@1?")
    page.screenshot(path=ARTIFACTS / "registry-remove.png")
    page.click("dialog.ask .cancel")
    expect(temp).to_have_count(1)
    temp.locator(".remove").click()
    page.click("dialog.ask .confirm")
    expect(temp).to_have_count(0)
    expect(page.locator("#registry-status")).to_contain_text("removed temp-bot@1")
    with Registry(registry_dir) as reg:
        assert "temp-bot" not in {e.name for e in reg.list()}

    page.click("#verify-all")
    expect(page.locator('tr[data-ref="chat-bot@1"] td.verify')).to_have_text("ok")
    two.locator("a.ref").click()
    detail = page.locator("#entry-detail")
    expect(detail.locator("ol.chain")).to_contain_text("chat-bot@1")
    expect(detail).to_contain_text("held-out chats")
    page.screenshot(path=ARTIFACTS / "registry.png", full_page=True)


def test_playground_streams_the_base_and_two_adapters_side_by_side(page, server, tiny_model_dir):
    log_in(page, server, "#playground")
    for ref in ("chat-bot:canary", "legal-bot", "chat-bot@1", "ops-bot"):
        page.check(f'#picks input[value="{ref}"]')
    expect(page.locator("#picked-count")).to_have_text("4 of 4 adapters picked")
    expect(page.locator('#picks input[value="chat-bot@2"]')).to_be_disabled()  # four at most
    for ref in ("chat-bot@1", "ops-bot"):
        page.uncheck(f'#picks input[value="{ref}"]')
    expect(page.locator("#picked-count")).to_have_text("2 of 4 adapters picked")

    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "24")
    page.evaluate("""() => {  // what each column shows, every time it changes
        window.__seen = {};
        new MutationObserver(() => {
            for (const col of document.querySelectorAll('.answer-col')) {
                const seen = (window.__seen[col.dataset.model] ||= []);
                const n = col.querySelector('.answer').textContent.length;
                if (seen[seen.length - 1] !== n) seen.push(n);
            }
        }).observe(document.getElementById('answers'), {subtree: true, childList: true, characterData: true});
    }""")
    page.click("#send")
    columns = page.locator(".answer-col")
    expect(columns).to_have_count(3)
    for i in range(3):
        expect(columns.nth(i)).to_have_attribute("data-state", "done", timeout=60_000)
    models = [tiny_model_dir.name, "chat-bot:canary", "legal-bot"]
    assert [c.get_attribute("data-model") for c in columns.all()] == models

    seen = page.evaluate("window.__seen")
    answers = {}
    for model, column in zip(models, columns.all()):
        whole = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0})
        answers[model] = column.locator(".answer").text_content()
        assert answers[model] == whole.json()["choices"][0]["message"]["content"], model
        assert len([n for n in seen[model] if n > 0]) >= 2, f"{model} appeared at once, not streamed: {seen[model]}"
        assert float(column.get_attribute("data-ttft")) > 0 and float(column.get_attribute("data-tps")) > 0
        expect(column.locator(".stats")).to_contain_text("24 tokens")
        expect(column.locator(".stats .ttft")).to_contain_text("TTFT")
        expect(column.locator(".stats .tps")).to_contain_text("tok/s")
    assert len(set(answers.values())) == 3  # each adapter really answered
    assert page.input_value("#prompt") == PROMPT and page.locator("#answers b").count() == 0
    page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)


def test_dashboard_without_a_model_shows_runs_and_registry_but_no_playground(page, runs_dir, registry_dir):
    from peftkit.dashboard import Dashboard
    from peftkit.dashboard.app import create_dashboard_app
    from peftkit.serving.server import start_background

    app = create_dashboard_app(Dashboard(runs=runs_dir, registry=str(registry_dir), api_key=None, playground=False))
    running = start_background(app)
    try:
        page.goto(running.url + "/")
        expect(page.locator(".run-item")).to_have_count(3)  # no key set: no log-in
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#where")).to_contain_text("no model")
        page.click('#tabs a[data-tab="registry"]')
        expect(page.locator('tr[data-ref="chat-bot@1"]')).to_be_visible()
        page.click('#tabs a[data-tab="playground"]')
        expect(page.locator("#views")).to_contain_text("No model is loaded here")
        page.screenshot(path=ARTIFACTS / "dashboard-no-model.png")
    finally:
        running.stop()
