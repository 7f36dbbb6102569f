"""A self-contained HTML report of one run, read from its output folder.

The page is one offline file (thumbnails are WebP data URIs, BokehJS is inlined) so it can be mailed or opened
from S3. It is built from the run's files (:mod:`scenecluster.report_data`), so ``scenecluster report RUN``
regenerates it from any finished run and two reports can be told apart by the run card and compared by tools
through the config and metrics embedded as JSON.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scenecluster.outputs import OutputFolder
from scenecluster.report_data import RunFacts, cluster_rows, gather_run
from scenecluster.report_html import (
    cluster_table,
    confusion_table,
    esc,
    gallery,
    run_card,
    scores_table,
    skipped_section,
    swatch,
    timing_table,
)
from scenecluster.report_scatter import bokeh_js, palette_for, scatter_components

__all__ = ["Thumbnails", "build_report", "render_report", "write_report_file"]

THUMB_SIZE = 64  # EuroSAT's own size; shown at 72 CSS px
HOVER_SIZE = 48  # the scatter's hover thumbnails, shown at 96 CSS px
PREFETCH_THREADS = 16  # thumbnails read at once: S3 serves many requests in parallel, each some 20-100 ms
DOUBTFUL = 24


@dataclass
class _SharedThumbnails:
    """What a page's thumbnails of every size share: those made (``(path, size)`` -> data URI or None), why a scene
    could not be read, and, while :meth:`Thumbnails.prefetch` draws, the ones wanted."""

    unreadable: dict[str, str]
    cache: dict[tuple[str, int], str | None] = field(default_factory=dict)
    wanted: set[tuple[str, int]] | None = None


class Thumbnails:
    """``path -> WebP data URI`` (or ``None`` when unreadable), each scene read once per size.

    ``unreadable`` keeps why each scene could not be read (shared with the hover thumbnails, :meth:`sized`), so the
    report's writer can say so once: a report of a run whose input moved, or that needs settings this shell lacks
    (credentials, ``AWS_REQUEST_PAYER``), otherwise shows only tiles marked "unreadable". A member of a ``.tar``
    shard is read by the byte range its embedding recorded; one without a recorded range (a compressed shard, an
    older run) is not read, as only its whole shard, up to gigabytes, holds it, and the line says so apart.

    :meth:`prefetch` reads every thumbnail a page shows in parallel before the page is drawn: a page shows some
    2,400 scenes, each one or two requests to the store, which one after another take minutes at S3's latency.
    """

    def __init__(
        self,
        read_image: Callable[[str, int], np.ndarray],
        size: int = THUMB_SIZE,
        unreadable: dict[str, str] | None = None,
        *,
        _shared: _SharedThumbnails | None = None,
    ) -> None:
        self.read_image, self.size = read_image, size
        self.shared = _shared or _SharedThumbnails(unreadable={} if unreadable is None else unreadable)
        self.unreadable = self.shared.unreadable

    def sized(self, size: int) -> Thumbnails:
        """The same scenes at another ``size`` (the scatter's hover thumbnails), sharing what was read and why not."""
        return Thumbnails(self.read_image, size, _shared=self.shared)

    def __call__(self, path: str) -> str | None:
        key = (path, self.size)
        cache = self.shared.cache
        if key not in cache:
            if self.shared.wanted is not None:  # a prefetch's first drawing: note it, read nothing yet
                self.shared.wanted.add(key)
                return None
            cache[key] = self._keep(path, *self._read(path, self.size))
        return cache[key]

    def prefetch(self, draw: Callable[[Thumbnails], object], threads: int = PREFETCH_THREADS) -> None:
        """Call ``draw(self)`` once to learn which thumbnails it shows (it gets none), then read them all with
        ``threads`` reads in flight; a later drawing finds them read."""
        from concurrent.futures import ThreadPoolExecutor

        self.shared.wanted = set()
        try:
            draw(self)
            wanted = sorted(self.shared.wanted)
        finally:
            self.shared.wanted = None
        with ThreadPoolExecutor(max(1, threads)) as pool:
            made = list(pool.map(lambda key: self._read(*key), wanted))
        for (path, size), result in zip(wanted, made, strict=True):  # in order: the same "first" on every run
            self.shared.cache[(path, size)] = self._keep(path, *result)

    def _read(self, path: str, size: int) -> tuple[str | None, str | None]:
        """The scene's data URI, or why it could not be read."""
        from scenecluster.data import DECODE_ERRORS, decode_failure
        from scenecluster.shard_members import NO_RANGE, NoRecordedRange

        try:
            return self._encode(self.read_image(path, size)), None
        except NoRecordedRange:
            return None, NO_RANGE
        except DECODE_ERRORS as exc:
            return None, decode_failure(exc)

    def _keep(self, path: str, uri: str | None, reason: str | None) -> str | None:
        if reason is not None:
            self.unreadable.setdefault(path, reason)
        return uri

    def summary(self, where: str) -> str | None:
        """One line on the scenes shown without a picture: shard members without a recorded place, and those that
        could not be read from ``where`` (the first one's reason); None when every scene was shown."""
        from scenecluster.shard_members import NO_RANGE

        in_shards = sum(reason == NO_RANGE for reason in self.unreadable.values())
        failed = {path: reason for path, reason in self.unreadable.items() if reason != NO_RANGE}
        said = []
        if failed:
            path, reason = next(iter(failed.items()))
            said.append(f"{_scenes(len(failed))} could not be read from {where} (first: {path}: {reason})")
        if in_shards:
            said.append(f"{_scenes(in_shards)} in .tar shards {NO_RANGE}")
        return f"[report] shown without a picture: {'; '.join(said)}" if said else None

    @staticmethod
    def _encode(rgb: np.ndarray) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="WEBP", quality=70, method=4)
        return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scenes(n: int) -> str:
    return f"{n:,} scene{'s' if n != 1 else ''}"


def _records(table, **extra) -> list[dict[str, Any]]:
    return [{**r, **extra} for r in table.to_pylist()]


def _least_certain(facts: RunFacts, cid: int, k: int) -> list[dict[str, Any]]:
    """A cluster's scenes to doubt: sampled members with the least neighbour agreement, then lowest probability."""
    s = facts.sample
    picked: list[dict[str, Any]] = []
    if s:
        members = np.flatnonzero((s["cluster"] == cid) & ~np.isnan(s["agreement"]))
        for i in members[np.lexsort((s["probability"][members], s["agreement"][members]))][:k]:
            picked.append({c: s[c][i] for c in ("path", "label", "probability", "agreement")})
    seen = {p["path"] for p in picked}
    # clusters with few sampled members are filled up with their lowest-probability scenes from every part
    unsure = [r for r in _records(facts.unsure) if r["cluster"] == cid and r["path"] not in seen]
    return picked + sorted(unsure, key=lambda r: r["probability"])[: k - len(picked)]


def _typical(facts: RunFacts, cid: int, k: int) -> list[dict[str, Any]]:
    rows = [r for r in _records(facts.typical) if r["cluster"] == cid]
    return sorted(rows, key=lambda r: -r["log_likelihood"])[:k]


def _strips(facts: RunFacts, rows, thumb: Thumbnails, colors: dict, k: int) -> str:
    """Per cluster, largest first: its most typical scenes (highest density) and those to doubt."""
    parts = []
    for r in sorted(rows, key=lambda r: -r.size):
        title = f"Cluster {r.cluster}: {r.size:,} scenes ({r.share:.1%})"
        if r.majority is not None:
            title += f", {r.purity:.0%} {r.majority}"
        flags = "".join(f"<span class='flag'>{esc(f)}</span>" for f in r.flags)
        parts.append(
            f"<section class='cl' id='cluster-{r.cluster}'><h3>{swatch(colors[r.cluster])}{esc(title)} {flags}</h3>"
            "<h4>most typical (highest density)</h4>"
            f"{gallery(_typical(facts, r.cluster, k), thumb, with_cluster=False)}"
            f"<h4>least certain (fewest neighbours in the cluster, lowest probability)</h4>"
            f"{gallery(_least_certain(facts, r.cluster, k), thumb, with_cluster=False)}</section>"
        )
    return "".join(parts)


def _doubtful(facts: RunFacts) -> list[dict[str, Any]]:
    """The run's most doubtful sampled scenes: fewest neighbours in their own cluster, then lowest probability."""
    s = facts.sample
    if not s:
        return []
    checked = np.flatnonzero(~np.isnan(s["agreement"]))
    order = checked[np.lexsort((s["probability"][checked], s["agreement"][checked]))][:DOUBTFUL]
    return [{c: s[c][i] for c in ("path", "label", "probability", "agreement", "cluster")} for i in order]


PROJECTIONS = {
    "umap2d": "Positions come from a separate 2-D UMAP of the model's features (the run's UMAP settings with two "
    "dimensions), drawn for display only; the clusters were found in the run's {dims}-D projection, so clusters "
    "that overlap here may be apart there.",
    "pca": "Positions are the first two principal axes of the {dims}-D projection the scenes were assigned in.",
}


def _scatter_section(facts: RunFacts, thumb: Thumbnails, colors: dict, class_colors: dict) -> tuple[str, str]:
    if not facts.sample:
        return "<p>No scatter: the run has no sampled positions.</p>", ""
    # smaller: thousands of them ride in the plot's data
    hover = thumb.sized(HOVER_SIZE)
    script, div = scatter_components(facts.sample, colors, class_colors, hover)
    dims = facts.projection_dims or "n"
    text = PROJECTIONS[facts.projection].format(dims=dims)
    n = len(facts.sample["path"])
    caption = (
        f"<p class='help'>{n:,} scenes (a seeded sample of {facts.n_scenes:,}). {esc(text)} Cluster numbers "
        "mark each cluster's median position; hover a dot for the scene.</p>"
    )
    return caption + div, script


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  function sort() {
    var body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = up ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  th.addEventListener('click', sort);
  th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sort(); });
});
"""

_STYLE = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#111}
header,main{max-width:1200px;margin:0 auto;padding:0 16px}
header h1{margin:16px 0 0;font-size:1.6em;word-break:break-all}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 16px;z-index:10;overflow-x:auto;
  white-space:nowrap}
nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
h2{margin-top:32px;border-bottom:2px solid #eee}
h3{font-size:1.05em;margin:18px 0 4px}
h4{font-size:.85em;font-weight:normal;color:#555;margin:6px 0 2px}
.help{color:#555;font-size:.85em;font-weight:normal}
table{border-collapse:collapse}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
table.sortable th{cursor:pointer;background:#f6f6f6;vertical-align:bottom}
table.clusters td.flags{min-width:13em}
table.clusters td,table.clusters th{padding:4px 6px}
table.clusters tr>:first-child{position:sticky;left:0;background:#fff;z-index:1}
table.clusters thead tr>:first-child{background:#f6f6f6}
nav{scrollbar-width:none}
table.sortable th[data-dir=asc]::after{content:' ▲'}
table.sortable th[data-dir=desc]::after{content:' ▼'}
.sw{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:5px;vertical-align:-1px}
.flag{display:inline-block;white-space:normal;
  background:#fff3cd;border:1px solid #e0c36a;border-radius:3px;padding:0 4px;margin:1px 2px;
  font-size:.8em;font-weight:normal}
dl.card{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:6px 18px;
  background:#f7f9fc;
  border:1px solid #d8e0ea;border-radius:6px;padding:12px}
dl.card div.wide{grid-column:1/-1}
dt{font-weight:600;font-size:.8em;color:#445;text-transform:uppercase}
dd{margin:0;word-break:break-word}
.kv{display:inline-block;background:#fff;border:1px solid #d8e0ea;border-radius:3px;padding:0 5px;margin:2px 2px;
  font-size:.88em}
dl.explain div{margin:2px 0}
dl.explain dt{display:inline;text-transform:none;font-size:.85em}
dl.explain dd{display:inline;font-size:.85em;color:#555}
dl.explain dd::before{content:' — '}
table.confusion td,table.confusion th{padding:2px 6px;font-size:.85em;border:1px solid #eee}
table.confusion td.diag{outline:2px solid #111;outline-offset:-2px}
table.confusion .tot{font-weight:600;background:#fafafa}
th.rot{height:110px;vertical-align:bottom}
th.rot span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}
.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:96px;font-size:11px;line-height:1.25}
figure img,.missing{width:72px;height:72px;display:block;image-rendering:pixelated;background:#eee}
figcaption span{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
figcaption .fn{color:#777}
@media (max-width:600px){figcaption span:not(.fn){white-space:normal;overflow-wrap:anywhere}}
section.cl{border-top:1px solid #eee}
@media (max-width:600px){
  body{font-size:14px}
  figure{width:80px;font-size:10px}
  figure img,.missing{width:64px;height:64px}
  th,td{padding:3px 5px}
}
"""

SECTIONS = [
    ("run", "Run"),
    ("scores", "Scores"),
    ("clusters", "Clusters"),
    ("scatter", "Scatter"),
    ("confusion", "Cluster × class"),
    ("scenes", "Scenes"),
    ("doubtful", "Doubtful"),
    ("novel", "Novel"),
    ("timing", "Timing"),
    ("skipped", "Skipped"),
]


def _json_script(element_id: str, value: Any) -> str:
    """``value`` as JSON in a ``<script>`` that a tool can read and the browser never runs."""
    text = json.dumps(value, indent=1, default=str, sort_keys=True).replace("<", "\\u003c")
    return f"<script type='application/json' id='{element_id}'>{text}</script>"


def render_report(facts: RunFacts, thumb: Thumbnails, *, k: int = 8, report_pending: bool = False) -> str:
    """The page's HTML text for ``facts`` (the caller writes it atomically)."""
    rows = cluster_rows(facts)
    colors = palette_for(facts.cluster_ids.tolist())
    class_colors = palette_for(facts.classes) if facts.classes else {}
    scatter, script = _scatter_section(facts, thumb, colors, class_colors)
    sections = {
        "run": run_card(facts),
        "scores": scores_table(facts.metrics),
        "clusters": cluster_table(rows, colors, facts.classes is not None),
        "scatter": scatter,
        "confusion": confusion_table(facts.table, facts.cluster_ids, facts.classes, colors)
        if facts.table is not None
        else "<p>The scenes have no labels.</p>",
        "scenes": _strips(facts, rows, thumb, colors, k),
        "doubtful": "<p class='help'>The sampled scenes with the fewest of their 10 nearest neighbours (in the "
        "model's feature space) in their own cluster, then the lowest probability.</p>"
        + gallery(_doubtful(facts), thumb),
        "novel": "<p class='help'>Scenes flagged novel, least likely first.</p>"
        + gallery(_records(facts.novel_scenes), thumb),
        "timing": timing_table(facts.metrics, facts.n_scenes, report_pending),
        "skipped": skipped_section(facts.skipped),
    }
    if not len(facts.novel_scenes):
        sections["novel"] = "<p>No scene was flagged novel.</p>"
    nav = "".join(f"<a href='#{key}'>{name}</a>" for key, name in SECTIONS)
    body = "".join(f"<section id='{key}'><h2>{name}</h2>{sections[key]}</section>" for key, name in SECTIONS)
    subtitle = (
        f"{facts.n_scenes:,} scenes in {len(facts.cluster_ids)} clusters · finished {facts.finished} · "
        f"{(facts.config.get('embed') or {}).get('model', '')}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(facts.name)} · scenecluster report</title><style>{_STYLE}</style>{bokeh_js()}</head><body>"
        f"<header><h1>{esc(facts.name)}</h1><p class='help'>{esc(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main>{_json_script('run-config', facts.config)}{_json_script('run-metrics', facts.metrics)}"
        f"{_json_script('run-identity', facts.identity)}{script}<script>{_SORT_JS}</script></body></html>"
    )


def build_report(
    out: OutputFolder,
    *,
    input_uri: str | None = None,
    endpoint_url: str | None = None,
    metrics: dict[str, Any] | None = None,
    report_pending: bool = False,
    echo: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> str:
    """Read the run folder ``out`` and render its report; scenes are read from ``input_uri`` (default: the
    run's own input) for the thumbnails, ``threads`` at a time (default: the run's ``report.thumbnail_reads``).
    Scenes that could not be read are said in one line to ``echo``."""
    from scenecluster.data import SceneListing, input_filesystem, read_image_for_display
    from scenecluster.shard_members import ShardMemberReader

    k = _thumbnails_per_cluster(out)
    facts = gather_run(out, metrics=metrics, k=k)
    data = facts.config.get("data") or {}
    uri = input_uri or data.get("input") or out.root
    fs, root = input_filesystem(uri, endpoint_url=endpoint_url or data.get("endpoint_url"))
    listing = SceneListing(uri=uri, root=root, paths=[], filesystem=fs)
    pixels = _pixel_spec(facts.config)
    members = ShardMemberReader(out, fs)
    thumb = Thumbnails(lambda path, size: read_image_for_display(listing, path, size, pixels, members=members))
    if threads is None:
        threads = int((facts.config.get("report") or {}).get("thumbnail_reads") or PREFETCH_THREADS)
    thumb.prefetch(lambda t: render_report(facts, t, k=k, report_pending=report_pending), threads=threads)
    page = render_report(facts, thumb, k=k, report_pending=report_pending)
    if echo is not None and (line := thumb.summary(uri)):
        echo(line)
    return page


def _pixel_spec(config: dict[str, Any]):
    """Bands and stretch as the run read its scenes, so a 16-bit scene's thumbnail is what the model saw."""
    from scenecluster.config import FeatureConfig

    embed = config.get("embed") or {}
    return FeatureConfig(**{k: embed[k] for k in FeatureConfig.PIXEL_SETTINGS if k in embed}).pixel_spec()


def _thumbnails_per_cluster(out: OutputFolder) -> int:
    config = out.read_yaml("config.yaml", default={}) or {}
    return int((config.get("report") or {}).get("thumbnails_per_cluster") or 8)


def write_report_file(
    run: str,
    output: str | None = None,
    *,
    input_uri: str | None = None,
    endpoint_url: str | None = None,
    echo: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> str:
    """Regenerate a finished run's report; write it atomically to ``output`` (default ``RUN/report.html``),
    reading ``threads`` thumbnails at a time (default: the run's ``report.thumbnail_reads``).

    Returns where it was written.

    Raises
    ------
    scenecluster.errors.SceneClusterError
        When ``run`` holds no finished run (no ``assignments/``).
    """
    from scenecluster.errors import OutputError
    from scenecluster.outputs import atomic_write_text

    out = OutputFolder(run, endpoint_url=endpoint_url)
    if not out.list("assignments"):
        raise OutputError(f"{run!r} holds no finished run: no assignments/ (run `scenecluster cluster` first)")
    page = build_report(out, input_uri=input_uri, endpoint_url=endpoint_url, echo=echo, threads=threads)
    if output is None:
        out.write_text("report.html", page)
        return out.display("report.html")
    atomic_write_text(output, page)
    return output
