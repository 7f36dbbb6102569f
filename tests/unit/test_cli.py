"""The command line: help for every option, and one-line errors with a non-zero exit for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scenecluster.cli import CLUSTER_FLAGS, build_parser, main


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["cluster", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag, dotted, _, _ in CLUSTER_FLAGS:
        assert flag in text and dotted in text
    for flag in ("--output", "--config", "--set", "--overwrite"):
        assert flag in text


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "scenecluster.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["cluster", "/no/such/folder", "-o", "{tmp}/o"], "does not exist"),
        (["cluster", "{tmp}", "-o", "{tmp}/o"], "holds no images"),
        (["cluster", "{tmp}", "-o", "{tmp}/o", "--batch-size", "0"], "embed.batch_size"),
        (["cluster", "{tmp}", "-o", "{tmp}/o", "--set", "cluster.bogus=1"], "cluster.bogus"),
        # values that used to pass validation and fail after the embedding, deep in the fit
        (["cluster", "{tmp}", "-o", "{tmp}/o", "--seed", "-1"], "data.seed"),
        (["cluster", "{tmp}", "-o", "{tmp}/o", "--umap-metric", "bogus"], "reduce.metric"),
        (["cluster", "s3://", "-o", "{tmp}/o"], "names no bucket"),
        (["cluster", "{tmp}", "-o", "{tmp}/o", "--config", "{tmp}"], "is a folder; give the YAML file in it"),
        # the pipeline's and the benchmark's target are checked before their fine-tune, not after it
        (["pipeline", "{tmp}", "-t", "/no/such/target", "-o", "{tmp}/p"], "does not exist"),
        (["benchmark", "--source", "{tmp}", "--target", "/no/such/target", "-o", "{tmp}/b"], "does not exist"),
        (["benchmark", "--source", "{tmp}", "--target", "{tmp}", "-o", "{tmp}/b", "--epochs", "0"], "finetune.epochs"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    res = _run(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert message in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_unloadable_model_and_foreign_output(tmp_path, sample_dir):
    res = _run("cluster", str(sample_dir), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "no-model"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no-model" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing claimed before the model loads

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.csv").write_text("x")
    assert main(["cluster", str(sample_dir), "-o", str(tmp_path / "busy"), "--model", "facebook/dinov2-small"]) == 2


@pytest.mark.parametrize(
    "output, message",
    [
        ("/proc/scenecluster-out", "cannot write output '/proc/scenecluster-out': "),
        ("/sys/scenecluster-out", "cannot write output '/sys/scenecluster-out': "),
        ("{tmp}/a-file/out", "cannot create output '{tmp}/a-file/out': '{tmp}/a-file' is a file, not a folder"),
    ],
)
def test_unwritable_output_is_one_line_before_the_model_loads(tmp_path, sample_dir, output, message):
    """Issue 13 case 8: /proc, /sys and a path under a file failed with a traceback after the model had loaded;
    the model here cannot load either, so only an output check that comes first can give this message."""
    (tmp_path / "a-file").write_text("x")
    output = output.format(tmp=tmp_path)
    res = _run("cluster", str(sample_dir), "-o", output, "--model", str(tmp_path / "no-model"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.strip().startswith("scenecluster: error: " + message.format(tmp=tmp_path))
    assert res.stderr.strip().count("\n") == 0


def test_pipeline_reads_a_config_file_and_set_like_the_other_jobs(tmp_path, sample_dir, capsys):
    """``scenecluster pipeline`` takes ``--config`` and ``--set`` (as ``rayjobs/pipeline.py`` does): a setting of
    the clustering stage, which has no flag there, is read from them and checked before anything runs."""
    config = tmp_path / "pipeline.yaml"
    config.write_text("cluster:\n  cluster:\n    n_components: 0\n")
    command = ["pipeline", str(sample_dir), "-t", str(sample_dir), "-o", str(tmp_path / "out")]
    assert main([*command, "--config", str(config)]) == 2
    assert "cluster.cluster.n_components" in capsys.readouterr().err
    assert main([*command, "--set", "cluster.reduce.n_components=0"]) == 2
    assert "cluster.reduce.n_components" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, setting",
    [
        (["finetune", "{data}", "-o", "s3://bucket/ft"], "setting output: must be a path on this machine"),
        (["finetune", "{data}", "-o", "s3:/bucket/ft"], "setting output: must be a path on this machine"),
        (["finetune", "{data}", "-o", "file://ft"], "setting output: 'file://ft' names the host 'ft'"),
        (["pipeline", "{data}", "-t", "{data}", "-o", "s3://bucket/p"], "setting finetune.output: must be a path"),
        (["benchmark", "--source", "{data}", "--target", "{data}", "-o", "s3://b/x"], "finetune.output: must be a"),
        (
            ["finetune", "{data}", "-o", "ft", "--storage-path", "gs://b/ckpt"],
            "give a local folder or s3://bucket/prefix",
        ),
        (
            ["finetune", "{data}", "-o", "ft", "--storage-path", "s3:/b/ckpt"],
            "give a local folder or s3://bucket/prefix",
        ),
        (["report", "{data}", "-o", "s3://b/report.html"], "must be a path on this machine, not 's3://b/report.html'"),
        (["compare", "{data}", "-o", "s3://b/table.md"], "must be a path on this machine, not 's3://b/table.md'"),
        (["cluster", "{data}", "-o", "o", "--config", "s3://b/c.yaml"], "config file: must be a path on this"),
    ],
)
def test_an_output_only_a_local_folder_can_hold_refuses_a_store(
    tmp_path, sample_dir, monkeypatch, capsys, args, setting
):
    """A fine-tune's, a pipeline's and a benchmark's outputs, a report's or comparison's file and a config file are
    on this machine. Given ``s3://...`` they used to write to a folder named ``s3:`` in the working directory
    (pathlib reads the URI as ``s3:/bucket/...``) and train there; now the setting is refused before anything runs,
    saying where the store can be used instead. ``file://ft`` names a host, not a folder."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main([a.format(data=sample_dir) for a in args])
    except SystemExit as exc:  # argparse's own usage error (report's and compare's -o) exits by itself
        code = exc.code
    assert code == 2
    error = capsys.readouterr().err
    # one line (argparse prints its usage before its own errors: report's and compare's -o)
    assert setting in error.strip().splitlines()[-1] and "Value error" not in error, error
    assert list(tmp_path.iterdir()) == []  # no s3: (or file:) folder


def test_what_may_be_a_store_and_what_is_a_path():
    """A benchmark that fine-tunes nothing writes to S3 as before; ``run:1`` is a relative folder, not a URI; a
    storage path is a folder or ``s3://bucket/...``; ``--config ~/...`` is the home folder's file."""
    from scenecluster.config import BenchmarkConfig, FinetuneConfig, load_config
    from scenecluster.data import local_path
    from scenecluster.errors import ConfigError

    bench = {"output": "s3://b/bench", "backbone": "m", "cluster.data.input": "t", "cluster.output": "s3://b/bench/r"}
    assert load_config(None, bench, model=BenchmarkConfig).output == "s3://b/bench"
    assert [local_path(p) for p in ("run:1", "exp:v2/ft", "file://localhost/tmp/x")] == ["run:1", "exp:v2/ft", "/tmp/x"]
    finetune = {"sources": ["s"], "output": "run:1"}
    assert load_config(None, finetune, model=FinetuneConfig).output == "run:1"
    for storage, message in (("s3://", "names no bucket"), ("file://h/c", "names the host 'h'"), ("s3:/b", "s3://")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, {**finetune, "storage_path": storage}, model=FinetuneConfig)
    assert load_config(None, {**finetune, "storage_path": "file:///c"}, model=FinetuneConfig).storage_path == "/c"
    # a pipeline's and a benchmark's stage folders: a URI joined as text, a path as a path ('' is here, not '/')
    from scenecluster.cli import _under

    assert [_under(o, "finetune") for o in ("", "out/", "s3://b/p/")] == [
        "finetune",
        "out/finetune",
        "s3://b/p/finetune",
    ]


def test_a_config_file_under_home_is_found(tmp_path, monkeypatch):
    from scenecluster.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("embed:\n  batch_size: 7\n")
    assert load_config("~/c.yaml", {"data.input": "x", "output": "o"}).embed.batch_size == 7


def test_tunes_output_is_a_local_folder():
    from scenecluster.config import TuneJobConfig, load_config
    from scenecluster.errors import ConfigError

    with pytest.raises(ConfigError, match=r"setting output: must be a path on this machine.*storage_path"):
        load_config(None, {"embeddings": "s3://b/e", "output": "s3://b/tune"}, model=TuneJobConfig)
    with pytest.raises(ConfigError, match=r"setting storage_path: .*gs://b/t.: give a local folder or s3://"):
        load_config(None, {"embeddings": "s3://b/e", "output": "t", "storage_path": "gs://b/t"}, model=TuneJobConfig)
    assert load_config(None, {"embeddings": "s3://b/e", "output": "tune"}, model=TuneJobConfig).output == "tune"
    assert load_config(None, {"embeddings": "e", "output": "file:///tmp/t"}, model=TuneJobConfig).output == "/tmp/t"


def test_tune_refuses_embeddings_in_a_store_it_cannot_reach_instead_of_waiting(tmp_path):
    """``embeddings: gs://...`` went to pyarrow as a bare URI, which tried Google's store and waited (over 300 s in
    a probe); now it is one InputError before Ray starts."""
    from scenecluster.config import TuneJobConfig, load_config
    from scenecluster.errors import InputError
    from scenecluster.tune import run_tune

    cfg = load_config(None, {"embeddings": "gs://b/e.parquet", "output": str(tmp_path / "t")}, model=TuneJobConfig)
    with pytest.raises(InputError, match="unsupported location 'gs://b/e.parquet'"):
        run_tune(cfg, echo=lambda line: None)
    assert not (tmp_path / "t").exists()


def test_the_settings_tables_flag_column_holds_the_flags_each_command_takes():
    """docs/configuration.md's flag column is read off each command's parser: a combined job lists the flags of
    the stage its command exposes, not those of every section it holds."""
    from scenecluster.cli import command_flags

    pipeline = command_flags("pipeline")
    assert pipeline["finetune.lr"] == "--lr" and pipeline["self_train.rounds"] == "--self-train-rounds"
    assert not any(dotted.startswith("cluster.") for dotted in pipeline)  # the clustering stage: --config / --set
    benchmark = command_flags("benchmark")
    assert benchmark["cluster.reduce.n_components"] == "--umap-dims" and benchmark["finetune.epochs"] == "--epochs"
    assert "finetune.lr" not in benchmark
    assert command_flags("cluster") == {dotted: flag for flag, dotted, _, _ in CLUSTER_FLAGS}


def test_unreadable_settings_and_outputs_of_the_other_commands_are_one_line(tmp_path, sample_dir, capsys):
    """A config file that is not text, a fine-tune output that cannot be written, a Ray address that is no
    address: each a one-line error (exit 2) before Ray starts, not a traceback."""
    from scenecluster.doctor import FAIL, check_reachable

    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert main(["cluster", str(sample_dir), "-o", str(tmp_path / "o"), "--config", str(binary)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["finetune", str(sample_dir), "-o", "/proc/x"]) == 2
    assert "cannot " in capsys.readouterr().err
    assert main(["pipeline", str(sample_dir), "-t", str(sample_dir), "-o", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    assert main(["assign", str(sample_dir), "--clustering", "/no/such/run", "-o", str(tmp_path / "a")]) == 2
    assert "'/no/such/run' is not a folder" in capsys.readouterr().err

    with pytest.raises(SystemExit) as refused:  # argparse's usage error, exit 2
        build_parser().parse_args(["doctor", "--timeout", "-5"])
    assert refused.value.code == 2 and "positive number of seconds" in capsys.readouterr().err

    # what ensure_ray checks before ray.init (called directly: another test may have joined a Ray already)
    bogus = check_reachable("bogus")
    assert bogus.status == FAIL and "not an address" in bogus.detail
