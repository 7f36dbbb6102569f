"""Writes ``gdal_masked_cog.tif``, the fixture of ``test_pixels``: a tile as GDAL writes an orthophoto at a
mosaic's edge. Not run by the tests (GDAL is no dependency); kept to say how the file was made and to remake it.

    python -m venv /tmp/gdal && /tmp/gdal/bin/pip install rasterio numpy
    /tmp/gdal/bin/python tests/unit/data/make_gdal_masked_cog.py    # rasterio 1.4.4, GDAL 3.10.3

The tile: 48 x 64 pixels of smooth 8-bit RGB ground, JPEG-compressed in YCbCr (as aerial mosaics are stored), with
GDAL's internal 1-bit mask marking the pixels left of a slanted edge (``x + y // 2 < 20``) as outside the
footprint, and one overview with its own mask, copied by GDAL's COG driver. Under the mask the stored pixels are
black blurred by JPEG, so no nodata value could say where the footprint ends.
"""

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.env import Env
from rasterio.shutil import copy
from rasterio.transform import from_origin

HEIGHT, WIDTH = 48, 64


def outside() -> np.ndarray:
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    return x + y // 2 < 20


def main() -> None:
    here = Path(__file__).parent
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    ground = np.stack([90 + x, 120 + (y * 2) % 60, 80 + (x + y) % 40]).astype(np.uint8)
    ground[:, outside()] = 0
    profile = dict(
        driver="GTiff",
        width=WIDTH,
        height=HEIGHT,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 0.5, 0.5),
        tiled=True,
        blockxsize=32,
        blockysize=32,
        compress="JPEG",
        photometric="YCBCR",
    )
    source = here / "gdal_masked_source.tif"
    with Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(source, "w", **profile) as ds:
            ds.write(ground)
            ds.write_mask(np.where(outside(), 0, 255).astype(np.uint8))
            ds.build_overviews([2], Resampling.average)
        copy(source, here / "gdal_masked_cog.tif", driver="COG", compress="JPEG", blocksize=32)
    source.unlink()


if __name__ == "__main__":
    main()
