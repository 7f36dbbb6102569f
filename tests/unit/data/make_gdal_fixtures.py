"""Writes the GDAL-made fixtures of ``test_pixels``: tiles as GDAL writes them at a mosaic's edge. Not run by the
tests (GDAL is no dependency); kept to say how the files were made and to remake them.

    python -m venv /tmp/gdal && /tmp/gdal/bin/pip install rasterio numpy
    /tmp/gdal/bin/python tests/unit/data/make_gdal_fixtures.py    # rasterio 1.4.4, GDAL 3.10.3

``gdal_masked_cog.tif``: 48 x 64 pixels of smooth 8-bit RGB ground, JPEG-compressed in YCbCr (as aerial mosaics
are stored), with GDAL's internal 1-bit mask marking the pixels left of a slanted edge (``x + y // 2 < 20``) as
outside the footprint, and one overview with its own mask, copied by GDAL's COG driver. Under the mask the stored
pixels are black blurred by JPEG, so no nodata value could say where the footprint ends.

``gdal_alpha16.tif``: 40 x 50 pixels of 16-bit RGB ground and an alpha band (``ALPHA=YES``, as ``gdalwarp
-dstalpha`` writes a reprojected mosaic), DEFLATE-compressed, alpha 0 and bands 0 left of ``x + y // 2 < 15``,
with no nodata value.

``gdal_bgrn16.tif``: 24 x 24 pixels of 16-bit bands in the order blue, green, red, near infrared, their colour
interpretation set (GDAL writes it in its ``GDAL_METADATA`` tag, as the photometric cannot say it); blue is bright,
red dark, so a reader that shows bands 1, 2, 3 as red, green, blue shows the wrong colours.
"""

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.env import Env
from rasterio.shutil import copy
from rasterio.transform import from_origin

HERE = Path(__file__).parent


def outside(height: int, width: int, edge: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return x + y // 2 < edge


def profile(width: int, height: int, count: int, dtype: str, pixel_metres: float, **options) -> dict:
    """A GeoTIFF's creation profile in UTM 33N, the tile's corner at a round coordinate."""
    return dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs="EPSG:32633",
        transform=from_origin(500000, 4600000, pixel_metres, pixel_metres),
        **options,
    )


def masked_jpeg_cog() -> None:
    height, width = 48, 64
    y, x = np.mgrid[:height, :width]
    ground = np.stack([90 + x, 120 + (y * 2) % 60, 80 + (x + y) % 40]).astype(np.uint8)
    beyond = outside(height, width, 20)
    ground[:, beyond] = 0
    options = dict(tiled=True, blockxsize=32, blockysize=32, compress="JPEG", photometric="YCBCR")
    source = HERE / "gdal_masked_source.tif"
    with Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(source, "w", **profile(width, height, 3, "uint8", 0.5, **options)) as ds:
            ds.write(ground)
            ds.write_mask(np.where(beyond, 0, 255).astype(np.uint8))
            ds.build_overviews([2], Resampling.average)
        copy(source, HERE / "gdal_masked_cog.tif", driver="COG", compress="JPEG", blocksize=32)
    source.unlink()


def alpha16() -> None:
    height, width = 40, 50
    y, x = np.mgrid[:height, :width]
    ground = np.stack([900 + 20 * x, 1200 + 30 * ((y * 2) % 30), 800 + 25 * ((x + y) % 20)]).astype(np.uint16)
    beyond = outside(height, width, 15)
    ground[:, beyond] = 0
    alpha = np.where(beyond, 0, 65535).astype(np.uint16)
    options = dict(compress="DEFLATE", photometric="RGB", alpha="YES")
    with rasterio.open(HERE / "gdal_alpha16.tif", "w", **profile(width, height, 4, "uint16", 10, **options)) as ds:
        ds.write(np.concatenate([ground, alpha[None]]))


def bgrn16() -> None:
    y, x = np.mgrid[:24, :24]
    blue, green, red, nir = 3000 + 40 * x, 1500 + 30 * y, 600 + 10 * ((x + y) % 12), 4000 + 0 * x
    with rasterio.open(HERE / "gdal_bgrn16.tif", "w", **profile(24, 24, 4, "uint16", 3, compress="DEFLATE")) as ds:
        ds.write(np.stack([blue, green, red, nir]).astype(np.uint16))
        ds.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
        ds.set_band_description(4, "near infrared")


if __name__ == "__main__":
    masked_jpeg_cog()
    alpha16()
    bgrn16()
