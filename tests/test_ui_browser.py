"""The MLflow UI on a real sweep's store, in headless Chromium: the study's run and its trial runs.

Needs Chromium at /usr/bin/chromium (``make system`` installs it). Without it the test fails and says
so; ``QLORA_SWEEP_SKIP_BROWSER=1`` skips it instead. ``SCREENSHOT_DIR`` keeps a copy of the screenshot.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.config import SweepConfig
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# Flags that render the UI on a headless server. Playwright adds --headless and its own throwaway
# --user-data-dir (it refuses one passed here).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 120_000  # the UI's first render on 2 CPU cores takes tens of seconds


def require_chromium() -> Path:
    """Chromium's path; a failure naming the fix when it is missing (a skip only when asked for)."""
    if os.environ.get("QLORA_SWEEP_SKIP_BROWSER") == "1":
        pytest.skip("QLORA_SWEEP_SKIP_BROWSER=1")
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `make system` (or `apt-get install -y "
                    "chromium`), or set QLORA_SWEEP_SKIP_BROWSER=1 to skip the browser test", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is missing: run `make setup`", pytrace=False)
    return CHROMIUM


@dataclass
class Store:
    cfg: SweepConfig
    experiment_id: str
    parent_id: str
    children: dict[str, str]
    """Child run name -> run id."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A real two-trial sweep, run as a user would, then read back to know which runs to look for."""
    require_chromium()  # before the sweep: a missing browser should not cost a sweep
    out = tmp_path_factory.mktemp("ui-sweep")
    args = [*TINY, f"output_dir={out}", "study.n_trials=2"]
    done = run_cli("launch", *args, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg, _ = compose.load(args)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r.info.run_id for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.run_name == cfg.study.name == "qlora-default"
    assert sorted(children) == ["trial-0", "trial-1"]
    return Store(cfg, experiment.experiment_id, parent.info.run_id, children)


def keep_screenshot(path: Path) -> None:
    target = os.environ.get("SCREENSHOT_DIR")
    if target and path.exists():
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


def test_runs_page_shows_the_study_run_and_its_trial_runs(store: Store, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from sweeper.ui import start_ui, stop_ui

    chromium = require_chromium()
    # As `sweeper ui` does: the sweep's store, its artifact folder, loopback and a free port.
    artifacts = store.cfg.output_path / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    proc, url = start_ui(store.cfg.tracking_uri, artifacts.as_uri())
    screenshot = tmp_path / "mlflow-ui-runs.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            try:
                page.goto(f"{url}/#/experiments/{store.experiment_id}/runs")
                # The run table is a grid; a run's name cell links to the run's page.
                parent_cell = page.get_by_role("gridcell").filter(
                    has=page.locator(f'a[href$="/runs/{store.parent_id}"]'))
                expect(parent_cell).to_have_count(1, timeout=UI_TIMEOUT_MS)
                expect(parent_cell).to_contain_text("qlora-default")
                # Child runs sit under their parent, collapsed: its expand button shows them.
                first_child = page.locator(f'a[href$="/runs/{store.children["trial-0"]}"]')
                expect(first_child).to_have_count(0)
                parent_cell.get_by_role("button").first.click()
                for name, run_id in store.children.items():
                    expect(page.locator(f'a[href$="/runs/{run_id}"]')).to_have_text(name, timeout=30_000)
            finally:
                page.screenshot(path=str(screenshot))
                browser.close()
    finally:
        stop_ui(proc)
        keep_screenshot(screenshot)
    assert screenshot.stat().st_size > 0
