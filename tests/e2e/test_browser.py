"""What a new user clicks through, in a real browser: every page, the Learn page's formulas, the classroom demo
from the Fine-tune page to its spectra and Pareto point, a reload and a Cancel mid-run, and a quick
intrinsic-dimension measurement that survives a reload.

The tests share one app and one run store, in file order: the demo's run is what the Spectra and Pareto tests show.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

JOB_TIMEOUT_S = float(os.environ.get("PETLAB_E2E_TIMEOUT", "900"))
Shot = Callable[..., None]

PAGES = {"": "PETLab", "learn": "Learn", "train": "Fine-tune", "runs": "Runs", "spectra": "Spectra"}
PAGES |= {"pareto": "Accuracy versus trainable parameters", "intrinsic_dim": "Intrinsic dimension"}
STEP = re.compile(r"step (\d+) of (\d+)")


def settle(page: object) -> None:
    """Wait until the app's script has run, then check it raised nothing."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator('[data-testid="stException"]')


def visit(page: object, path: str) -> None:
    page.goto(f"/{path}")
    settle(page)


def steps_shown(page: object) -> int | None:
    """The step of the Fine-tune page's progress bar, if it shows one."""
    bar = page.locator('[data-testid="stProgress"]')
    if bar.count() == 0:
        return None
    found = STEP.search(bar.first.inner_text())
    return int(found.group(1)) if found else None


def wait_for_text(watched: object, text: str | re.Pattern[str], timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait until ``text`` shows on the page (failing at once if the app server stops)."""
    found = watched.page.get_by_text(text)
    watched.until(lambda: found.count() > 0, timeout_s, f"{text!r} on the page")


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_loads_without_errors(watched: object, path: str) -> None:
    visit(watched.page, path)
    assert watched.page.locator("h1").first.inner_text().startswith(PAGES[path])


def test_the_learn_page_renders_its_formulas(watched: object, screenshot: Shot) -> None:
    page = watched.page
    visit(page, "learn")
    page.locator(".katex").nth(3).wait_for()  # the update, the count and its worked value, typeset by KaTeX
    assert page.locator(".katex-error").count() == 0
    assert page.get_by_text("agrees with the code's count").count() == 1
    screenshot(page, "learn", at="What it changes")


def test_the_classroom_demo_runs_to_completion_from_the_fine_tune_page(watched: object, screenshot: Shot) -> None:
    page = watched.page
    visit(page, "train")
    page.get_by_role("button", name="Run the classroom demo (fact)").click()
    seen: list[int] = []

    def finished() -> bool:
        step = steps_shown(page)
        if step is not None and (not seen or step != seen[-1]):
            seen.append(step)
        return page.get_by_text("Completed:").count() > 0

    watched.until(finished, JOB_TIMEOUT_S, "the classroom demo to complete")
    assert len(seen) >= 2 and seen == sorted(seen), f"the progress did not advance: {seen}"
    assert re.search(r"run=\d{8}-\d{6}-[0-9a-f]{6}", page.url)  # the page address keeps the job
    accuracy = page.locator('[data-testid="stMetric"]', has_text="Test accuracy")
    value = float(re.search(r"([\d.]+)%", accuracy.inner_text()).group(1))
    assert value > 50.0, f"test accuracy {value}% is not clearly above chance (10%)"
    settle(page)
    screenshot(page, "train", at="classroom demo: fact on digits")


def test_the_demos_spectra_step_through_training_and_its_pareto_point(watched: object, screenshot: Shot) -> None:
    page = watched.page
    visit(page, "spectra")
    wait_for_text(watched, "Over training", timeout_s=300)
    wait_for_text(watched, re.compile(r"The adapter as it was after step 60\b"), timeout_s=300)
    settle(page)
    screenshot(page, "spectra")
    screenshot(page, "spectra_training", at="Over training")
    page.get_by_role("slider", name="Training step").press("Home")  # step back to before training
    wait_for_text(watched, "The adapter as it was after step 0 ", timeout_s=120)
    visit(page, "pareto")
    wait_for_text(watched, "your runs: fact", timeout_s=120)
    screenshot(page, "pareto")


def test_a_reload_mid_run_reconnects_and_cancel_says_what_happened(watched: object) -> None:
    page = watched.page
    visit(page, "train")
    page.get_by_role("button", name="Run the classroom demo (fact)").click()
    watched.until(lambda: (steps_shown(page) or 0) >= 1, JOB_TIMEOUT_S, "the run's first step")
    page.reload()  # a new session: the address finds the job, with its Cancel button
    settle(page)
    cancel = page.get_by_role("button", name="Cancel")
    cancel.wait_for()
    watched.until(lambda: steps_shown(page) is not None, 120, "the reconnected page's progress bar")
    first = steps_shown(page)
    watched.until(lambda: (steps_shown(page) or 0) > first, JOB_TIMEOUT_S, "the reconnected run to advance")
    cancel.click()
    wait_for_text(watched, "You cancelled it after", timeout_s=120)
    button = page.get_by_role("button", name="Cancel")
    watched.until(lambda: button.count() == 0, 60, "the Cancel button to go once the run ended")
    assert page.get_by_text("You cancelled it after").count() == 1  # the outcome stays on the page


def test_a_quick_intrinsic_dimension_measurement_finishes_and_survives_a_reload(watched: object) -> None:
    page = watched.page
    visit(page, "intrinsic_dim")
    assert page.get_by_text("Planned: up to").count() == 1  # the estimate shows before it starts
    page.get_by_role("button", name="Measure").click()
    wait_for_text(watched, re.compile(r"trials done|queued"), timeout_s=120)
    page.reload()
    settle(page)
    wait_for_text(watched, "Local intrinsic dimension d90", timeout_s=JOB_TIMEOUT_S)
    page.reload()
    settle(page)
    wait_for_text(watched, "Local intrinsic dimension d90", timeout_s=60)
    table = page.locator('[data-testid="stDataFrame"]')
    watched.until(lambda: table.count() >= 1, 60, "the table of the groups' d90")
