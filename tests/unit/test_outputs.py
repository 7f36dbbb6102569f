import json

import pytest

from scenecluster.errors import OutputError
from scenecluster.outputs import atomic_write_text, prepare_output


def test_same_run_resumes_other_run_refused(tmp_path):
    out = tmp_path / "out"
    prepare_output(out, {"input": "a", "model": "m"})
    (out / "embeddings.parquet").write_bytes(b"x")
    prepare_output(out, {"input": "a", "model": "m"})  # same identity: fine
    with pytest.raises(OutputError, match=r"different run \(differs in: model\)"):
        prepare_output(out, {"input": "a", "model": "other"})
    assert (out / "embeddings.parquet").exists()


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
