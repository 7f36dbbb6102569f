"""What a TIFF declares about its pixels besides their values, in GDAL's conventions.

GDAL, which writes most GeoTIFFs, says where a tile's footprint ends and which bands are which colour in four places:
the ``GDAL_NODATA`` tag (a value), an internal 1-bit mask after the image (JPEG orthophotos and COGs), an alpha band
(ExtraSamples, as ``gdalwarp -dstalpha`` writes it), and the band roles of its ``GDAL_METADATA`` tag (a
blue-green-red-near-infrared stack). :class:`Declared` gathers them for :mod:`scenecluster.pixels`, which turns a
scene into what the model sees. The files are read with tifffile; GDAL itself is no dependency.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scenecluster.pixels import PixelSpec

__all__ = ["Declared", "pil_reads_faithfully", "plain_values"]

_GDAL_NODATA_TAG = 42113
_GDAL_METADATA_TAG = 42112
_COLOUR_ROLES = ("red", "green", "blue", "alpha")
_MASK_SEARCH_PAGES = 32  # GDAL writes the mask right after the image (or after its overviews): never far


class _NodataOutOfRange(logging.Filter):
    """Drops tifffile's warning that a tile's ``GDAL_NODATA`` does not fit its type (-9999 on unsigned bands, as
    many archives declare): no pixel can equal it, which :func:`_gdal_nodata` already handles, and an archive of
    such tiles would print it once per tile."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GDAL_NODATA" not in record.getMessage()


logging.getLogger("tifffile").addFilter(_NodataOutOfRange())


@dataclass(frozen=True)
class Declared:
    """What a TIFF says of its pixels besides their values, as ``spec`` lets it count: the nodata value, the valid
    pixels of its internal mask, the bands it names red, green and blue (1-based; ``bands: auto`` only), and its
    alpha band (0-based; not under ``nodata: none``)."""

    nodata: float | None
    valid: np.ndarray | None
    rgb: tuple[int, ...] | None
    alpha: int | None

    @classmethod
    def of(cls, tif, page, spec: PixelSpec) -> Declared:
        honour = spec.nodata != "none"
        roles = _gdal_band_roles(page)
        rgb = tuple(roles[colour] for colour in ("red", "green", "blue") if colour in roles)
        alpha = _alpha_band(page)
        if alpha is None and "alpha" in roles:
            alpha = roles["alpha"] - 1
        return cls(
            nodata=spec.nodata_value(_gdal_nodata(page)),
            valid=_internal_mask(tif, page) if honour else None,
            rgb=rgb if len(rgb) == 3 and spec.bands is None else None,
            alpha=alpha if honour else None,
        )


def pil_reads_faithfully(page) -> bool:
    """8-bit grey, RGB(A), palette or YCbCr pixels, which PIL shows as they always were. Not 3 or 4 grey bands
    (GDAL's ``PHOTOMETRIC=MINISBLACK``): PIL reads those as band 1 alone, or not at all."""
    import tifffile

    if page.bitspersample > 8:
        return False
    return page.samplesperpixel == 1 or (
        page.samplesperpixel in (3, 4) and page.photometric != tifffile.PHOTOMETRIC.MINISBLACK
    )


def _gdal_band_roles(page) -> dict[str, int]:
    """The 1-based bands GDAL's metadata tag names red, green, blue or alpha, lower-cased: ``{"red": 3, ...}``.

    Why: GDAL writes a band's colour interpretation there (``COLORINTERP`` items of the ``GDAL_METADATA`` tag, 42112)
    when the TIFF's photometric cannot say it, as in a blue-green-red-near-infrared stack (the band order of
    Planet's and many other 4-band products). QGIS shows such a file by those roles; so does ``bands: auto``.
    """
    tag = page.tags.get(_GDAL_METADATA_TAG)
    if tag is None or "colorinterp" not in str(tag.value).lower():
        return {}
    import xml.etree.ElementTree as ElementTree

    try:
        items = ElementTree.fromstring(str(tag.value).strip("\x00 ")).iter("Item")
    except ElementTree.ParseError:
        return {}
    roles: dict[str, int] = {}
    for item in items:
        role, sample, colour = item.get("role"), item.get("sample"), (item.text or "").strip().lower()
        if role == "colorinterp" and sample is not None and sample.isdigit() and colour in _COLOUR_ROLES:
            roles.setdefault(colour, int(sample) + 1)
    return roles


def _alpha_band(page) -> int | None:
    """The 0-based band of the TIFF's alpha channel (an ExtraSamples value of associated or unassociated alpha, as
    ``gdalwarp -dstalpha`` and GDAL's ``ALPHA=YES`` write it), or None. Pixels of alpha 0 are outside the footprint.
    """
    extras = tuple(int(extra) for extra in (page.extrasamples or ()))
    for position, extra in enumerate(extras):
        if extra in (1, 2):  # EXTRASAMPLE.ASSOCALPHA, UNASSALPHA
            return page.samplesperpixel - len(extras) + position
    return None


def _internal_mask(tif, image) -> np.ndarray | None:
    """The valid pixels of ``image`` by the file's internal mask: the 1-bit IFD flagged as a transparency mask that
    GDAL writes after the image (``GDAL_TIFF_INTERNAL_MASK``, every COG with a mask); nonzero is valid. None when
    the file has none, or every pixel is valid.

    Why: JPEG-compressed orthophotos cannot declare a nodata value (the codec blurs it), so GDAL marks their
    footprint with this mask instead; it is the common way edge tiles of aerial mosaics say what is outside.
    """
    shape = (image.imagelength, image.imagewidth)
    for index in range(1, min(len(tif.pages), _MASK_SEARCH_PAGES)):
        page = tif.pages[index]
        if page.is_mask and not page.is_reduced and (page.imagelength, page.imagewidth) == shape:
            valid = np.asarray(page.asarray()).reshape(shape) != 0
            if not valid.any():
                raise ValueError("no valid pixels: the TIFF's internal mask marks every pixel outside the footprint")
            return None if valid.all() else valid
    return None


def plain_values(page) -> bool:
    """Whether the stored values are the colours shown (grey or RGB), so an 8-bit nodata value can be masked;
    palette and YCbCr TIFFs are left to PIL's conversion, unmasked."""
    import tifffile

    return page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)


def _gdal_nodata(page) -> float | None:
    """The ``GDAL_NODATA`` tag's value (ASCII, as GDAL writes it), or None without one or when it is no number."""
    tag = page.tags.get(_GDAL_NODATA_TAG)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None
