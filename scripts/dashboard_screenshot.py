"""Take the web page's screenshots in docs/: the playground on a real model with trained adapters, the runs, the registry.

    .venv/bin/python scripts/dashboard_screenshot.py --adapter fernhill-support=runs/bench-train-30/peftkit \
        --adapter fernhill-support=runs/bench-train-30b/peftkit --prompt "Do you ship to Canada?"

Serves the bundled model (or --base) in this process, exactly as `peftkit serve` does, with a scratch
registry holding the given run or adapter folders (the same name twice makes versions 1 and 2) and the
runs under --runs; drives headless Chromium (Debian's `chromium`) through it and writes
dashboard.png (playground), dashboard-runs.png and dashboard-registry.png into --out.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

KEY = "screenshot-key"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="register DIR as NAME (repeatable)")
    parser.add_argument("--domain", default="retail", help="domain for the registered adapters")
    parser.add_argument("--base", default="smollm2-135m-instruct", help="base model to serve")
    parser.add_argument("--runs", default="runs", help="runs folder the page shows")
    parser.add_argument("--run", help="run id to open in the runs screenshot (default: the newest)")
    parser.add_argument("--prompt", default="Do you ship to Canada?")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="docs", help="folder for the PNG files")
    args = parser.parse_args()

    from peftkit.registry import Registry
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    registry = Path(tempfile.mkdtemp(prefix="peftkit-screenshot-")) / "registry"
    picks = []
    with Registry(registry) as reg:
        for i, spec in enumerate(args.adapter):
            name, _, folder = spec.partition("=")
            entry = reg.add(folder, name=name, domain=args.domain, tags=["stable"] if i == 0 else ["candidate"])
            picks.append(entry.ref)
    settings = ServeSettings(base=args.base, registry=str(registry), runs=args.runs, api_key=KEY)
    engine = Engine(settings).start()
    server = start_background(create_app(engine, settings))
    try:
        shoot(server.url, picks, args)
    finally:
        server.stop()
        engine.stop()


def shoot(url: str, picks: list[str], args) -> None:
    from playwright.sync_api import expect, sync_playwright

    out = Path(args.out)
    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 820})
        page.goto(url + "/#playground")
        page.fill("#key", KEY)
        page.click("#login-button")
        for ref in picks[:4]:
            page.check(f'#picks input[value="{ref}"]')
        page.fill("#prompt", args.prompt)
        page.fill("#max-tokens", str(args.max_tokens))
        page.click("#send")
        for column in page.locator(".answer-col").all():
            expect(column).to_have_attribute("data-state", "done")
        page.screenshot(path=out / "dashboard.png")

        page.goto(url + "/#runs" + (f"/{args.run}" if args.run else ""))
        expect(page.locator("figure.chart").first).to_be_visible()
        page.wait_for_timeout(500)
        page.screenshot(path=out / "dashboard-runs.png")

        page.goto(url + "/#registry/" + (picks[-1] if picks else ""))
        page.click("#verify-all")
        expect(page.locator("#registry-status")).to_contain_text("verified")
        page.screenshot(path=out / "dashboard-registry.png")
        browser.close()
    print("wrote", ", ".join(str(out / n) for n in ("dashboard.png", "dashboard-runs.png", "dashboard-registry.png")))


if __name__ == "__main__":
    main()
