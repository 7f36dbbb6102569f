"""``scenecluster doctor`` without a cluster: the table, the exit status, reading Ray's node list and the probes'
answers, and the store checks on local folders. (Against a real two-node cluster and S3:
tests/integration/test_two_node_rehearsal.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile

from scenecluster.cli import main
from scenecluster.doctor import (
    FAIL,
    PASS,
    SKIP,
    Check,
    DoctorOptions,
    check_input,
    check_nodes,
    check_output,
    check_probes,
    exit_code,
    format_table,
    node_group,
    run_doctor,
)
from scenecluster.testing.s3server import free_ports
from tests.unit.test_pixels import GDAL_BGRN16

HEAD = {
    "NodeID": "a" * 56,
    "Alive": True,
    "NodeManagerAddress": "10.0.0.1",
    "Resources": {"CPU": 0.0, "memory": 1e9, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0},
}
EMBED = {
    "NodeID": "b" * 56,
    "Alive": True,
    "NodeManagerAddress": "10.0.0.2",
    "Resources": {"CPU": 8.0, "GPU": 1.0, "gpu_embed": 1.0, "accelerator_type:L4": 1.0, "node:10.0.0.2": 1.0},
}
PLAIN = {"NodeID": "c" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 4.0}}
GONE = {"NodeID": "d" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.4", "Resources": {"CPU": 4.0}}


def test_table_lines_up_and_a_failure_sets_the_exit_status():
    rows = [Check("ray reachable", "10.0.0.1:6379", PASS, "answers"), Check("model loadable", "-", SKIP, "x")]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["CHECK", "WHERE", "STATUS", "DETAIL"]
    assert len({line.index("PASS") for line in lines if "PASS" in line} | {lines[0].index("STATUS")}) == 1
    assert exit_code(rows) == 0
    assert exit_code([*rows, Check("cuml", "gpu_embed", FAIL, "ImportError")]) == 1


def test_node_types_are_told_apart_by_their_marker_resources():
    assert [node_group(n) for n in (HEAD, EMBED, PLAIN)] == ["head", "gpu_embed", "cpu-worker"]
    rows = check_nodes([HEAD, EMBED, PLAIN, GONE])
    assert [r.where.split()[0] for r in rows[:-1]] == ["head", "cpu-worker", "gpu_embed"]
    assert "1 GPU" in rows[2].detail and "gpu_embed 1" in rows[2].detail
    assert rows[-1] == Check("nodes", "cluster", PASS, "3 alive: 12 CPU, 1 GPU in all")
    assert check_nodes([GONE])[-1].status == FAIL


def test_probe_answers_become_rows():
    probes = {
        "head": {"ray": "2.60.0", "scenecluster": "0.1.0", "gpu": False},
        "gpu_embed": {
            "ray": "2.60.0",
            "scenecluster": "0.1.0",
            "gpu": True,
            "torch": "torch 2.13.0 CUDA 13.0",
            "cuml_error": "ModuleNotFoundError: No module named 'cuml'",
        },
        "cpu_tune": {
            "ray": "2.59.0",
            "scenecluster_error": "ModuleNotFoundError: No module named 'scenecluster'",
            "gpu": False,
        },
        "gpu_train": {"error": "no answer in 120 s (busy, or no worker could start)", "gpu": True},
    }
    rows = {(r.name, r.where): r for r in check_probes(probes, "2.60.0", "0.1.0")}
    assert rows["package", "head"].status == PASS and rows["cuda + cuml", "head"].status == SKIP
    assert rows["cuda torch", "gpu_embed"].status == PASS and rows["cuml", "gpu_embed"].status == FAIL
    assert rows["ray version", "cpu_tune"].status == FAIL and "2.59.0" in rows["ray version", "cpu_tune"].detail
    assert rows["package", "cpu_tune"].status == FAIL
    assert rows["package", "gpu_train"].status == FAIL and "no answer" in rows["package", "gpu_train"].detail


def test_a_newer_package_on_a_node_fails_the_version_check():
    rows = check_probes({"head": {"ray": "2.60.0", "scenecluster": "0.2.0", "gpu": False}}, "2.60.0", "0.1.0")
    assert [(r.name, r.status) for r in rows if r.name == "package"] == [("package", FAIL)]


def test_store_checks_on_local_folders(tmp_path, sample_dir):
    assert check_input(str(sample_dir), None).status == PASS
    assert check_input(str(tmp_path / "missing"), None).status == FAIL
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert check_input(str(tmp_path / "empty"), None).status == FAIL  # folders, no file
    (tmp_path / "bare").mkdir()
    bare = check_input(str(tmp_path / "bare"), None)
    assert bare.status == FAIL and bare.detail == "is empty"
    out = tmp_path / "out" / "run1"
    assert check_output(str(out), None).status == PASS
    assert not (tmp_path / "out").exists(), "the probe left its parent folder behind"


def test_unreachable_cluster_fails_fast_and_the_other_checks_still_run(sample_dir, tmp_path, capsys):
    port = free_ports(1)[0]  # nothing listens there
    rows = run_doctor(DoctorOptions(address=f"127.0.0.1:{port}", input=str(sample_dir), output=str(tmp_path)))
    assert [(r.name, r.status) for r in rows] == [
        ("ray reachable", FAIL),
        ("input readable", PASS),
        ("output writable", PASS),
        ("model loadable", SKIP),
    ]
    assert main(["doctor", "--address", f"127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["CHECK", "WHERE", "STATUS", "DETAIL"] and "FAIL" in out


def test_doctor_imports_without_ray_or_torch():
    code = "import sys, scenecluster.doctor; assert not {'ray', 'torch'} & set(sys.modules), sys.modules.keys()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_doctor_takes_the_input_and_output_as_cluster_does(sample_dir, tmp_path, capsys):
    # `scenecluster cluster INPUT -o OUT` -> `scenecluster doctor INPUT -o OUT`: the same words check the same paths
    port = free_ports(1)[0]  # nothing listens there: the Ray row fails, the path rows still run
    out = tmp_path / "run"
    assert main(["doctor", str(sample_dir), "-o", str(out), "--address", f"127.0.0.1:{port}"]) == 1
    table = capsys.readouterr().out
    rows = {line.split()[0] + " " + line.split()[1]: line for line in table.splitlines()[1:]}
    assert "PASS" in rows["input readable"] and str(sample_dir) in rows["input readable"]
    assert "PASS" in rows["output writable"] and str(out) in rows["output writable"]
    assert main(["doctor", str(sample_dir), "--input", str(tmp_path), "--address", f"127.0.0.1:{port}"]) == 2
    assert "give the input once" in capsys.readouterr().err


def test_the_input_check_says_how_the_first_scene_will_be_seen(tmp_path):
    """An analyst checks the bands and the footprint on one tile before the long run; an image that cannot be
    decoded fails the check with its reason."""
    tiles = tmp_path / "tiles" / "2024"
    tiles.mkdir(parents=True)
    (tmp_path / "tiles" / "README.md").write_text("tiles of the 2024 mosaic")
    shutil.copy(GDAL_BGRN16, tiles / "a_bgrn.tif")
    check = check_input(str(tmp_path / "tiles"), None)
    assert check.status == PASS
    assert check.detail.endswith(
        "a_bgrn.tif: 24 x 24 TIFF, 4 bands of uint16; bands 3, 2, 1 as red, green, blue "
        "(named so in GDAL's metadata), stretched per band 2-98%"
    ), check.detail
    (tiles / "0_broken.jpg").write_bytes(b"\xff\xd8 not a whole JPEG")  # one corrupt scene first: still a pass
    one_broken = check_input(str(tmp_path / "tiles"), None)
    assert one_broken.status == PASS and "a_bgrn.tif: 24 x 24 TIFF" in one_broken.detail
    assert "(cannot read 0_broken.jpg: not an image: no " in one_broken.detail, one_broken.detail
    for name in ("1_broken.jpg", "2_broken.png"):
        (tiles / name).write_bytes(b"\x89PNG not an image")
    broken = check_input(str(tmp_path / "tiles"), None)  # the first three all unreadable: a format it cannot read
    assert broken.status == FAIL and broken.detail.count("cannot read") == 3, broken.detail


def test_doctor_describes_the_scene_under_a_runs_pixel_settings(tmp_path, capsys):
    shutil.copy(GDAL_BGRN16, tmp_path / "bgrn.tif")
    port = free_ports(1)[0]  # nothing listens there: the Ray row fails, the input row still runs
    assert main(["doctor", str(tmp_path), "--bands", "4", "--stretch", "none", "--address", f"127.0.0.1:{port}"]) == 1
    assert (
        "bgrn.tif: 24 x 24 TIFF, 4 bands of uint16; band 4 as grey (--bands), not stretched" in capsys.readouterr().out
    )
    assert main(["doctor", str(tmp_path), "--nodata", "zero", "--address", f"127.0.0.1:{port}"]) == 2
    assert "setting nodata: " in capsys.readouterr().err


def test_the_input_check_reads_a_shard_rather_than_a_file_beside_it(tmp_path, sample_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a_index.bin").write_bytes(b"\0" * 8)  # sorts first, and is not a scene
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        tar.add(next(sample_dir.glob("*/*.jpg")), arcname="000000.jpg")
    check = check_input(str(shards), None)
    assert check.status == PASS and check.detail == "listed 2 entries; read shard-000000.tar"
