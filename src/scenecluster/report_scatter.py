"""The report's interactive scatter: Bokeh, with BokehJS inlined so the page stays one offline file.

Bokeh is used (rather than a figure drawn in Python) so an analyst can hover a dot and see the scene, its path,
label and probability, zoom into a crowded region and switch the colours from clusters to true classes. Only the
BokehJS core and widgets are inlined (about 1.6 MB), not MathJax or WebGL. Hover values are HTML-escaped by
Bokeh's tooltip templates (no ``{safe}``), so a scene named like markup shows as text.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

__all__ = ["PALETTE", "bokeh_js", "palette_for", "scatter_components"]

HOVER_THUMBNAILS = 2000  # dots whose hover shows the scene; more would add about 1 kB each to the page
BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


def _palette() -> list[str]:
    import colorcet

    # Glasbey's palette is built for many categories: each colour as far as possible from all before it, so
    # neighbouring cluster ids never get a light/dark pair that reads as "related" (as tab20's pairs do).
    return list(colorcet.palette["glasbey_category10"])


PALETTE = _palette()


def palette_for(values: list) -> dict:
    """A colour for each distinct value, in the order given."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(values)}


def bokeh_js() -> str:
    """The BokehJS core and widgets as inline ``<script>`` tags."""
    from bokeh.resources import Resources

    return Resources(mode="inline", components=["bokeh", "bokeh-widgets"]).render_js()


def _medians(x: np.ndarray, y: np.ndarray, keys: np.ndarray) -> dict[str, list]:
    values = [v for v in dict.fromkeys(keys.tolist()) if v is not None]
    return {
        "x": [float(np.median(x[keys == v])) for v in values],
        "y": [float(np.median(y[keys == v])) for v in values],
        "text": [str(v) for v in values],
    }


def _columns(sample: dict, cluster_colors: dict, class_colors: dict, thumb: Callable[[str], str | None]) -> dict:
    n = len(sample["path"])
    with_thumb = np.zeros(n, dtype=bool)
    with_thumb[np.random.default_rng(0).permutation(n)[:HOVER_THUMBNAILS]] = True
    agreement = sample["agreement"]
    c_cluster = [cluster_colors[int(c)] for c in sample["cluster"]]
    thumbs = [(thumb(str(p)) if w else None) or BLANK for p, w in zip(sample["path"], with_thumb, strict=True)]
    return {
        "x": sample["x"].tolist(),
        "y": sample["y"].tolist(),
        "cluster": [str(int(c)) for c in sample["cluster"]],
        "label": [str(v) if v is not None else "no label" for v in sample["label"]],
        "name": [os.path.basename(str(p)) for p in sample["path"]],
        "path": [str(p) for p in sample["path"]],
        "prob": [f"{p:.3f}" for p in sample["probability"]],
        "agree": ["not checked" if np.isnan(a) else f"{a:.0%}" for a in agreement],
        "thumb": thumbs,
        "tw": [96 if t != BLANK else 0 for t in thumbs],  # dots without a thumbnail show no empty box
        "c_cluster": c_cluster,
        "c_class": [class_colors.get(v, "#888888") for v in sample["label"]],
        "color": c_cluster,
    }


TOOLTIP = """
<div style="max-width:260px;font:12px sans-serif">
  <img src="@thumb" width="@tw" height="@tw" style="image-rendering:pixelated;display:block" alt="">
  <div style="word-break:break-all"><b>@name</b></div>
  <div style="word-break:break-all;color:#555">@path</div>
  <div>cluster <b>@cluster</b> &middot; label <b>@label</b></div>
  <div>probability @prob &middot; neighbours in cluster @agree</div>
</div>
"""


LABEL_STYLE = {
    "text_font_size": "13px",
    "text_font_style": "bold",
    "background_fill_color": "white",
    "background_fill_alpha": 0.75,
    "text_align": "center",
    "text_baseline": "middle",
}

TOGGLE_JS = """
const d = source.data;
d.color = cb_obj.active == 0 ? d.c_cluster : d.c_class;
a.visible = cb_obj.active == 0;
b.visible = cb_obj.active == 1;
source.change.emit();
"""


def _labels(sample: dict, keys: np.ndarray, visible: bool):
    """Text at each group's median position (cluster numbers, or class names)."""
    from bokeh.models import ColumnDataSource, LabelSet

    x, y = np.asarray(sample["x"]), np.asarray(sample["y"])
    source = ColumnDataSource(_medians(x, y, keys))
    return LabelSet(x="x", y="y", text="text", source=source, visible=visible, **LABEL_STYLE)


def scatter_components(
    sample: dict, cluster_colors: dict, class_colors: dict, thumb: Callable[[str], str | None]
) -> tuple[str, str]:
    """``(script, div)`` of the scatter: dots coloured by cluster, cluster numbers on the plot, and with
    labels a toggle to colour by true class."""
    from bokeh.embed import components
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, RadioButtonGroup
    from bokeh.plotting import figure

    source = ColumnDataSource(_columns(sample, cluster_colors, class_colors, thumb))
    fig = figure(
        height=560, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset", toolbar_location="above"
    )
    size = max(3.0, min(8.0, 30000 / max(len(sample["path"]), 1) ** 1.1))
    dots = fig.scatter("x", "y", source=source, size=size, color="color", alpha=0.75, line_color=None)
    fig.add_tools(HoverTool(renderers=[dots], tooltips=TOOLTIP))
    fig.xaxis.visible = fig.yaxis.visible = False
    fig.grid.visible = False
    by_cluster = _labels(sample, np.asarray(sample["cluster"]), True)
    fig.add_layout(by_cluster)
    if not class_colors:
        return components(fig)
    by_class = _labels(sample, np.asarray(sample["label"], dtype=object), False)
    fig.add_layout(by_class)
    toggle = RadioButtonGroup(labels=["colour by cluster", "colour by true class"], active=0)
    args = {"source": source, "a": by_cluster, "b": by_class}
    toggle.js_on_change("active", CustomJS(args=args, code=TOGGLE_JS))
    return components(column(toggle, fig, sizing_mode="stretch_width"))
