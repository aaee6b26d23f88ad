"""The MLflow UI on a real sweep's store, served by ``sweeper ui`` and opened in headless Chromium: the study's run,
its trial runs, their metrics, the study plots and the trials view whose URL the command prints.

Needs Chromium at /usr/bin/chromium (``make system`` installs it). Without it the tests fail and say
so; ``QLORA_SWEEP_SKIP_BROWSER=1`` skips them instead. Each test leaves a screenshot of what it saw, pass
or fail, in ``test-artifacts/`` at the repository root, or in ``$SCREENSHOT_DIR`` when that is set:
``ui-runs-table.png``, ``ui-trials-view.png``, ``ui-trial-metrics.png`` and ``ui-study-plots.png``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.config import SweepConfig
from sweeper.plots import PAGE
from sweeper.ui import TRIALS_VIEW_COLUMNS
from tests.conftest import ROOT, TINY, run_cli, start_cli

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

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


def screenshot_path(name: str) -> Path:
    folder = Path(os.environ.get("SCREENSHOT_DIR") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@dataclass
class Store:
    args: list[str]
    """The sweep's overrides, as a user passes them to each verb."""
    cfg: SweepConfig
    experiment_id: str
    parent_id: str
    children: dict[str, str]
    """Child run name -> run id."""


@dataclass
class UI:
    store: Store
    url: str
    trials_url: str
    """The second URL ``sweeper ui`` prints: the trials, best final eval loss first."""
    browser: Browser

    def open(self, route: str) -> Page:
        page = self.browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{self.url}/#/experiments/{self.store.experiment_id}/{route}")
        return page


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
    assert parent.data.tags["trials_complete"] == "2"
    return Store(args, cfg, experiment.experiment_id, parent.info.run_id, children)


def printed_urls(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The base URL and the trials view's URL that ``sweeper ui`` prints; fails with its output if it exits first."""
    lines: list[str] = []
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    # No timeout needed: the command gives up by itself when its server does not answer within 120 s.
    for line in proc.stdout:
        lines.append(line)
        for prefix in ("MLflow UI for ", "trials, "):
            if line.startswith(prefix):
                urls[prefix] = re.findall(r"https?://\S+", line)[-1]
        if len(urls) == 2:
            return urls["MLflow UI for "], urls["trials, "]
    pytest.fail(f"`sweeper ui` exited with code {proc.wait()} before printing both URLs:\n{''.join(lines)[-3000:]}",
                pytrace=False)


@pytest.fixture(scope="module")
def ui(store: Store) -> Iterator[UI]:
    """One server and one browser for the module: the server takes ~20 s to answer on 2 CPU cores."""
    from playwright.sync_api import sync_playwright

    log = store.cfg.output_path / "ui.log"
    log.write_text("a previous start\n")
    # As a user runs it, with the sweep's overrides (the store, its artifact folder, loopback and a free port).
    proc = start_cli("ui", *store.args, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, trials_url = printed_urls(proc)
        assert "a previous start" not in log.read_text()  # each start begins a new log
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(require_chromium()), args=CHROMIUM_FLAGS)
            try:
                yield UI(store, url, trials_url, browser)
            finally:
                browser.close()
    finally:
        # Ctrl-C, as the command says: it stops its server (a process group of its own, which SIGINT to the
        # command does not reach) before it exits.
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)  # the server's own shutdown is slow on a loaded machine
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
    # Only reached when the setup succeeded: a failed start already failed with the command's output.
    assert code == 128 + signal.SIGINT
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_runs_page_shows_the_study_run_and_its_trial_runs(ui: UI) -> None:
    from playwright.sync_api import expect

    store = ui.store
    page = ui.open("runs")
    try:
        # The run table is a grid; a run's name cell links to the run's page.
        parent_cell = page.get_by_role("gridcell").filter(has=page.locator(f'a[href$="/runs/{store.parent_id}"]'))
        expect(parent_cell).to_have_count(1, timeout=UI_TIMEOUT_MS)
        expect(parent_cell).to_contain_text("qlora-default")
        # Child runs sit under their parent, collapsed: its expand button shows them.
        first_child = page.locator(f'a[href$="/runs/{store.children["trial-0"]}"]')
        expect(first_child).to_have_count(0)
        parent_cell.get_by_role("button").first.click()
        for name, run_id in store.children.items():
            expect(page.locator(f'a[href$="/runs/{run_id}"]')).to_have_text(name, timeout=30_000)
    finally:
        page.screenshot(path=str(screenshot_path("ui-runs-table.png")))
        page.close()


def test_printed_trials_url_shows_eval_loss_and_trial_state_best_first(ui: UI) -> None:
    """The runs table opens with the trials at top level, sorted by final eval loss, its columns beside the names."""
    from playwright.sync_api import expect

    store = ui.store
    assert ui.trials_url.startswith(f"{ui.url}/#/experiments/{store.experiment_id}/runs?"), ui.trials_url
    client = MlflowClient(store.cfg.tracking_uri)
    trials = sorted((client.get_run(run_id) for run_id in store.children.values()),
                    key=lambda run: run.data.metrics["final_eval_loss"])
    page = ui.browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(ui.trials_url)
    try:
        for column in TRIALS_VIEW_COLUMNS:
            expect(page.locator(f'[role=columnheader][col-id="{column}"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
        # A row is split across the grid's pinned and scrolling parts; both carry the run's id and position.
        for position, run in enumerate(trials):
            row = page.locator(f'[role=row][row-id="{run.info.run_id}"]')
            expect(row.first).to_have_attribute("row-index", str(position), timeout=30_000)
            expect(row.locator('[col-id="attributes.`Run Name`"]')).to_contain_text(run.info.run_name)
            state = row.locator('[col-id="tags.`trial_state`"]')
            expect(state).to_be_visible()
            expect(state).to_have_text(run.data.tags["trial_state"])
            for metric in ("final_eval_loss", "eval_loss"):
                cell = row.locator(f'[col-id="metrics.`{metric}`"]')
                expect(cell).to_be_visible()
                assert float(cell.inner_text()) == pytest.approx(run.data.metrics[metric]), metric
    finally:
        page.screenshot(path=str(screenshot_path("ui-trials-view.png")))
        page.close()


def test_a_trial_run_charts_its_step_metrics(ui: UI) -> None:
    from playwright.sync_api import expect

    page = ui.open(f"runs/{ui.store.children['trial-0']}/model-metrics")
    try:
        card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=page.get_by_text("train_loss", exact=True))
        expect(card).to_have_count(1, timeout=UI_TIMEOUT_MS)
        # The run's charts are plotly figures too: a drawn line has a path with points in it.
        expect(card.locator(".main-svg").first).to_be_visible(timeout=30_000)
        expect(card.locator(".scatterlayer .trace path.js-line")).not_to_have_count(0)
    finally:
        page.screenshot(path=str(screenshot_path("ui-trial-metrics.png")))
        page.close()


def test_study_plots_draw_in_the_artifact_view(ui: UI) -> None:
    """MLflow shows HTML from a blob: URL in an iframe sandboxed to scripts only: the page must bring its own
    plotly.js, and no plot may need the network or a file next to it."""
    from playwright.sync_api import expect

    page = ui.browser.new_page(viewport={"width": 1600, "height": 1000})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{ui.url}/#/experiments/{ui.store.experiment_id}/runs/{ui.store.parent_id}/artifacts/plots/{PAGE}")
    try:
        iframe = page.locator("iframe.mlflow-html-iframe")
        expect(iframe).to_have_attribute("sandbox", "allow-scripts", timeout=UI_TIMEOUT_MS)
        plots = page.frame_locator("iframe.mlflow-html-iframe")
        history = plots.locator("#plot-optimization_history")
        expect(history.locator(".main-svg").first).to_be_visible(timeout=UI_TIMEOUT_MS)
        # One marker per completed trial: the figure drew the study's data, not just its axes.
        expect(history.locator(".scatterlayer .trace path.point")).to_have_count(2)
        sections = plots.locator("section")
        assert sections.count() >= 2, "the page should hold every plot that applies, not only the history"
        for section in sections.all():
            expect(section.locator(".main-svg").first).to_be_visible()
        assert not [url for url in requested if "plotly" in url.lower()], requested
    finally:
        page.screenshot(path=str(screenshot_path("ui-study-plots.png")))
        page.close()
