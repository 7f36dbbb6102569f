"""Turn a scene of any bit depth and band count into the 8-bit RGB image the backbone sees.

Satellite archives are mostly 16-bit (or float) GeoTIFFs of one band or many, while DINOv2 expects 8-bit RGB.
The rule is the one common raster viewers apply by default (QGIS's "cumulative count cut"):

* **bands**: ``auto`` shows the bands a GeoTIFF names red, green and blue (GDAL's colour interpretation, as
  QGIS does: a blue-green-red-near-infrared stack is shown 3, 2, 1), else band 1 as grey when the scene has fewer
  than three bands and bands 1, 2, 3 as red, green, blue otherwise; ``embed.bands`` names others (1-based, e.g.
  ``4,3,2`` for Sentinel-2's true colour).
* **stretch**: ``auto`` leaves 8-bit scenes as they are and stretches deeper ones band by band between the
  2nd and 98th percentile of that scene's pixels (``embed.percentiles``), clipping the tails; ``percentile``
  stretches 8-bit scenes too; ``none`` only rescales the type's range (0..65535 for 16-bit, 0..1 for float).
* **nodata**: pixels outside the scene's footprint (a tile cut at the edge of an orbit or a mosaic) are left out of
  the percentiles, as QGIS leaves them out. ``auto`` takes the value from the GeoTIFF's ``GDAL_NODATA`` tag (what
  GDAL writes; no tag, no nodata), a number names it for scenes that carry no tag, ``none`` ignores the tag.
  A TIFF's internal mask (the 1-bit mask GDAL writes beside JPEG-compressed orthophotos and COGs) and its alpha
  band (``gdalwarp -dstalpha``) are honoured alike, except under ``none``.
  Without this, a tile that is a third nodata has its 2nd percentile at the nodata value, and its real pixels are
  squeezed into the top of the range: it looks unlike the same ground in a whole tile. NaN is always left out. In
  8-bit scenes with an alpha channel (web-map tiles), fully transparent pixels are nodata under ``auto``.
* **nodata_fill**: what the model sees there. ``mirror`` (the default) reflects the valid ground across the
  footprint's edge, so an edge tile looks like more of its own scene; ``black`` is what a viewer shows; ``mean`` is
  each band's mean. On archives half of edge tiles (docs/benchmarks.md) honouring nodata with ``black`` lifted
  accuracy by 0.11-0.24 over ignoring it, and ``mirror`` by another 0.07-0.29, to within 0.08 of the same scenes
  whole.

JPEG, PNG, WebP, JPEG 2000 and 8-bit TIFF scenes go through PIL (16-bit JPEG 2000 bands, as Sentinel-2's, are
one deep band like a 16-bit PNG), so 8-bit scenes' embeddings do not change; TIFFs
that PIL cannot decode whole (many bands, 16 bits per band, LZW/DEFLATE GeoTIFFs, several grey bands), and 8-bit
GeoTIFFs that declare a nodata value or name their colour bands in another order, are read with tifffile.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from scenecluster.geotiff import Declared, pil_reads_faithfully, plain_values

__all__ = [
    "READING_REVISION",
    "PixelSpec",
    "describe_scene",
    "fill_nodata",
    "parse_bands",
    "parse_nodata",
    "read_pixels",
    "reading_revision",
    "to_rgb8",
]

#: The revision of how scene files other than JPEG become pixels. Bump it with any change that shows a file an
#: earlier scenecluster already read differently under the same settings (the settings themselves are in
#: :meth:`PixelSpec.identity`). It enters the names of the embedding parts that hold such files
#: (:func:`scenecluster.manifest.part_name`) and the fit key of runs that list one, so a rerun into an output
#: folder made before an upgrade re-embeds those parts and refits, instead of clustering old vectors beside new
#: ones. JPEG has no alpha, mask or bands to reinterpret, and PIL has decoded it alike throughout, so runs of JPEG
#: scenes keep their parts and their fits.
#: 1: transparency, GDAL_NODATA, internal masks and alpha bands mark the footprint, filled by mirroring; GDAL's colour
#: roles choose the bands; 8-bit TIFFs of several grey bands read whole (twenty-eighth and twenty-ninth sessions).
READING_REVISION = 1
_UNREVISED_SUFFIXES = (".jpg", ".jpeg")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TILE_MAX_SIDE = 4096  # scene tiles are 64-1024 px a side (EuroSAT 64, RESISC45 256, AID 600); more is a whole scene
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}


def reading_revision(path: str) -> int | None:
    """:data:`READING_REVISION` for a listed scene (or ``.tar`` shard, whose members may be of any format) whose
    reading has been revised; None for a JPEG, whose reading never was."""
    return None if path.lower().endswith(_UNREVISED_SUFFIXES) else READING_REVISION


@dataclass(frozen=True)
class PixelSpec:
    """How a scene's bands become 8-bit RGB: which bands, and how they are stretched.

    Attributes
    ----------
    bands : tuple of int or None
        1-based band numbers, one (grey) or three (red, green, blue); ``None`` = auto.
    stretch : {"auto", "percentile", "none"}
    percentiles : (float, float)
        Low and high percentile of each band's pixels mapped to 0 and 255.
    nodata : "auto", "none" or float
        The pixel value outside the footprint: ``"auto"`` reads a GeoTIFF's ``GDAL_NODATA`` tag, ``"none"``
        ignores it (and internal masks), a number applies to every scene (:func:`parse_nodata`).
    """

    bands: tuple[int, ...] | None = None
    stretch: str = "auto"
    percentiles: tuple[float, float] = (2.0, 98.0)
    nodata: str | float = "auto"
    nodata_fill: str = "mirror"

    def nodata_value(self, tagged: float | None = None) -> float | None:
        """The nodata value of a scene whose file declares ``tagged`` (None: it declares none): the tag under
        ``auto``, nothing under ``none``, else the number given."""
        if self.nodata == "auto":
            return tagged
        return None if self.nodata == "none" else float(self.nodata)

    @property
    def plain_8bit(self) -> bool:
        """8-bit scenes are read exactly as PIL's RGB conversion gives them (a given nodata value must be masked)."""
        return self.bands is None and self.stretch in ("auto", "none") and isinstance(self.nodata, str)

    def identity(self) -> dict[str, object]:
        """What the vectors depend on; ``nodata`` only when not ``auto``, so earlier runs keep their identity."""
        return {
            "bands": "auto" if self.bands is None else ",".join(map(str, self.bands)),
            "stretch": self.stretch,
            "percentiles": list(self.percentiles),
            **(
                {"nodata": self.nodata if isinstance(self.nodata, str) else repr(self.nodata)}
                if self.nodata != "auto"
                else {}
            ),
            **({"nodata_fill": self.nodata_fill} if self.nodata_fill != "mirror" else {}),
        }


def parse_bands(text: str) -> tuple[int, ...] | None:
    """``"auto"`` -> None; ``"4,3,2"`` -> (4, 3, 2); one band or three, each at least 1.

    Raises
    ------
    ValueError
        With what a valid value looks like.
    """
    text = str(text).strip().lower()
    if text == "auto":
        return None
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        raise ValueError(f"bands must be 'auto' or 1-based band numbers such as '4,3,2', not {text!r}")
    bands = tuple(int(b) for b in text.split(","))
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ValueError(f"bands must name one band (grey) or three (red,green,blue), each >= 1, not {text!r}")
    return bands


def parse_nodata(text: str | float) -> str | float:
    """``"auto"`` and ``"none"`` as they are; a number (``"0"``, ``"-9999"``, ``"nan"``) as a float.

    Raises
    ------
    ValueError
        With what a valid value looks like.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    value = str(text).strip().lower()
    if value in ("auto", "none"):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"nodata must be 'auto' (the GeoTIFF's GDAL_NODATA tag), 'none' or a number such as 0 or -9999, "
            f"not {text!r}"
        ) from None


def read_pixels(data: bytes, spec: PixelSpec) -> np.ndarray:
    """Decode an encoded scene to ``uint8 (H, W, 3)`` following ``spec``.

    Raises
    ------
    PIL.UnidentifiedImageError, OSError, ValueError
        When the bytes are no image this can read, or ask for a band the scene does not have.
    """
    valid = None
    if data[:4] in _TIFF_MAGIC:
        pixels, valid = _read_tiff(data, spec)
        if pixels is not None:
            return pixels
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # force the full decode here so a truncated file fails now, not later
        if img.mode in _EIGHT_BIT_MODES and spec.plain_8bit:
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)
            if valid is not None:
                return _fill_outside(rgb, valid, spec.nodata_fill)
            return _mask_transparent(rgb, img, spec.nodata_fill) if spec.nodata == "auto" else rgb
        if img.mode in _EIGHT_BIT_MODES:
            array = np.asarray(img.convert("RGB" if img.mode not in ("L", "LA", "1") else "L"))
        else:  # I;16, I, F: one band deeper than 8 bits
            array = np.asarray(img)
    return to_rgb8(array, spec, nodata=spec.nodata_value(), valid=valid)


def describe_scene(data: bytes, spec: PixelSpec) -> str:
    """One line on how the model will see this scene: size, bands and type, which bands are shown and why, the
    stretch, and what marks its footprint. It reads the scene as the job does, so it raises as :func:`read_pixels`.

    Why: before a run over a million tiles an analyst can check on one that the bands, the stretch and the nodata
    are what they expect (``scenecluster doctor`` prints it for the input's first image).
    """
    read_pixels(data, spec)
    if data[:4] in _TIFF_MAGIC:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            declared = Declared.of(tif, page, spec)
            size, n_bands, dtype = (page.imagewidth, page.imagelength), page.samplesperpixel, page.dtype
        kind, eight_bit_rgb = "TIFF", dtype == np.uint8 and pil_reads_faithfully(page) and declared.rgb is None
        transparent = False  # a TIFF's alpha is declared.alpha
    else:
        with Image.open(io.BytesIO(data)) as img:
            size, kind, n_bands = img.size, img.format or "image", len(img.getbands())
            eight_bit_rgb = img.mode in _EIGHT_BIT_MODES
            dtype = np.dtype(np.uint8) if eight_bit_rgb else np.asarray(img).dtype
            transparent = _has_transparency(img) and spec.nodata == "auto"
        declared = Declared(nodata=spec.nodata_value(), valid=None, rgb=None, alpha=None)
    footprint = [
        *([f"nodata {declared.nodata:g}"] if declared.nodata is not None else []),
        *(["an internal mask"] if declared.valid is not None else []),
        *([f"alpha (band {declared.alpha + 1})"] if declared.alpha is not None else []),
        *(["transparent pixels"] if transparent else []),
    ]
    if eight_bit_rgb and spec.plain_8bit:
        shown = "shown as stored"
    else:
        bands = spec.bands or declared.rgb or ((1,) if n_bands < 3 else (1, 2, 3))
        why = "--bands" if spec.bands else "named so in GDAL's metadata" if declared.rgb else "the default"
        colours = "as grey" if len(bands) == 1 else "as red, green, blue"
        shown = f"band{'s' if len(bands) > 1 else ''} {', '.join(map(str, bands))} {colours} ({why})"
        stretch = spec.stretch if spec.stretch != "auto" else "none" if dtype == np.uint8 else "percentile"
        low, high = spec.percentiles
        shown += f", stretched per band {low:g}-{high:g}%" if stretch == "percentile" else ", not stretched"
    outside = f"; footprint: {', '.join(footprint)} (filled: {spec.nodata_fill})" if footprint else ""
    whole = (
        "; a whole scene, not a tile: the model sees it shrunk to its input size, so tile such scenes first "
        "(e.g. gdal_retile.py)"
        if max(size) > _TILE_MAX_SIDE
        else ""
    )
    described = f"{size[0]} x {size[1]} {kind}, {n_bands} band{'s' if n_bands > 1 else ''} of {dtype}"
    return f"{described}; {shown}{outside}{whole}"


def _mask_transparent(rgb: np.ndarray, img: Image.Image, fill: str) -> np.ndarray:
    """Fully transparent pixels (a web-map tile's area outside the coverage) are nodata, filled as ``fill`` says,
    and a tile with nothing opaque is skipped. The colour stored under alpha 0 is arbitrary (black, white, ...)."""
    if not _has_transparency(img):
        return rgb
    alpha = np.asarray(img.convert("RGBA"))[:, :, 3]
    if alpha.min() > 0:
        return rgb
    if alpha.max() == 0:
        raise ValueError("no valid pixels: every pixel is transparent, outside the coverage")
    return _fill_outside(rgb, alpha > 0, fill)


def _has_transparency(img: Image.Image) -> bool:
    """An alpha channel, or a transparent colour (a palette's or a PNG's ``tRNS``)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _fill_outside(rgb: np.ndarray, valid: np.ndarray, fill: str) -> np.ndarray:
    """An 8-bit scene's pixels outside ``valid`` (``(H, W)``) blacked out, then filled as ``fill`` says."""
    rgb[~valid] = 0
    return fill_nodata(rgb, ~valid, fill)


def _read_tiff(data: bytes, spec: PixelSpec) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A TIFF PIL cannot show faithfully (deeper than 8 bits, grey bands it would drop, bands GDAL names in
    another order, a nodata value to mask), read with tifffile; else ``None`` for PIL to read. Either way, with the
    valid pixels of the file's internal mask (None: no mask, or ``nodata`` is ``none``) for PIL's reading to
    honour."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            declared = Declared.of(tif, page, spec)
            pil_reads = spec.plain_8bit and pil_reads_faithfully(page)
            if pil_reads and declared.rgb in (None, (1, 2, 3)) and (declared.nodata is None or not plain_values(page)):
                return None, declared.valid  # PIL reads it (palettes, YCbCr and all) as it always did
            try:
                array = page.asarray()
            except (ImportError, NotImplementedError, ValueError):  # a codec tifffile lacks: PIL reads it
                if pil_reads:
                    return None, declared.valid
                raise
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)  # (bands, H, W) -> (H, W, bands)
    except tifffile.TiffFileError as exc:
        raise UnidentifiedImageError(f"not a readable TIFF ({exc})") from None
    valid = declared.valid
    if declared.alpha is not None and array.ndim == 3 and declared.alpha < array.shape[2]:
        opaque = array[:, :, declared.alpha] > 0
        if not opaque.any():
            raise ValueError("no valid pixels: every pixel is transparent (alpha 0), outside the footprint")
        valid = opaque if valid is None else valid & opaque
    return to_rgb8(array, spec, nodata=declared.nodata, valid=valid, declared_rgb=declared.rgb), None


def to_rgb8(
    array: np.ndarray,
    spec: PixelSpec,
    nodata: float | None = None,
    valid: np.ndarray | None = None,
    declared_rgb: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``(H, W)`` or ``(H, W, bands)`` of any numeric type -> ``uint8 (H, W, 3)``: pick the bands, stretch them.

    Pixels equal to ``nodata`` (band by band, as GDAL masks them), pixels outside ``valid`` (an ``(H, W)`` mask,
    as a TIFF's internal mask or alpha band gives) and NaN pixels stay out of the stretch; nodata and masked
    pixels are then filled as ``spec.nodata_fill`` says (:func:`fill_nodata`), undeclared NaN ones shown black.
    ``declared_rgb`` are the bands the file names red, green and blue, shown under ``bands: auto``.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"a scene must be (height, width[, bands]), not an array of shape {array.shape}")
    n_bands = array.shape[2]
    if declared_rgb and max(declared_rgb) > n_bands:
        declared_rgb = None
    bands = spec.bands or declared_rgb or ((1, 1, 1) if n_bands < 3 else (1, 2, 3))
    if max(bands) > n_bands:
        raise ValueError(f"embed.bands asks for band {max(bands)}, but the scene has {n_bands}")
    if len(bands) == 1:
        bands = bands * 3
    picked = array[:, :, [b - 1 for b in bands]]
    stretch = spec.stretch
    if stretch == "auto":
        stretch = "none" if array.dtype == np.uint8 else "percentile"
    missing = None
    if nodata is not None:  # a declared NaN is nodata too (undeclared NaN is only left out of the stretch)
        missing = np.isnan(picked) if np.isnan(nodata) else picked == nodata
    if valid is not None:
        outside = np.broadcast_to(~valid[:, :, None], picked.shape)
        missing = outside.copy() if missing is None else missing | outside
    _check_some_valid(picked, missing, nodata, masked=valid is not None)
    if stretch == "none":
        rgb = _scale_type_range(picked)
        if missing is not None:
            rgb = np.where(missing, np.uint8(0), rgb)
    else:
        rgb = np.stack(
            [
                _stretch_band(picked[:, :, i], spec.percentiles, None if missing is None else missing[:, :, i])
                for i in range(3)
            ],
            axis=-1,
        )
    if missing is not None:
        rgb = fill_nodata(rgb, missing, spec.nodata_fill)
    return rgb


def _check_some_valid(
    picked: np.ndarray, missing: np.ndarray | None, nodata: float | None, masked: bool = False
) -> None:
    """A tile wholly outside the footprint has nothing to embed: it is skipped with this reason, not embedded.

    Why: tiling grids laid over a scene's bounding box make many such tiles (the corners beyond a slanted swath);
    embedded, they would all look alike and take a cluster of their own.
    """
    if np.issubdtype(picked.dtype, np.floating):
        valid = np.isfinite(picked)
    elif missing is None:
        return
    else:
        valid = np.ones(picked.shape, dtype=bool)
    if missing is not None:
        valid &= ~missing
    if not valid.any():
        what = "NaN" if nodata is None or np.isnan(nodata) else f"nodata ({nodata:g})"
        if masked:
            what = f"{what} or masked" if nodata is not None else "masked"
        raise ValueError(f"no valid pixels: every pixel of the bands shown is {what}, outside the footprint")


def fill_nodata(rgb: np.ndarray, missing: np.ndarray, fill: str) -> np.ndarray:
    """What the model sees where ``missing`` (``(H, W, 3)`` or ``(H, W)``) is true: ``black`` (as shown by
    :func:`to_rgb8`), each band's ``mean``, or the valid ground ``mirror``-ed across the footprint's edge."""
    if fill == "mean":
        return _fill_with_mean(rgb, missing if missing.ndim == 3 else np.repeat(missing[:, :, None], 3, axis=2))
    if fill == "mirror":
        return _fill_by_reflection(rgb, missing.any(axis=2) if missing.ndim == 3 else missing)
    return rgb


def _fill_by_reflection(rgb: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each nodata pixel takes the colour of its mirror image through the nearest valid pixel (``2b - p``): across
    a straight edge that is the ground reflected, as reflect-padding extends an image; where the mirror image falls
    off the tile or on nodata, the nearest valid pixel's colour.

    Why: a scene has no up and no handedness, so the reflected ground is more of the same scene, while a black or
    flat region is a large feature of its own that every edge tile shares.
    """
    from scipy import ndimage

    if not missing.any() or missing.all():
        return rgb
    height, width = missing.shape
    _, (near_y, near_x) = ndimage.distance_transform_edt(missing, return_indices=True)
    ys, xs = np.nonzero(missing)
    by, bx = near_y[ys, xs], near_x[ys, xs]
    my, mx = 2 * by - ys, 2 * bx - xs
    inside = (my >= 0) & (my < height) & (mx >= 0) & (mx < width)
    inside[inside] &= ~missing[my[inside], mx[inside]]
    filled = rgb.copy()
    filled[ys, xs] = rgb[np.where(inside, my, by), np.where(inside, mx, bx)]
    return filled


def _fill_with_mean(rgb: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Nodata pixels at their band's mean over the valid ones: a flat patch of the scene's own tone, not black."""
    filled = rgb.copy()
    for i in range(3):
        valid = ~missing[:, :, i]
        if valid.any() and not valid.all():
            filled[:, :, i][~valid] = np.uint8(round(float(rgb[:, :, i][valid].mean())))
    return filled


def _scale_type_range(picked: np.ndarray) -> np.ndarray:
    if picked.dtype == np.uint8:
        return np.ascontiguousarray(picked)
    if np.issubdtype(picked.dtype, np.integer):
        info = np.iinfo(picked.dtype)
        scaled = (picked.astype(np.float64) - info.min) / (float(info.max) - info.min)
    else:
        scaled = np.nan_to_num(picked.astype(np.float64), nan=0.0)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _stretch_band(band: np.ndarray, percentiles: tuple[float, float], missing: np.ndarray | None) -> np.ndarray:
    """One band between its low and high percentile of valid pixels -> 0..255; NaN and ``missing`` pixels black."""
    values = band.astype(np.float64)
    valid = np.isfinite(values)
    if missing is not None:
        valid &= ~missing
    if not valid.any():
        return np.zeros(band.shape, dtype=np.uint8)
    low, high = np.percentile(values[valid], percentiles)
    if high <= low:  # a flat band: no contrast to stretch; show its level as a mid grey rather than noise
        flat = np.full(band.shape, 0 if high == 0 else 128, dtype=np.uint8)
        return np.where(valid, flat, np.uint8(0)) if missing is not None else flat
    scaled = np.clip((np.nan_to_num(values, nan=low) - low) / (high - low), 0.0, 1.0)
    rgb = np.round(scaled * 255.0).astype(np.uint8)
    return np.where(valid, rgb, np.uint8(0)) if missing is not None else rgb
