import json

import pytest

from scenecluster.errors import OutputError
from scenecluster.outputs import OutputFolder, atomic_write_text, prepare_output


def test_same_run_resumes_other_run_refused(tmp_path):
    out = tmp_path / "out"
    prepare_output(out, {"input": "a", "model": "m"})
    (out / "embeddings.parquet").write_bytes(b"x")
    prepare_output(out, {"input": "a", "model": "m"})  # same identity: fine
    with pytest.raises(OutputError, match=r"different run \(differs in: model\)"):
        prepare_output(out, {"input": "a", "model": "other"})
    assert (out / "embeddings.parquet").exists()
    # a setting this version records and the folder's (older) run.json does not is named as such
    with pytest.raises(OutputError, match=r"differs in: weights \(not recorded by the version that made it\)\)"):
        prepare_output(out, {"input": "a", "model": "m", "weights": "sha256:0123"})


def test_overwrite_clears_stale_outputs(tmp_path):
    out = tmp_path / "out"
    prepare_output(out, {"model": "m"})
    (out / "embeddings.parquet").write_bytes(b"x")
    prepare_output(out, {"model": "n"}, overwrite=True)
    assert not (out / "embeddings.parquet").exists()
    assert json.loads((out / "run.json").read_text()) == {"model": "n"}


def test_foreign_folder_refused(tmp_path):
    (tmp_path / "thesis.docx").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        prepare_output(tmp_path, {"model": "m"})


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_text(tmp_path / "m.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_output_folder_atomic_stream_leaves_nothing_on_error(tmp_path):
    from scenecluster.outputs import OutputFolder

    out = OutputFolder(str(tmp_path / "o"))
    with pytest.raises(RuntimeError), out.open_atomic("half.parquet") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert not out.exists("half.parquet")
    assert list((tmp_path / "o").iterdir()) == []
    out.write_text("sub/x.txt", "hi")
    assert out.read_text("sub/x.txt") == "hi" and out.list("sub") == ["x.txt"]


def test_listing_leaves_out_the_temporary_files_of_interrupted_writes(tmp_path):
    """A worker killed mid-write leaves an empty hidden ``.NAME.tmp-…``; exports list the folder and read each."""
    out = OutputFolder(str(tmp_path))
    out.write_text("parts/part-000000.parquet", "x")
    (tmp_path / "parts" / ".part-000001.parquet.tmp-5a6ffb83").write_bytes(b"")
    assert out.list("parts") == ["part-000000.parquet"]


def test_rehearsal_worker_ports_stay_below_the_ephemeral_range():
    from pathlib import Path

    from scenecluster.testing.rayhead import _worker_range_start

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for seed in range(0, 70000, 997):
        start = _worker_range_start(seed)
        assert start >= 10000 and start + 1999 < low  # the head's thousand and the second node's


def test_a_rehearsal_head_that_does_not_start_is_retried_once_then_names_both_attempts(monkeypatch):
    """A ``ray start`` that exits during start-up is tried again with fresh ports and temp dir (a warning keeps the
    first failure); when the retry fails too, the error holds both attempts' logs and nothing is left behind."""
    import sys
    import warnings

    from scenecluster.testing import rayhead

    temp_dirs = []

    class NeverStarts(rayhead.LocalRayHead):
        def _command(self):
            temp_dirs.append(self.temp_dir)
            self.ports = {"dashboard-port": 9}
            return [sys.executable, "-c", f"print('start {len(temp_dirs)} failed'); raise SystemExit(3)"]

    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as err:
        warnings.simplefilter("always")
        NeverStarts(startup_timeout=30).start()
    message = str(err.value)
    assert "attempt 1: ray start exited with 3" in message and "start 1 failed" in message
    assert "attempt 2: ray start exited with 3" in message and "start 2 failed" in message
    assert "(no raylet log)" in message
    assert [str(w.message).split(":")[0] for w in caught] == ["NeverStarts did not start, retrying once"]
    assert len(set(temp_dirs)) == 2 and not any(d.exists() for d in temp_dirs)


def test_a_store_that_does_not_answer_is_one_line_not_no_files():
    """An S3 output (or a saved clustering) on a store that refuses the connection: one line naming the place,
    where pyarrow's OSError once escaped as a traceback, and a listing once read as "no files here"."""
    out = OutputFolder("s3://bucket/run", endpoint_url="http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(OutputError, match=r"cannot read s3://bucket/run/clustering/clustering.json: .*connect"):
        out.exists("clustering/clustering.json")
    with pytest.raises(OutputError, match=r"cannot list s3://bucket/run/assignments"):
        out.list("assignments")
    from scenecluster.outputs import check_writable

    with pytest.raises(OutputError, match=r"cannot reach output 's3://bucket/run'"):  # before the model loads
        check_writable("s3://bucket/run", "http://127.0.0.1:9")
    # a fine-tune's checkpoints there: "cannot read", where it was taken for "no run" (--resume started afresh)
    from scenecluster.config import FinetuneConfig, load_config
    from scenecluster.train import run_exists

    settings = {"sources": ["src"], "output": "out", "storage_path": "s3://bucket/ckpt"}
    cfg = load_config(None, {**settings, "data.endpoint_url": "http://127.0.0.1:9"}, model=FinetuneConfig)
    with pytest.raises(OutputError, match=r"cannot read the fine-tuning run s3://bucket/ckpt/finetune: .*connect"):
        run_exists(cfg)


def test_damaged_run_files_are_one_line_naming_the_file(tmp_path):
    """A run folder's files damaged after the run (cut short by a full disk, edited by hand): ``report`` and
    ``compare`` name the file instead of raising a JSON, YAML or Arrow error from deep inside."""
    import pyarrow as pa

    from scenecluster.errors import InputError
    from scenecluster.report_compare import run_summary

    run = tmp_path / "run"
    run.mkdir()
    out = OutputFolder(str(run))
    (run / "metrics.json").write_text('{"n_embedded": 3,')
    with pytest.raises(InputError, match=r"metrics.json is damaged, not JSON"):
        run_summary(str(run))
    (run / "metrics.json").write_text('{"n_embedded": 3}')
    (run / "config.yaml").write_text("embed: [unclosed\n")
    with pytest.raises(InputError, match=r"config.yaml is damaged, not YAML"):
        run_summary(str(run))
    assert out.read_json("absent.json", default={}) == {}

    out.write_table("assignments/part-0.parquet", pa.table({"cluster": [1, 2, 3]}))
    whole = (run / "assignments" / "part-0.parquet").read_bytes()
    (run / "assignments" / "part-0.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"part-0.parquet is damaged .*delete it and rerun"):
        out.read_table("assignments/part-0.parquet")

    with pytest.raises(OutputError, match=r"cannot write .*run"):  # a folder where the file would go
        atomic_write_text(run, "x")
