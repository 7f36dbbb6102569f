"""``scenecluster.report.write_report``: one self-contained HTML page."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from scenecluster.report import write_report


def _inputs(n: int = 24) -> dict:
    rng = np.random.default_rng(0)
    clusters = np.array([0] * 12 + [1] * 8 + [2] * 4)[:n]
    return {
        "paths": [f"img{i}.jpg" for i in range(n)],
        "clusters": clusters,
        "xy": rng.normal(size=(n // 2, 2)),
        "xy_index": np.arange(0, n, 2),
        "metrics": {"n_images": n, "ari": 0.123456, "counts": {"a": 1}, "stage_seconds": {"embed": 2.04}},
        "read_thumbnail": lambda p: None if p == "img0.jpg" else np.zeros((8, 8, 3), np.uint8),
        "thumbnails_per_cluster": 3,
    }


def test_write_report_takes_no_path() -> None:
    assert "path" not in inspect.signature(write_report).parameters
    with pytest.raises(TypeError):
        write_report("report.html", **_inputs())  # type: ignore[misc]


@pytest.mark.parametrize("with_labels", [True, False])
def test_write_report_page(with_labels: bool) -> None:
    labels = ["forest"] * 9 + ["sea"] * 15 if with_labels else None
    page = write_report(**_inputs(), labels=labels)
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")
    assert "<tr><th>ari</th><td>0.1235</td></tr>" in page
    assert "<tr><th>counts</th><td>{&quot;a&quot;: 1}</td></tr>" in page
    assert "<tr><th>embed</th><td>2.0 s</td></tr>" in page
    assert "<th>stage_seconds</th>" not in page
    assert page.count('alt="montage"') == 3
    assert ('alt="confusion matrix"' in page) is with_labels
    assert ("<h2>Projection, sizes, confusion</h2>" in page) is with_labels
    assert page.count("data:image/png;base64,") == 3 + 2 + with_labels


def test_write_report_is_reproducible() -> None:
    assert write_report(**_inputs(), seed=3) == write_report(**_inputs(), seed=3)
