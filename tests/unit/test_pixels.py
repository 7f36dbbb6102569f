"""Scenes of 8 and 16 bits, one band or many: read as raster viewers show them, never as a blank image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from scenecluster.data import decode_batch, decode_image
from scenecluster.pixels import PixelSpec, parse_bands, read_pixels

# GeoTIFF tags: ModelPixelScale, ModelTiepoint and a GeoKey directory saying "projected, UTM 33N (EPSG:32633)".
GEO_TAGS = [
    (33550, "d", 3, (10.0, 10.0, 0.0)),
    (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4600000.0, 0.0)),
    (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),
]


def write_geotiff(path: Path, bands: np.ndarray, compression: str = "lzw") -> Path:
    """A band-sequential GeoTIFF (bands, H, W) as GDAL writes them, with tifffile."""
    tifffile.imwrite(
        path, bands, photometric="minisblack", planarconfig="separate", compression=compression, extratags=GEO_TAGS
    )
    return path


def _stretched(band: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    lo, hi = np.percentile(band.astype(np.float64), [low, high])
    return np.round(np.clip((band - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def test_16_bit_grey_tiff_is_stretched_by_percentiles_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 3000 + 200).astype(np.uint16)  # a 12-bit sensor's range, as Sentinel-2 stores it
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    rgb = read_pixels(buf.getvalue(), PixelSpec())
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    expected = _stretched(grey)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], expected)
    assert (rgb == 255).mean() < 0.05 and rgb.std() > 50  # PIL's convert('RGB') made this all 255


@pytest.mark.parametrize("compression", ["lzw", "zlib", None])
def test_multiband_16_bit_geotiff_default_and_chosen_bands(tmp_path, compression):
    rng = np.random.default_rng(1)
    bands = (rng.random((4, 32, 36)) * np.array([1000, 2000, 3000, 4000])[:, None, None]).astype(np.uint16)
    data = write_geotiff(tmp_path / "scene.tif", bands, compression).read_bytes()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # a real GeoTIFF: georeferenced, 4 x 16-bit bands
        assert tif.is_geotiff and tif.pages[0].samplesperpixel == 4 and tif.pages[0].bitspersample == 16

    default = read_pixels(data, PixelSpec())  # bands 1, 2, 3, each stretched on its own percentiles
    for channel, band in enumerate((0, 1, 2)):
        np.testing.assert_array_equal(default[:, :, channel], _stretched(bands[band]))
    chosen = read_pixels(data, PixelSpec(bands=(4, 3, 2), percentiles=(1.0, 99.0)))
    for channel, band in enumerate((3, 2, 1)):
        np.testing.assert_array_equal(chosen[:, :, channel], _stretched(bands[band], 1.0, 99.0))
    plain = read_pixels(data, PixelSpec(stretch="none"))  # the type's range: 65535 -> 255
    np.testing.assert_array_equal(plain[:, :, 0], np.round(bands[0] / 65535 * 255).astype(np.uint8))


def test_a_band_the_scene_lacks_is_a_skipped_scene_with_a_reason(tmp_path):
    data = write_geotiff(tmp_path / "two.tif", np.ones((2, 8, 8), np.uint16)).read_bytes()
    batch = {"path": np.array(["two.tif"], dtype=object), "bytes": np.array([data], dtype=object)}
    out = decode_batch(batch, image_size=14, pixels=PixelSpec(bands=(4, 3, 2)))
    assert out["error"][0] == "ValueError: embed.bands asks for band 4, but the scene has 2"


def test_8_bit_scenes_read_exactly_as_before(sample_dir):
    data = next(sample_dir.glob("Forest/*.jpg")).read_bytes()
    expected = Image.open(io.BytesIO(data)).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(decode_image(data, 56), np.asarray(expected))
    rgb8 = np.random.default_rng(2).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.moveaxis(rgb8, 0, -1), photometric="rgb")
    np.testing.assert_array_equal(read_pixels(buf.getvalue(), PixelSpec()), np.moveaxis(rgb8, 0, -1))


def test_unreadable_bytes_give_a_readable_reason():
    batch = {"path": np.array(["a.png"], dtype=object), "bytes": np.array([b"not a png"], dtype=object)}
    reason = decode_batch(batch, image_size=14)["error"][0]
    assert reason.startswith("not an image") and "0x" not in reason and "BytesIO" not in reason


@pytest.mark.parametrize("text, bands", [("auto", None), ("4,3,2", (4, 3, 2)), ("2", (2,)), (" 1, 1 ,1", (1, 1, 1))])
def test_parse_bands(text, bands):
    assert parse_bands(text) == bands


@pytest.mark.parametrize("text", ["0,1,2", "1,2", "red", "1,2,3,4", ""])
def test_parse_bands_refuses(text):
    with pytest.raises(ValueError, match="bands must"):
        parse_bands(text)
