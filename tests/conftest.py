"""Shared fixtures: real sample images, a corrupt one, and a tiny random DINOv2 saved like real weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scenecluster.cli import sample_data_dir


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_data_dir()


def pytest_collection_finish(session) -> None:
    """Start installing the lint tests' checkov while the tests before them run, when they are selected."""
    from tests import checkov_install

    if any(checkov_install.FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        checkov_install.start(session.config)


def tiny_job_config(input_uri, output, model, extra: dict | None = None):
    """A clustering run of the tiny random model at 28 px on a few dozen scenes, with dotted ``extra`` settings."""
    from scenecluster.config import load_config

    settings = {
        "data.input": str(input_uri),
        "output": str(output),
        "embed.model": str(model),
        "embed.image_size": 28,
        "embed.batch_size": 4,
        "reduce.n_neighbors": 5,
        "cluster.n_components": 5,
    }
    return load_config(None, {**settings, **(extra or {})})


def copy_sample(dest: Path, per_class: int, classes: int | None = None) -> Path:
    """Copy ``per_class`` real EuroSAT images of each (or the first ``classes``) class into ``dest``."""
    src = sample_data_dir()
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir())[:classes]
    for cdir in class_dirs:
        (dest / cdir.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(cdir.iterdir())[:per_class]:
            shutil.copy2(img, dest / cdir.name / img.name)
    return dest


def write_corrupt_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a text file named .png: both must be skipped and listed, never fatal."""
    folder.mkdir(parents=True, exist_ok=True)
    good = next(sample_data_dir().glob("*/*.jpg")).read_bytes()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    fake = folder / "not_an_image.png"
    fake.write_bytes(b"this is not a PNG")
    return [truncated, fake]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 saved with save_backbone, loaded through the same path as real weights."""
    import torch
    from transformers import Dinov2Model

    from scenecluster.models import save_backbone, tiny_dinov2_config

    torch.manual_seed(0)
    model = Dinov2Model(tiny_dinov2_config())
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    save_backbone(model, folder)
    return folder
