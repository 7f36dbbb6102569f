"""The report of a small real run, opened in headless Chromium at desktop and phone widths.

A real browser parses the page and runs BokehJS and the table script, so this catches what string checks cannot:
console errors, exceptions, and a scene name that turns into markup (a file named like an ``<img onerror>``
would open an alert dialog, which counts as an error). Screenshots go to ``$SCENECLUSTER_SCREENSHOTS`` when set
(else the test's temporary folder), to be looked at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scenecluster.config import AssignJobConfig, load_config
from scenecluster.job import run_assign_job, run_cluster_job
from scenecluster.testing.browser import find_chromium, visit
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration

XSS = "<img src=x onerror=alert(1)>.jpg"
BOKEH_READY = "!!(window.Bokeh && Bokeh.index && Object.keys(Bokeh.index).length)"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here with apt-get where it is missing and this user may."""
    exe = find_chromium()
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (
            ["apt-get", "install", "-y", "chromium"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "chromium"],
        ):
            if subprocess.run(step, env=env, capture_output=True, timeout=900).returncode == 0 and find_chromium():
                break
        exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium executable, and apt-get could not install Debian's chromium package here")
    return exe


@pytest.fixture(scope="module")
def small_run(ray_cluster, tmp_path_factory, tiny_model_dir: Path) -> tuple[Path, Path, dict]:
    """A real clustering run of 25 scenes (one named like markup) with the tiny model: (scenes, run, metrics)."""
    root = tmp_path_factory.mktemp("report-run")
    scenes = copy_sample(root / "scenes", per_class=6, classes=4)
    shutil.copy(next((scenes / "Forest").iterdir()), scenes / "Forest" / XSS)
    out = root / "out"
    overrides = {
        "data.input": str(scenes),
        "output": str(out),
        "data.labels": "folders",
        "embed.model": str(tiny_model_dir),
        "embed.batch_size": 8,
        "embed.image_size": 28,
        "reduce.n_neighbors": 10,
        "cluster.n_components": 10,
    }
    return scenes, out, run_cluster_job(load_config(None, overrides), echo=lambda s: None)


def test_report_opens_clean_in_chromium(small_run, tmp_path: Path, tiny_model_dir: Path, chromium: str) -> None:
    _, out, metrics = small_run
    shots = Path(os.environ.get("SCENECLUSTER_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    expressions = {
        "card": "document.querySelector('dl.card').innerText.replace(/\\u00a0/g, ' ').toLowerCase()",
        "rows": "document.querySelectorAll('table.clusters tbody tr').length",
        "names_as_text": f"document.body.innerText.includes({XSS[:-4]!r})",
        "injected": "document.querySelectorAll('img[src=\"x\"]').length",
        "plots": "Bokeh.documents.length",
        # sorting by the scenes column, ascending then descending
        "ascending": "document.querySelector('table.clusters th:nth-child(2)').click(),"
        " [...document.querySelectorAll('table.clusters tbody tr td:nth-child(2)')].map(c => +c.dataset.v)",
        "descending": "document.querySelector('table.clusters th:nth-child(2)').click(),"
        " [...document.querySelectorAll('table.clusters tbody tr td:nth-child(2)')].map(c => +c.dataset.v)",
    }
    for width, height in ((1280, 900), (390, 844)):
        seen = visit(
            out / "report.html",
            width=width,
            height=height,
            ready=BOKEH_READY,
            expressions=expressions,
            full_page=True,
            chromium=chromium,
        )
        assert seen.errors == [], seen.errors
        assert seen.ready_seconds < 20
        v = seen.values
        for text in (
            f"model {tiny_model_dir}".lower(),
            "layer 0 (the model's choice: 2)",  # the tiny model names no layer: its last of 2
            "pooling cls",
            "image_size 28",
            "n_neighbors 10",
            "method dpgmm",
            "device cpu",
            "seed 0",
        ):
            assert text in v["card"], (text, v["card"])
        assert v["rows"] == metrics["n_clusters"] >= 1
        assert v["names_as_text"] is True and v["injected"] == 0
        assert v["plots"] == 1
        assert v["ascending"] == sorted(v["ascending"]) and v["descending"] == sorted(v["descending"], reverse=True)
        path = shots / f"report-small-{width}.png"
        path.write_bytes(seen.screenshot)
        assert seen.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(seen.screenshot) > 20_000


def test_the_browser_check_sees_injected_script_and_errors(tmp_path: Path, chromium: str) -> None:
    """The checks above can fail: an unescaped name runs its ``onerror``, a broken script logs an exception."""
    page = tmp_path / "bad.html"
    page.write_text(f"<!doctype html><body><p>{XSS}</p><script>console.error('boom'); undefinedCall();</script>")
    seen = visit(
        page,
        width=800,
        height=600,
        chromium=chromium,
        expressions={"injected": "document.querySelectorAll('img[src=\"x\"]').length"},
    )
    assert seen.values["injected"] == 1
    assert any(e.startswith("dialog: alert") for e in seen.errors), seen.errors
    assert any("boom" in e for e in seen.errors) and any("undefinedCall" in e for e in seen.errors), seen.errors


def test_assign_run_writes_a_report_with_its_novel_scenes(small_run, tmp_path: Path, chromium: str) -> None:
    """``assign`` writes a report too: the saved run's clusters, drawn in the projection, novel scenes listed."""
    scenes, run, _ = small_run
    cfg = load_config(
        None,
        {"data.input": str(scenes), "data.labels": "folders", "output": str(tmp_path / "new"), "clustering": str(run)},
        model=AssignJobConfig,
    )
    metrics = run_assign_job(cfg, echo=lambda s: None)
    page = (tmp_path / "new" / "report.html").read_text()
    assert "first two principal axes of the 5-D projection" in page and "clustering from" in page
    seen = visit(
        tmp_path / "new" / "report.html",
        width=1280,
        height=900,
        ready=BOKEH_READY,
        chromium=chromium,
        expressions={
            "rows": "document.querySelectorAll('table.clusters tbody tr').length",
            "novel": "document.querySelectorAll('#novel figure').length",
        },
    )
    assert seen.errors == [], seen.errors
    assert seen.values["rows"] == metrics["n_clusters"]
    assert seen.values["novel"] == min(metrics["n_novel"], 3 * 8)
