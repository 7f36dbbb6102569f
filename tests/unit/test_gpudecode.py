"""The in-actor decode path (nvJPEG on a GPU) falls back to PIL image by image; here, on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from scenecluster.data import decode_image
from scenecluster.embed import Embedder
from scenecluster.gpudecode import decode_images, gpu_decode_available
from tests.conftest import write_corrupt_images


def test_cpu_fallback_matches_pil_and_marks_failures(tmp_path, sample_dir):
    good = [p.read_bytes() for p in sorted(sample_dir.glob("*/*.jpg"))[:3]]
    bad = [p.read_bytes() for p in write_corrupt_images(tmp_path)]
    blobs = np.array([good[0], bad[0], good[1], bad[1], good[2]], dtype=object)
    errors = np.array(["", "", "", "", "read failed: gone"], dtype=object)
    assert not gpu_decode_available(torch.device("cpu"))
    images, errors = decode_images(blobs, errors, 28, device=torch.device("cpu"))
    assert images.shape == (5, 28, 28, 3) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images[0].numpy(), decode_image(good[0], 28))
    np.testing.assert_array_equal(images[2].numpy(), decode_image(good[1], 28))
    assert errors[0] == "" and errors[2] == ""
    assert errors[1] and errors[3]  # undecodable
    assert errors[4] == "read failed: gone" and not images[4].any()  # an earlier error is kept


def test_embedder_accepts_undecoded_bytes(tiny_model_dir, sample_dir):
    files = sorted(sample_dir.glob("*/*.jpg"))[:2]
    emb = Embedder.for_model(str(tiny_model_dir), device="cpu", image_size=28)
    batch = {
        "path": np.array([str(f) for f in files], dtype=object),
        "bytes": np.array([f.read_bytes() for f in files], dtype=object),
        "error": np.array(["", ""], dtype=object),
    }
    out = emb(batch)
    expected = emb.embed(np.stack([decode_image(f.read_bytes(), 28) for f in files]))
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)
