"""The MLflow UI in a real browser (Debian's headless Chromium, driven by Playwright):
a finished tiny sweep shows as one expandable row whose runs show their compression_ratio;
the experiment opens on the runs table and a run's page shows its logged student Model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from kd_experiments.search import compose_config
from kd_experiments.tracking import PARENT_TAG
from kd_experiments.train import train
from tests.conftest import fast_overrides, sqlite_store
from tests.test_mlflow_server import mlflow_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
UI_TIMEOUT_MS = 90_000  # a loaded 2-core machine renders the React app slowly

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                       "(apt-get install chromium chromium-driver; .ci/run does it)"),
]


def _tiny_sweep(tmp_path: Path) -> None:
    """Two runs of a multirun (ratios 8 and 32), children of one parent, as kd-train -m makes them."""
    for job, ratio in enumerate((8, 32)):
        cfg = compose_config(
            ["experiment=quickstart", *fast_overrides(f"scheme.compression_ratio={ratio}"),
             f"paths.log_dir={tmp_path / 'logs'}"],
            sweep_dir=tmp_path / "sweep", job_num=job,
        )
        train(cfg)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A tiny sweep in a fresh store, an ``mlflow server`` on it and headless Chromium, shared by
    the module's tests (each opens its own page)."""
    from playwright.sync_api import expect, sync_playwright

    folder = tmp_path_factory.mktemp("ui")
    uri = sqlite_store(folder / "mlruns" / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        _tiny_sweep(folder)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(PARENT_TAG) == "true")
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) != "true"]
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with mlflow_server(folder, uri) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield SimpleNamespace(url=url, browser=browser, experiment=experiment, parent=parent, children=children)
        finally:
            browser.close()


def _page(ui: SimpleNamespace):
    page = ui.browser.new_page(viewport={"width": 2200, "height": 900})
    page.set_default_timeout(UI_TIMEOUT_MS)
    return page


@pytest.mark.slow
def test_mlflow_ui_shows_the_sweep_and_compression_ratios(ui: SimpleNamespace, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    experiment, parent, children, url = ui.experiment, ui.parent, ui.children, ui.url
    assert len(children) == 2
    screenshot = tmp_path / "mlflow_ui.png"
    page = _page(ui)
    try:
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs", wait_until="domcontentloaded")
        # the sweep is one row: its parent run, children folded under it
        parent_link = page.get_by_role("link", name=parent.info.run_name, exact=True)
        expect(parent_link).to_be_visible()
        parent_row = page.locator("[role=row]", has=parent_link)
        parent_row.locator("[role=gridcell][col-id='attributes.`Run Name`'] button").first.click()
        for child in children:
            expect(page.get_by_role("link", name=child.info.run_name, exact=True)).to_be_visible()
        # show the compression_ratio param as a column (exact name: not scheme.compression_ratio)
        page.get_by_role("button", name="Columns").click()
        page.get_by_text("compression_ratio", exact=True).first.click()
        page.keyboard.press("Escape")
        header = page.locator("[role=columnheader][col-id='params.`compression_ratio`']").first
        header.scroll_into_view_if_needed()
        expect(header).to_be_visible()
        for child in children:
            row = page.locator("[role=row]", has=page.get_by_role("link", name=child.info.run_name, exact=True))
            value = child.data.params["compression_ratio"]
            cell = page.locator(
                f"[role=row][row-id='{row.first.get_attribute('row-id')}'] "
                "[role=gridcell][col-id='params.`compression_ratio`']"
            ).first
            expect(cell).to_have_text(value)
            expect(cell).to_be_visible()
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_experiment_opens_on_the_runs_table_and_the_run_shows_its_model(ui: SimpleNamespace, tmp_path: Path) -> None:
    """A fresh sweep's experiment, opened as docs/sweeps.md says (model-training workflow), lands on
    the runs table with the runs' datasets; the run page lists the logged student Model.

    The experiments carry MLflow 3's kind tag (``custom_model_development``); the UI of MLflow 3.17
    takes the workflow from its GenAI / Model training switch (remembered per browser) or from
    ``?workflowType=machine_learning`` in the address, which the documented link holds.
    """
    from playwright.sync_api import expect

    from kd_experiments.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    experiment, parent, url = ui.experiment, ui.parent, ui.url
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    child = ui.children[0]
    assert {d.dataset.name for d in child.inputs.dataset_inputs} == {"digits-c6-train", "digits-c6-test"}
    screenshot = tmp_path / "mlflow_run_page.png"
    page = _page(ui)
    try:
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning",
                  wait_until="domcontentloaded")
        # the experiment page opens on the runs table: its heading, the sweep's row
        expect(page).to_have_url(re.compile(rf"/experiments/{experiment.experiment_id}/runs"))
        expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
        expect(page.get_by_role("link", name=parent.info.run_name, exact=True)).to_be_visible()
        # the run page shows the logged model and the datasets
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}",
                  wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name=re.compile(r"Logged models \(1\)"))).to_be_visible()
        expect(page.get_by_role("link", name="student", exact=True).first).to_be_visible()
        expect(page.get_by_text(re.compile(r"digits-c6-train")).first).to_be_visible()
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()
    assert screenshot.stat().st_size > 10_000
