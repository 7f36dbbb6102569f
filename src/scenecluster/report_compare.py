"""``scenecluster compare RUN1 RUN2 ...``: several runs' cards and scores side by side, as one Markdown table.

Markdown because the comparison's readers are a pull request, an issue or a notebook, and a table diffs well in
git. Only the runs' small files are read (``config.yaml``, ``metrics.json``), so comparing archive-sized runs
costs nothing; rows whose values differ between runs are marked, since those are what explain a difference in
the scores.
"""

from __future__ import annotations

import html
from typing import Any

from scenecluster.outputs import OutputFolder
from scenecluster.report_html import SCORE_HELP, setting_groups, total_seconds

__all__ = ["compare_runs", "run_summary"]

SCORES = ["n_embedded", "n_clusters", "acc", "nmi", "ari", "lower_bound", "converged", "n_novel", "n_skipped"]


def run_summary(run: str, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """One run's rows: ``{"name", "rows": [(section, key, value)]}``, read from its config and metrics files.

    Raises
    ------
    scenecluster.errors.OutputError
        When ``run`` has no ``metrics.json`` (not a finished run).
    """
    from scenecluster.errors import OutputError

    out = OutputFolder(run, endpoint_url=endpoint_url)
    if not out.exists("metrics.json"):
        raise OutputError(f"{run!r} has no metrics.json: not a finished run")
    metrics = out.read_json("metrics.json")
    config = out.read_yaml("config.yaml", default={}) or {}
    identity = out.read_json("run.json", default={})
    seconds = total_seconds(metrics.get("stage_seconds") or {})
    n = metrics.get("n_embedded") or 0
    rows: list[tuple[str, str, Any]] = [
        ("run", "finished", metrics.get("finished_at", "not recorded")),
        ("run", "scenecluster", metrics.get("scenecluster_version", "not recorded")),
        ("run", "device", (metrics.get("device") or {}).get("device", "not recorded")),
        # a run's speed follows its number format (bfloat16 on CPUs with the instructions: 1.4-1.5x float32)
        ("run", "dtype", (metrics.get("device") or {}).get("dtype", "not recorded")),
        ("run", "total time", f"{seconds:,.1f} s" if seconds else "not recorded"),
        ("run", "rate", f"{n / seconds:,.1f} scenes/s" if seconds else "not recorded"),
    ]
    for group, settings in setting_groups(config, identity):
        rows += [(group, key, value) for key, value in settings.items()]
    names = {key: name for key, name, _ in SCORE_HELP}
    rows += [("scores", names.get(key, key), _score(metrics[key])) for key in SCORES if key in metrics]
    return {"name": run, "rows": rows}


def _score(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def _cell(value: Any) -> str:
    text = "none" if value is None else str(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def compare_runs(runs: list[str], *, endpoint_url: str | None = None) -> str:
    """A Markdown table: one column per run, one row per setting or score; ``≠`` marks rows that differ."""
    summaries = [run_summary(r, endpoint_url=endpoint_url) for r in runs]
    keys: list[tuple[str, str]] = []
    values: list[dict[tuple[str, str], Any]] = []
    for s in summaries:
        values.append({(section, key): value for section, key, value in s["rows"]})
        keys += [k for k in values[-1] if k not in keys]
    head = "| | setting | " + " | ".join(_cell(s["name"]) for s in summaries) + " |"
    lines = [head, "|---|---|" + "---|" * len(summaries)]
    for section, key in keys:
        cells = [_cell(v.get((section, key), "–")) for v in values]
        mark = "≠" if len(set(cells)) > 1 else ""
        lines.append(f"| {mark} | {_cell(section)}: {_cell(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
