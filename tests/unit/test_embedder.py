import numpy as np
import pytest
import torch

from scenecluster.data import decode_image
from scenecluster.embed import Embedder, embedding_table, read_embeddings
from scenecluster.models import load_backbone


def _images(sample_dir, n, size=28):
    files = sorted(sample_dir.glob("*/*.jpg"))[:n]
    return np.stack([decode_image(f.read_bytes(), size) for f in files])


def test_embedder_returns_cls_of_last_layer(tiny_model_dir, sample_dir):
    emb = Embedder.for_model(str(tiny_model_dir), device="cpu")
    images = _images(sample_dir, 4)
    feats = emb.embed(images)
    assert feats.shape == (4, emb.model.config.hidden_size) and feats.dtype == np.float32
    # the same numbers computed by hand through transformers
    model = load_backbone(str(tiny_model_dir))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_dtype_auto_is_bfloat16_only_where_the_cpu_computes_it(tiny_model_dir, sample_dir, monkeypatch, native):
    # resources.cpu_dtype: auto: bf16 where the CPU has the instructions (1.7x float32 on a Zen 4 core), else float32,
    # whose bf16 oneDNN converts in software; the features agree with float32's either way
    import scenecluster.devices
    from scenecluster.devices import resolve_cpu_dtype

    monkeypatch.setattr(scenecluster.devices, "cpu_computes_bf16", lambda: native)
    assert resolve_cpu_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert (resolve_cpu_dtype("float32"), resolve_cpu_dtype("bfloat16")) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="'auto', 'bfloat16' or 'float32'"):
        resolve_cpu_dtype("float16")
    images = _images(sample_dir, 4)
    auto = Embedder.for_model(str(tiny_model_dir), device="cpu", dtype="auto")
    assert next(auto.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert Embedder.for_model(str(tiny_model_dir), device="cpu").dtype == torch.float32  # direct use: float32
    feats, ref = auto.embed(images), Embedder.for_model(str(tiny_model_dir), device="cpu").embed(images)
    assert feats.dtype == np.float32
    cosine = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.999 and (native or np.array_equal(feats, ref))


def test_intermediate_layer_and_mean_pooling(tiny_model_dir, sample_dir):
    images = _images(sample_dir, 3)
    first = Embedder.for_model(str(tiny_model_dir), layer=1, pooling="cls+mean", device="cpu")
    last = Embedder.for_model(str(tiny_model_dir), layer=-1, device="cpu")
    f1 = first.embed(images)
    assert f1.shape == (3, 2 * first.model.config.hidden_size)
    assert not np.allclose(f1[:, : f1.shape[1] // 2], last.embed(images))


def test_call_skips_failed_rows(tiny_model_dir, sample_dir):
    emb = Embedder.for_model(str(tiny_model_dir), device="cpu")
    images = _images(sample_dir, 3)
    batch = {
        "path": np.array(["a", "b", "c"], dtype=object),
        "image": images,
        "error": np.array(["", "OSError: truncated", ""], dtype=object),
    }
    out = emb(batch)
    assert np.isnan(out["embedding"][1]).all()
    assert np.isfinite(out["embedding"][[0, 2]]).all()
    np.testing.assert_allclose(out["embedding"][[0, 2]], emb.embed(images[[0, 2]]), atol=1e-5)


@pytest.mark.parametrize("layer", [3, -3, 40])
def test_bad_layer_is_rejected(tiny_model_dir, layer):
    with pytest.raises(ValueError, match="layer must be"):
        Embedder.for_model(str(tiny_model_dir), layer=layer, device="cpu")


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    table = embedding_table([f"p{i}" for i in range(5)], X, labels=list("aabbc"))
    pq.write_table(table, tmp_path / "e.parquet")
    paths, Y, labels = read_embeddings(tmp_path / "e.parquet")
    assert paths == [f"p{i}" for i in range(5)] and labels == list("aabbc")
    np.testing.assert_array_equal(X, Y)

    # a run's folder of parts, whose rows for unreadable scenes carry an error and no embedding
    (tmp_path / "embeddings").mkdir()
    for n, rows in enumerate((slice(0, 3), slice(3, 5))):
        part = table.slice(rows.start, rows.stop - rows.start)
        errors = ["" if i != 1 else "not an image" for i in range(part.num_rows)]
        pq.write_table(part.append_column("error", pa.array(errors)), tmp_path / "embeddings" / f"part-{n}.parquet")
    paths, Y, labels = read_embeddings(tmp_path / "embeddings")
    assert paths == ["p0", "p2", "p3"] and labels == ["a", "b", "b"]
    np.testing.assert_array_equal(Y, X[[0, 2, 3]])


def test_the_tasks_progress_line_comes_at_most_once_per_interval():
    """A small run's embedding (and assignment) tasks report the parts done no more often than the interval (a minute
    in the job), counted from the stage's start, so a quick stage prints nothing but its own line."""
    from scenecluster.stages import every_so_often

    printed: list[str] = []
    assert every_so_often(60.0, str, None) is None  # nobody to tell
    quick = every_so_often(60.0, lambda n: f"{n} of 3 parts", printed.append)
    for n in (1, 2, 3):
        quick(n)
    assert printed == []
    every_time = every_so_often(0.0, lambda n: f"{n} of 3 parts", printed.append)
    for n in (1, 2, 3):
        every_time(n)
    assert printed == ["1 of 3 parts", "2 of 3 parts", "3 of 3 parts"]
