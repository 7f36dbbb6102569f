"""The report's sections as HTML text: run card, scores, per-cluster table, cluster x class table, strips, timing.

Every number is HTML text (searchable, copyable, readable by a screen reader), never drawn into an image; every
string that comes from the run (scene paths, labels, settings) goes through :func:`esc`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from scenecluster.report_data import ClusterRow, RunFacts, diagonal_order

__all__ = [
    "SCORE_HELP",
    "cluster_table",
    "confusion_table",
    "esc",
    "gallery",
    "run_card",
    "scores_table",
    "setting_groups",
    "skipped_section",
    "timing_table",
    "total_seconds",
]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float, fmt: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


# (key in metrics.json, name an analyst reads, what it means)
SCORE_HELP = [
    ("n_images", "scenes listed", "every image file found under the input"),
    ("n_embedded", "scenes clustered", "scenes read and embedded; each has a cluster"),
    ("n_skipped", "scenes skipped", "files that could not be read or decoded (listed at the end of the page)"),
    ("n_clusters", "clusters", "clusters with at least one scene; the mixture chose this number itself"),
    ("n_classes", "true classes", "distinct labels among the scenes (used only to score, never to fit)"),
    (
        "acc",
        "matched accuracy",
        "each cluster is paired with at most one class (Hungarian matching) to "
        "maximise agreement; scenes in unpaired clusters count as errors, so every extra cluster lowers it",
    ),
    (
        "nmi",
        "normalised mutual information",
        "0-1: how much the cluster tells about the class; splitting a "
        "class into several clusters costs little here, unlike matched accuracy",
    ),
    (
        "ari",
        "adjusted Rand index",
        "agreement on pairs of scenes (same cluster vs same class): 0 is chance, 1 is identical partitions",
    ),
    ("n_fit", "scenes fitted", "the seeded sample the projection and mixture were fitted on; the rest were assigned"),
    ("converged", "mixture converged", "whether the variational fit stopped by tolerance rather than max_iter"),
    (
        "lower_bound",
        "evidence lower bound",
        "the mixture's fit to the projected sample (log scale, per scene); "
        "compares fits of the same sample and projection only, and says nothing about matching the classes",
    ),
    (
        "n_novel",
        "scenes flagged novel",
        "less likely under the mixture than the novelty quantile of held-out "
        "fitted scenes: candidates for a class the fit never saw",
    ),
]


def scores_table(metrics: dict[str, Any]) -> str:
    """The run's scores with readable names and a one-line explanation under each."""
    known = {k for k, _, _ in SCORE_HELP}
    rows = [(name, metrics[key], text) for key, name, text in SCORE_HELP if key in metrics]
    skip = known | {"stage_seconds", "scenecluster_version", "device", "started_at", "finished_at", "environment"}
    rows += [(key, value, "") for key, value in metrics.items() if key not in skip]
    body = "".join(
        f"<tr><th scope='row'>{esc(name)}<div class='help'>{esc(text)}</div></th><td class='num'>{esc(_fmt(v))}</td>"
        "</tr>"
        for name, v, text in rows
    )
    return f"<table class='scores'><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def setting_groups(config: dict[str, Any], identity: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The settings that shaped the result, grouped as the card shows them.

    ``identity`` (the run's ``run.json``) gives the layer that ``embed.layer: 0`` (the model's choice) resolved
    to, so the card says which layer the scenes were embedded with, not only what was asked.
    """
    data, embed = config.get("data") or {}, config.get("embed") or {}
    scale = config.get("scale") or {}
    feature = {k: embed.get(k) for k in ("model", "layer", "pooling", "image_size") if k in embed}
    if feature.get("layer") == 0 and (identity or {}).get("layer") is not None:
        feature["layer"] = f"0 (the model's choice: {identity['layer']})"
    if (identity or {}).get("weights"):
        feature["weights"] = identity["weights"]  # which weights the model name held when the scenes were embedded
    return [
        ("input", {k: data.get(k) for k in ("input", "labels", "sample", "seed") if k in data}),
        ("feature", feature),
        ("projection", dict(config.get("reduce") or {})),
        ("clustering", dict(config.get("cluster") or {})),
        ("fit", {k: scale.get(k) for k in ("fit_sample", "novelty_quantile") if k in scale}),
    ]


def run_card(facts: RunFacts) -> str:
    """Which run made the page: name, time, version, input, every setting that shaped the result, device, time."""
    m = facts.metrics
    seconds = total_seconds(m.get("stage_seconds") or {})
    rate = f"{facts.n_scenes / seconds:,.1f} scenes/s" if seconds else "–"
    head = [
        ("run", f"{facts.name} ({facts.location})"),
        ("finished", facts.finished),
        ("scenecluster", m.get("scenecluster_version", "not recorded")),
        ("device", _device(m)),
        ("total time", f"{seconds:,.1f} s for {facts.n_scenes:,} scenes, {rate}" if seconds else "not recorded"),
    ]
    if "clustering" in m:
        head.append(("clustering from", m["clustering"]))
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in head)
    for group, settings in setting_groups(facts.config, facts.identity):
        chips = " ".join(
            f"<span class='kv'>{esc(k)}&nbsp;<b>{esc(_setting(v))}</b></span>" for k, v in settings.items()
        )
        items += f"<div class='wide'><dt>{esc(group)}</dt><dd>{chips or '–'}</dd></div>"
    return f"<dl class='card'>{items}</dl>"


def _setting(v: Any) -> str:
    return "none" if v is None else str(v)


def _device(m: dict[str, Any]) -> str:
    device = m.get("device")
    if not device:
        return "not recorded (run made before the report recorded it)"
    return ", ".join(f"{k} {v}" for k, v in device.items()) if isinstance(device, dict) else str(device)


def swatch(color: str) -> str:
    return f"<span class='sw' style='background:{esc(color)}'></span>"


def _cell(value: float | int | str, text: str, cls: str = "num") -> str:
    sort = value if isinstance(value, str) else ("" if np.isnan(float(value)) else f"{float(value):.6g}")
    return f"<td class='{cls}' data-v='{esc(sort)}'>{text}</td>"


def _label_cells(r: ClusterRow) -> str:
    if r.majority is None:
        return ""
    if r.matched is None:
        matched = "none (extra)"
    else:
        matched = "same" if r.matched == r.majority else f"{esc(r.matched)} {r.matched_share:.0%}"
    return (
        _cell(r.majority or "", f"{esc(r.majority)}", "txt")
        + _cell(r.purity, f"{r.purity:.0%}")
        + _cell(r.majority_recall, f"{r.majority_recall:.0%}")
        + _cell(r.matched or "", matched, "txt")
    )


CLUSTER_HELP = [
    ("scenes, share", "scenes assigned to the cluster, and their share of all clustered scenes"),
    ("majority class, purity", "the most common true class in the cluster, and its share of the cluster"),
    ("recall", "the share of all scenes of that class that landed in this cluster"),
    (
        "matched class",
        "the class Hungarian matching paired with this cluster (the pairing matched accuracy "
        'scores), and its share of the cluster ("same" when it is the majority class); an extra cluster has none',
    ),
    (
        "mean p, lowest p",
        "the mixture's probability of the chosen cluster, averaged and at its lowest; in the "
        "UMAP space it is close to 1 almost everywhere, so read it as optimistic",
    ),
    (
        "neighbours agree",
        "of 10 nearest neighbours in the model's feature space (cosine, among the sampled "
        "scenes; hover for how many were checked), the share in the same cluster; low means the cluster boundary "
        "is not in the features",
    ),
    ("novel", "scenes less likely under the mixture than the run's novelty threshold"),
    (
        "flags",
        "mixed: purity under 60%; split: its class leads other clusters and under 60% of it is here; "
        "doubtful: neighbours agree under 70%",
    ),
]


def cluster_table(rows: list[ClusterRow], colors: dict, with_labels: bool) -> str:
    """One sortable row per cluster, with a one-line explanation of each column under the table."""
    heads = ["cluster", "scenes", "share"]
    if with_labels:
        heads += ["majority class", "purity", "recall", "matched class"]
    heads += ["mean p", "lowest p", "neighbours agree", "novel", "flags"]
    head = "".join(f"<th scope='col' tabindex='0'>{h}</th>" for h in heads)
    body = []
    for r in rows:
        checked = (
            f"<span title='of {r.n_checked} sampled scenes'>{_num(r.agreement, '.0%')}</span>" if r.n_checked else "–"
        )
        body.append(
            f"<tr id='row-{r.cluster}'>"
            + _cell(r.cluster, f"{swatch(colors[r.cluster])}<a href='#cluster-{r.cluster}'>{r.cluster}</a>")
            + _cell(r.size, f"{r.size:,}")
            + _cell(r.share, f"{r.share:.1%}")
            + (_label_cells(r) if with_labels else "")
            + _cell(r.mean_probability, f"{r.mean_probability:.3f}")
            + _cell(r.min_probability, f"{r.min_probability:.3f}")
            + _cell(r.agreement, checked)
            + _cell(r.novel, f"{r.novel:,}")
            + _cell(" ".join(r.flags), "<br>".join(f"<span class='flag'>{esc(f)}</span>" for f in r.flags), "flags")
            + "</tr>"
        )
    shown = [
        h for h in CLUSTER_HELP if with_labels or h[0] not in ("majority class, purity", "recall", "matched class")
    ]
    helps = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in shown)
    return (
        f"<div class='scroll'><table class='sortable clusters'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div><dl class='explain'>{helps}</dl>"
    )


def confusion_table(table: np.ndarray, ids: np.ndarray, classes: list[str], colors: dict) -> str:
    """Clusters x classes, matched pairs on the diagonal, shaded by row share, with totals and purity."""
    rows, cols = diagonal_order(table)
    t = table[np.ix_(rows, cols)]
    head = "".join(f"<th scope='col' class='rot'><span>{esc(classes[j])}</span></th>" for j in cols)
    body = []
    for i, r in enumerate(rows):
        n = max(t[i].sum(), 1)
        cells = "".join(
            f"<td class='num{' diag' if i == j else ''}' style='background:rgba(31,119,180,{v / n:.2f});"
            f"color:{'#fff' if v / n > 0.55 else '#111'}'>{v if v else ''}</td>"
            for j, v in enumerate(t[i])
        )
        cid = int(ids[r])
        body.append(
            f"<tr><th scope='row'>{swatch(colors[cid])}{cid}</th>{cells}<td class='num tot'>{t[i].sum():,}"
            f"</td><td class='num'>{t[i].max() / n:.0%}</td></tr>"
        )
    totals = "".join(f"<td class='num tot'>{v:,}</td>" for v in t.sum(axis=0))
    return (
        "<div class='scroll'><table class='confusion'><thead><tr><th>cluster \\ class</th>"
        f"{head}<th>total</th><th>purity</th></tr></thead><tbody>{''.join(body)}</tbody>"
        f"<tfoot><tr><th>total</th>{totals}<td class='num tot'>{t.sum():,}</td><td></td></tr></tfoot></table></div>"
    )


def figure(uri: str | None, path: str, caption: list[str]) -> str:
    """One thumbnail with its file name and caption lines as text; the full path on hover."""
    name = esc(os.path.basename(path))
    # lazy: off-screen strips are decoded as they scroll in, so they do not hold up the first paint
    img = (
        f"<img src='{uri}' alt='{name}' width='72' height='72' loading='lazy' decoding='async'>"
        if uri
        else ("<div class='missing'>unreadable</div>")
    )
    lines = "".join(f"<span>{esc(c)}</span>" for c in caption)
    return f"<figure title='{esc(path)}'>{img}<figcaption><span class='fn'>{name}</span>{lines}</figcaption></figure>"


def gallery(scenes: Iterable[dict[str, Any]], thumb: Callable[[str], str | None], *, with_cluster: bool = True) -> str:
    """A row of captioned thumbnails: file name, (cluster,) label, probability and, where checked, the share of
    neighbours in the scene's cluster."""
    figs = []
    for s in scenes:
        caption = [s.get("label") or "no label", f"p {s['probability']:.3f}"]
        if with_cluster and s.get("cluster") is not None:
            caption.insert(0, f"cluster {s['cluster']}")
        agreement = s.get("agreement")
        if agreement is not None and not np.isnan(agreement):
            caption.append(f"neighbours {agreement:.0%}")
        figs.append(figure(thumb(s["path"]), s["path"], caption))
    return f"<div class='strip'>{''.join(figs)}</div>" if figs else "<p class='help'>none</p>"


FIT_PARTS = ("reduce", "cluster")  # timed inside the fit task; already part of "fit"


def total_seconds(stage_seconds: dict[str, float]) -> float:
    """The run's wall time from its stages, not counting the fit's parts twice."""
    nested = FIT_PARTS if "fit" in stage_seconds else ()
    return float(sum(v for k, v in stage_seconds.items() if k not in nested))


def timing_table(metrics: dict[str, Any], n_scenes: int, report_pending: bool) -> str:
    """Seconds per stage (the fit's parts indented under it), with the total, the rate and the device."""
    stages = dict(metrics.get("stage_seconds") or {})
    total = total_seconds(stages)
    nested = FIT_PARTS if "fit" in stages else ()
    order = [k for k in stages if k not in nested]
    if nested:
        order[order.index("fit") + 1 : order.index("fit") + 1] = [k for k in nested if k in stages]
    rows = "".join(
        f"<tr><th scope='row'>{'&emsp;of which ' if k in nested else ''}{esc(k)}</th>"
        f"<td class='num'>{stages[k]:,.1f} s</td><td class='num'>{stages[k] / total:.0%}</td></tr>"
        for k in order
        if total
    )
    if report_pending and "report" not in stages:
        rows += (
            "<tr><th scope='row'>report</th><td class='num' colspan='2'>this page (its time is in metrics.json)"
            "</td></tr>"
        )
    rate = f"{n_scenes / total:,.1f} scenes/s" if total else "–"
    return (
        f"<table class='timing'><tbody>{rows}</tbody><tfoot><tr><th>total</th><td class='num'>{total:,.1f} s</td>"
        f"<td class='num'>{rate}</td></tr></tfoot></table><p class='help'>device: {esc(_device(metrics))}</p>"
    )


def skipped_section(skipped: tuple[int, list[tuple[str, str]]]) -> str:
    count, rows = skipped
    if not count:
        return "<p>No scene was skipped.</p>"
    items = "".join(f"<li><code>{esc(p)}</code>: {esc(r)}</li>" for p, r in rows)
    more = f"<p class='help'>and {count - len(rows):,} more (see the run folder)</p>" if count > len(rows) else ""
    return f"<p>{count:,} files could not be read and were left out:</p><ul>{items}</ul>{more}"
