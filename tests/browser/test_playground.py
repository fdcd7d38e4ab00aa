"""The playground page in a real headless browser (Debian's chromium, driven by Playwright), against
the real app (``app_url``: the Ray Serve app on the committed checkpoints).

Nothing is downloaded: Playwright is pointed at the system browser (``DGSERVE_CHROMIUM`` or
``chromium`` on the PATH); where there is none, or no Playwright, the tests skip and say why. A
screenshot of each run is saved under ``tests/browser/artifacts/`` (``DGSERVE_ARTIFACTS`` to move it).
"""

import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest
import requests

from models import sudoku

ARTIFACTS = Path(os.environ.get("DGSERVE_ARTIFACTS", Path(__file__).parent / "artifacts"))
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
# chromium on a machine with no network: no background connections, no sandbox (CI runs as root)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]


def _chromium() -> str | None:
    return os.environ.get("DGSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        pytest.skip("no system chromium (Debian: apt-get install chromium; or set DGSERVE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1500})
    page = context.new_page()
    page.goto(f"{app_url}/playground")
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2")
    yield page
    context.close()


def run(page, timeout_s: float = 90) -> str:
    """Click Run and wait for the run's end; the page's final state (done or error)."""
    page.click("#run")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=timeout_s * 1000)
    return page.evaluate("document.body.dataset.state")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_page_ships_without_a_build_step(app_url):
    for name, kind in [("", "text/html"), ("/playground.js", "text/javascript"), ("/playground.css", "text/css")]:
        r = requests.get(f"{app_url}/playground{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text  # no CDN: everything is served here
    assert requests.get(f"{app_url}/playground/nothing.js", timeout=10).status_code == 404


def test_a_structured_run_draws_its_steps_and_a_valid_answer(page):
    """A diffusion run of the JSON example: more than one denoising step drawn, the scrubber walks
    them, the stages are on the timeline, and the answer shown validates against the schema. Drafts
    of the tiny checkpoint miss ``required`` keys often: the first seed whose draft the validator
    refused shows that draft with its error span highlighted."""
    page.select_option("#route", "diffusion")
    page.fill("#spec", json.dumps(SCHEMA))
    highlighted = False
    for seed in range(1, 7):
        page.fill("#seed", str(seed))
        assert run(page) == "done", page.inner_text("#final-meta")
        steps = int(page.inner_text("#step-count"))
        assert steps > 1
        assert page.locator("#canvas .cell").count() > 0
        answer = page.inner_text("#final-answer")
        jsonschema.validate(json.loads(answer), SCHEMA)  # the answer shown validates
        assert "validated" in page.inner_text("#final-meta")
        names = page.locator("#timeline .stage .name").all_inner_texts()
        assert "draft" in names and "validate draft" in names
        if seed == 1:  # scrub back to the first step: it is drawn, and differs from the last
            last = page.locator("#canvas .cell").all_inner_texts()
            page.fill("#scrub", "0")
            page.dispatch_event("#scrub", "input")
            assert page.inner_text("#step-label").startswith("canvas 0 · step 1 ")
            assert page.locator("#canvas .cell").all_inner_texts() != last
        invalid = page.locator(".verdict.invalid[data-of='draft']")
        if invalid.count():
            marks = invalid.locator("mark.error-span")
            assert marks.count() >= 1 and marks.first.is_visible()
            assert page.locator(".repair .kept").count() == 1  # what the repair kept is shown
            highlighted = True
            shot(page, "playground-invalid-draft")
            break
    assert highlighted, "no draft of seeds 1-6 failed validation, so no error span could be checked"


def test_a_sudoku_run_draws_the_board(page):
    """The Sudoku model's run: the board drawn with the clues kept, and a solution that obeys the rules."""
    page.click("#example-sudoku")
    assert run(page) == "done", page.inner_text("#final-meta")
    assert int(page.inner_text("#step-count")) > 1
    board = page.locator("#board .sq").all_inner_texts()
    puzzle = page.input_value("#spec")
    assert len(board) == 81 and all(board[i] == c for i, c in enumerate(puzzle) if c != "0")
    final = list(board)
    assert "".join(page.inner_text("#final-answer").split()) == sudoku.solve(puzzle)
    shot(page, "playground-sudoku")
    # scrub to a step halfway: that step's board is drawn, still unsettled
    steps = int(page.inner_text("#step-count"))
    page.fill("#scrub", str(steps // 2))
    page.dispatch_event("#scrub", "input")
    assert f"step {steps // 2 + 1} " in page.inner_text("#step-label")
    assert page.locator("#board .sq").all_inner_texts() != final
    shot(page, "playground-mid-denoise")
