"""The report from a run folder: per-cluster figures, orderings, escaping, the embedded JSON, ``compare``.

The run folders here are real files in the layout the job writes (config.yaml, metrics.json, assignment and
embedding parts, the report sample) around real JPEG scenes, built without Ray so the tests take seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scenecluster.cli import main, sample_data_dir
from scenecluster.outputs import OutputFolder
from scenecluster.report import build_report, write_report_file
from scenecluster.report_compare import compare_runs
from scenecluster.report_data import (
    cluster_rows,
    diagonal_order,
    gather_run,
    neighbour_agreement,
    read_skipped,
    top_per_group,
)
from scenecluster.report_scatter import bokeh_js
from scenecluster.vectors import vector_column

XSS = "<img src=x onerror=alert(1)>.jpg"


def make_run(root: Path, *, seed: int = 0, n_neighbors: int = 15) -> Path:
    """A finished run of 3 clusters over 2 classes: cluster 0 is Forest, 1 and 2 split SeaLake, 2 also mixes."""
    rng = np.random.default_rng(seed)
    scenes = root / "scenes"
    members = {"Forest": 12, "SeaLake": 12}
    paths, labels = [], []
    for cls, n in members.items():
        (scenes / cls).mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(sorted((sample_data_dir() / cls).iterdir())[:n]):
            name = XSS if (cls, i) == ("Forest", 0) else src.name
            shutil.copy(src, scenes / cls / name)
            paths.append(str(scenes / cls / name))
            labels.append(cls)
    clusters = np.array([0] * 10 + [2] * 2 + [1] * 7 + [2] * 5, dtype=np.int32)
    centres = rng.normal(size=(3, 16)) * 5
    X = (centres[clusters] + rng.normal(size=(24, 16))).astype(np.float32)
    out = root / "run"
    (out / "assignments").mkdir(parents=True)
    (out / "embeddings").mkdir()
    (out / "clustering").mkdir()
    for part, rows in enumerate((slice(0, 13), slice(13, 24))):
        table = pa.table(
            {
                "path": paths[rows],
                "cluster": pa.array(clusters[rows]),
                "probability": pa.array(rng.uniform(0.9, 1.0, 24)[rows].astype(np.float32)),
                "label": labels[rows],
                "log_likelihood": pa.array(rng.normal(size=24)[rows].astype(np.float32)),
                "novel": pa.array([i == 3 for i in range(24)][rows]),
                "coords": vector_column(X[rows, :5]),
            }
        )
        pq.write_table(table, out / "assignments" / f"part-{part:06d}.parquet")
        emb = pa.table(
            {
                "path": paths[rows],
                "label": labels[rows],
                "error": [""] * len(paths[rows]),
                "embedding": vector_column(X[rows]),
            }
        )
        pq.write_table(emb, out / "embeddings" / f"part-{part:06d}.parquet")
    xy = X[:, :2].astype(np.float64)
    pq.write_table(
        pa.table({"path": paths, "cluster": pa.array(clusters), "label": labels, "x": xy[:, 0], "y": xy[:, 1]}),
        out / "clustering" / "report_sample.parquet",
    )
    config = {
        "data": {"input": str(scenes), "labels": "folders", "sample": None, "seed": seed},
        "embed": {"model": "facebook/dinov2-small", "layer": 8, "pooling": "cls+mean", "image_size": 112},
        "reduce": {"method": "umap", "n_components": 5, "n_neighbors": n_neighbors},
        "cluster": {"method": "dpgmm", "n_components": 50},
        "scale": {"fit_sample": 5000},
        "report": {"thumbnails_per_cluster": 4, "scatter_points": 20000},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {
        "n_images": 25,
        "n_embedded": 24,
        "n_skipped": 1,
        "n_clusters": 3,
        "acc": 0.75,
        "nmi": 0.5,
        "lower_bound": -3.2,
        "stage_seconds": {"embed": 2.0, "fit": 3.0, "reduce": 2.5, "report": 1.0},
        "device": {"device": "cpu"},
        "finished_at": "2026-11-27 08:00:00 UTC",
        "scenecluster_version": "0.1.0",
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "run.json").write_text(json.dumps({"input": str(scenes)}))
    skipped = {"path": f"{scenes}/Forest/{XSS}.broken", "reason": "cannot identify image"}
    (out / "skipped.jsonl").write_text(json.dumps(skipped) + "\n")
    return out


def test_top_per_group_keeps_k_best_of_each_group() -> None:
    t = pa.table({"cluster": [1, 1, 1, 2, 2], "s": [0.1, 0.9, 0.5, 0.3, 0.2], "i": [0, 1, 2, 3, 4]})
    assert sorted(top_per_group(t, "cluster", "s", 2, descending=True).column("i").to_pylist()) == [1, 2, 3, 4]
    assert sorted(top_per_group(t, "cluster", "s", 1, descending=False).column("i").to_pylist()) == [0, 4]


def test_neighbour_agreement_sees_what_the_partition_does_to_the_features() -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(50, 8)) + 20, rng.normal(size=(50, 8)) - 20])
    truth = np.repeat([0, 1], 50)
    assert neighbour_agreement(X, truth).min() == 1.0
    # one blob cut in two at random: a partition UMAP could make look clean, the features do not support
    cut = np.where(truth == 0, rng.integers(0, 2, 100), 2)
    agreement = neighbour_agreement(X, cut)
    assert agreement[cut < 2].mean() < 0.7 and agreement[cut == 2].min() == 1.0


def test_diagonal_order_puts_matched_pairs_on_the_diagonal() -> None:
    table = np.array([[0, 1, 30], [25, 0, 1], [2, 20, 0], [5, 0, 4]])
    rows, cols = diagonal_order(table)
    t = table[np.ix_(rows, cols)]
    assert list(np.diag(t[:3, :3])) == [30, 25, 20]
    assert rows[-1] == 3 and sorted(rows) == [0, 1, 2, 3]


def test_cluster_rows_flag_split_and_mixed_clusters(tmp_path: Path) -> None:
    facts = gather_run(OutputFolder(str(make_run(tmp_path))), k=4)
    rows = {r.cluster: r for r in cluster_rows(facts)}
    assert [rows[c].size for c in (0, 1, 2)] == [10, 7, 7]
    assert rows[0].majority == "Forest" and rows[0].purity == 1.0 and rows[0].majority_recall == 10 / 12
    assert rows[1].majority == "SeaLake" and rows[1].majority_recall == 7 / 12
    assert any(f.startswith("split: SeaLake also leads cluster 2") for f in rows[1].flags)
    assert rows[2].purity == 5 / 7 and rows[2].second == ("Forest", 2 / 7)
    assert rows[0].matched == "Forest" and {rows[1].matched, rows[2].matched} == {"SeaLake", None}
    assert rows[0].novel + rows[1].novel + rows[2].novel == 1
    assert 0.9 <= rows[0].mean_probability <= 1.0 and rows[0].min_probability <= rows[0].mean_probability
    assert rows[0].n_checked == 10 and 0 <= rows[0].agreement <= 1
    assert read_skipped(OutputFolder(str(tmp_path / "run")))[0] == 1


def test_report_page_escapes_names_and_embeds_the_run(tmp_path: Path) -> None:
    page = build_report(OutputFolder(str(make_run(tmp_path))))
    assert "<meta name='viewport'" in page and "<title>run · scenecluster report</title>" in page
    assert "<img src=x" not in page and "onerror=alert(1)" not in page.replace("&lt;img src=x onerror=alert(1)&gt;", "")
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert page.count("<tr id='row-") == 3
    # thumbnails are WebP (the only PNGs are BokehJS's own icons)
    assert page.count("data:image/png") == bokeh_js().count("data:image/png")
    assert page.count("data:image/webp;base64,") >= 3 * 4
    config = json.loads(re.search(r"id='run-config'>(.*?)</script>", page, re.S).group(1))
    assert config["embed"]["model"] == "facebook/dinov2-small" and config["reduce"]["n_neighbors"] == 15
    metrics = json.loads(re.search(r"id='run-metrics'>(.*?)</script>", page, re.S).group(1))
    assert metrics["acc"] == 0.75
    # the fit's parts are not counted twice: 2 + 3 + 1 s, 24 scenes
    assert "6.0 s for 24 scenes, 4.0 scenes/s" in page
    assert "matched accuracy" in page and "every extra cluster lowers it" in page
    assert "separate 2-D UMAP" in page
    for section in ("run", "scores", "clusters", "scatter", "confusion", "scenes", "doubtful", "novel", "timing"):
        assert f"href='#{section}'" in page and f"<section id='{section}'>" in page


def test_report_command_writes_atomically_and_refuses_unfinished_runs(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    assert main(["report", str(run), "--output", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").read_text().startswith("<!doctype html>")
    assert not list(tmp_path.glob("*.tmp*"))
    assert write_report_file(str(run)) == str(run / "report.html") and (run / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_thumbnails_are_read_as_many_at_once_as_the_run_or_the_command_says(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """``report.thumbnail_reads`` of the run's config sets how many thumbnails are read at once (16 for a run made
    before the setting), ``scenecluster report --thumbnail-reads N`` overrides it, and 0 is a one-line error."""
    import scenecluster.report

    run = make_run(tmp_path)
    asked: list[int] = []
    prefetch = scenecluster.report.Thumbnails.prefetch

    def recording(self, draw, threads=scenecluster.report.PREFETCH_THREADS):
        asked.append(threads)
        return prefetch(self, draw, threads)

    monkeypatch.setattr(scenecluster.report.Thumbnails, "prefetch", recording)
    build_report(OutputFolder(str(run)))  # the run's config has no thumbnail_reads
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["report"]["thumbnail_reads"] = 48
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    build_report(OutputFolder(str(run)))
    assert main(["report", str(run), "--thumbnail-reads", "3"]) == 0
    assert asked == [16, 48, 3]
    with pytest.raises(SystemExit):
        main(["report", str(run), "--thumbnail-reads", "0"])
    assert "'0': give a whole number of at least 1" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_report_says_once_which_scenes_it_could_not_show_and_why(tmp_path: Path, capsys) -> None:
    """A run whose input has moved (or needs credentials this shell lacks) renders with "unreadable" tiles, and
    ``report`` says so in one line on stderr; members of ``.tar`` shards without a recorded place in their shard
    (a compressed shard, an older run) are not read at all (only the whole shard holds them), which the line says
    apart."""
    from scenecluster.report import Thumbnails
    from scenecluster.shard_members import NoRecordedRange

    run = make_run(tmp_path)
    shutil.move(tmp_path / "scenes", tmp_path / "moved")
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"report: {run / 'report.html'}"
    (line,) = captured.err.strip().splitlines()
    assert (
        line.startswith("[report] shown without a picture: ")
        and f"could not be read from {tmp_path / 'scenes'}" in line
    )
    assert "(first: " in line and "FileNotFoundError" in line and "shards" not in line, line
    assert "unreadable" in (run / "report.html").read_text()

    read = []

    def reader(path: str, size: int) -> np.ndarray:
        read.append(path)
        if path.endswith("bad.jpg"):
            raise OSError("refused")
        if ".tar/" in path:
            raise NoRecordedRange(path)
        return np.zeros((size, size, 3), dtype=np.uint8)

    thumb = Thumbnails(reader)
    for path in ("a/ok.jpg", "a/bad.jpg", "a/shard-0.tar/x.jpg", "a/shard-0.tar/Forest/y.jpg", "a/bad.jpg"):
        thumb(path)
    assert read == ["a/ok.jpg", "a/bad.jpg", "a/shard-0.tar/x.jpg", "a/shard-0.tar/Forest/y.jpg"]  # each once
    assert thumb.summary("s3://b/a") == (
        "[report] shown without a picture: 1 scene could not be read from s3://b/a (first: a/bad.jpg: "
        "OSError: refused); 2 scenes in .tar shards have no recorded place in their shard (a compressed shard, "
        "or a run embedded before such places were kept), and a shard is not read whole for a thumbnail"
    )
    assert Thumbnails(reader).summary("a") is None


def test_a_page_reads_its_thumbnails_in_parallel_before_it_is_drawn() -> None:
    """A page shows thousands of thumbnails, each a request to the store: read one after another at S3's latency
    they took minutes. ``prefetch`` draws once to learn them, reads them all at once, and the drawing that follows
    reads nothing; what could not be read is said in the order of the paths, the same on every run."""
    import threading
    import time

    from scenecluster.report import Thumbnails

    lock, active, most, read = threading.Lock(), [0], [0], []

    def slow_reader(path: str, size: int) -> np.ndarray:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            read.append((path, size))
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        if path.startswith("bad"):
            raise OSError(f"refused {path}")
        return np.full((size, size, 3), len(path), dtype=np.uint8)

    def draw(thumb: Thumbnails) -> list:
        hover = thumb.sized(48)
        shown = [thumb(f"s{i}") for i in range(20)] + [hover(f"s{i}") for i in range(10)]
        return shown + [thumb("bad2"), thumb("bad1")]

    thumb = Thumbnails(slow_reader)
    thumb.prefetch(draw, threads=8)
    assert sorted(read) == sorted(
        {(f"s{i}", 64) for i in range(20)}
        | {(f"s{i}", 48) for i in range(10)}
        | {
            ("bad1", 64),
            ("bad2", 64),
        }
    )
    assert most[0] > 1  # reads were in flight together
    n = len(read)
    page = draw(thumb)
    assert len(read) == n  # the drawing found every one read
    one_by_one = draw(Thumbnails(lambda path, size: slow_reader(path, size)))
    assert page == one_by_one and page[0].startswith("data:image/webp;base64,") and page[-1] is None
    assert thumb.summary("s3://b") == (
        "[report] shown without a picture: 2 scenes could not be read from s3://b (first: bad1: OSError: refused bad1)"
    )


def test_a_shard_member_is_read_back_by_its_recorded_range(tmp_path: Path) -> None:
    """The reader finds a member's part through the run's manifest and its place in ``members/<part>.parquet``,
    then reads those bytes alone; a member of a part without recorded places raises ``NoRecordedRange``."""
    import pyarrow.fs as pafs

    from scenecluster.manifest import manifest_parts, write_manifest_paths
    from scenecluster.shard_members import MEMBERS, NoRecordedRange, ShardMemberReader, member_ranges

    shards = [tmp_path / "in" / f"shard-{i}.tar" for i in range(3)]
    shards[0].parent.mkdir()
    for i, shard in enumerate(shards):
        shard.write_bytes(bytes(range(256)) * (i + 1))
    out = OutputFolder(str(tmp_path / "run"))
    write_manifest_paths(iter(str(s) for s in shards), out, identity={"test": 1}, chunk_size=2)
    parts = [name for _, name in manifest_parts(out)]
    assert len(parts) == 2  # of 2 shards and 1; the second has no recorded places
    paths = [f"{shards[0]}/Forest/a.jpg", f"{shards[1]}/b.jpg"]
    out.write_table(f"{MEMBERS}/{parts[0]}.parquet", member_ranges(paths, [10, 300], [5, 7]))
    reader = ShardMemberReader(out, pafs.LocalFileSystem())
    assert reader.read(paths[0]) == bytes(range(10, 15))
    assert reader.read(paths[1]) == (bytes(range(256)) * 2)[300:307]
    for missing in (f"{shards[0]}/Forest/c.jpg", f"{shards[2]}/d.jpg", str(tmp_path / "loose.jpg")):
        with pytest.raises(NoRecordedRange):
            reader.read(missing)
    shards[1].write_bytes(b"short")  # rewritten since the run: said, not misread
    with pytest.raises(OSError, match="shorter than when it was embedded"):
        ShardMemberReader(out, pafs.LocalFileSystem()).read(paths[1])


def test_compare_marks_the_settings_that_differ(tmp_path: Path, capsys) -> None:
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", n_neighbors=30)
    table = compare_runs([str(a), str(b)])
    lines = table.splitlines()
    assert lines[0] == f"| | setting | {a} | {b} |"
    assert "| ≠ | projection: n_neighbors | 15 | 30 |" in lines
    assert "|  | feature: model | facebook/dinov2-small | facebook/dinov2-small |" in lines
    assert "|  | scores: matched accuracy | 0.7500 | 0.7500 |" in lines
    assert "|  | run: dtype | not recorded | not recorded |" in lines
    metrics = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**metrics, "device": {"device": "cpu", "dtype": "bfloat16"}}))
    table = compare_runs([str(a), str(b)])
    assert "| ≠ | run: dtype | not recorded | bfloat16 |" in table.splitlines()  # speeds differ with it
    assert main(["compare", str(a), str(b)]) == 0 and capsys.readouterr().out == table
    assert main(["compare", str(a), str(tmp_path)]) == 2


@pytest.mark.parametrize("value", ["a|b", "<b>x</b>"])
def test_compare_cells_cannot_break_the_table(tmp_path: Path, value: str) -> None:
    run = make_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["embed"]["model"] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    row = next(line for line in compare_runs([str(run)]).splitlines() if "feature: model" in line)
    cells = re.split(r"(?<!\\)\|", row)[1:-1]  # split on pipes not escaped
    assert len(cells) == 3 and "<b>" not in row


def test_a_run_without_a_report_sample_is_drawn_in_its_projection(tmp_path: Path) -> None:
    """An assign run has no 2-D UMAP of its own: the scatter shows the clustered projection's principal axes."""
    run = make_run(tmp_path)
    (run / "clustering" / "report_sample.parquet").unlink()
    facts = gather_run(OutputFolder(str(run)), k=4)
    assert facts.projection == "pca" and len(facts.sample["path"]) == 24
    assert np.isfinite(facts.sample["agreement"]).all()
    page = build_report(OutputFolder(str(run)))
    assert "first two principal axes of the 5-D projection" in page and "separate 2-D UMAP" not in page


def test_the_card_names_the_layer_the_models_choice_resolved_to():
    from scenecluster.report_html import setting_groups

    config = {"embed": {"model": "m", "layer": 0, "pooling": "cls", "image_size": 224}}
    feature = dict(setting_groups(config, {"layer": 8}))["feature"]
    assert feature["layer"] == "0 (the model's choice: 8)"
    assert dict(setting_groups(config))["feature"]["layer"] == 0  # no run.json: what was asked
    named = {"embed": {**config["embed"], "layer": -1}}
    assert dict(setting_groups(named, {"layer": 12}))["feature"]["layer"] == -1  # asked outright: as asked
