"""Scenes of 8 and 16 bits, one band or many: read as raster viewers show them, never as a blank image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from scenecluster.data import decode_batch, decode_image
from scenecluster.pixels import PixelSpec, describe_scene, fill_nodata, parse_bands, parse_nodata, read_pixels

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


def _edge_tile(whole: np.ndarray, nodata: int) -> np.ndarray:
    """The same ground cut at the edge of the footprint: its left third is ``nodata`` in every band."""
    edge = whole.copy()
    edge[:, :, : whole.shape[2] // 3] = nodata
    return edge


def _with_nodata_tag(path: Path, bands: np.ndarray, nodata: str) -> Path:
    """A GeoTIFF as GDAL writes one with a nodata value: the ASCII ``GDAL_NODATA`` tag (42113)."""
    tifffile.imwrite(
        path, bands, photometric="minisblack", planarconfig="separate", extratags=[*GEO_TAGS, (42113, "s", 0, nodata)]
    )
    return path


def test_an_edge_tiles_gdal_nodata_is_left_out_of_the_stretch(tmp_path):
    rng = np.random.default_rng(3)
    whole = (rng.random((3, 30, 36)) * 600 + 300).astype(np.uint16)  # reflectance x 10^4 of dull ground
    edge = _with_nodata_tag(tmp_path / "edge.tif", _edge_tile(whole, 0), "0").read_bytes()
    seen_whole = read_pixels(write_geotiff(tmp_path / "whole.tif", whole).read_bytes(), PixelSpec())
    valid = np.s_[:, 12:]

    honoured = read_pixels(edge, PixelSpec(nodata_fill="black"))
    assert (honoured[:, :12] == 0).all()  # outside the footprint: black
    for channel in range(3):  # inside: stretched on the valid pixels alone, as that band's percentiles
        np.testing.assert_array_equal(honoured[valid][:, :, channel], _stretched(whole[channel][valid]))
    ignored = read_pixels(edge, PixelSpec(nodata="none"))  # the 2nd percentile is the nodata 0: the ground pales
    gap_honoured = np.abs(honoured[valid].astype(int) - seen_whole[valid]).mean()
    gap_ignored = np.abs(ignored[valid].astype(int) - seen_whole[valid]).mean()
    assert gap_honoured < 2 and gap_ignored > 40, (gap_honoured, gap_ignored)


def test_a_nodata_value_named_for_scenes_without_a_tag_and_any_value_type(tmp_path):
    rng = np.random.default_rng(4)
    whole = (rng.random((3, 20, 24)) * 4000 - 1000).astype(np.int16)
    edge = write_geotiff(tmp_path / "edge.tif", _edge_tile(whole, -9999)).read_bytes()
    named = read_pixels(edge, PixelSpec(nodata=-9999.0, nodata_fill="black"))
    assert (named[:, :8] == 0).all()
    np.testing.assert_array_equal(named[:, 8:, 1], _stretched(whole[1][:, 8:]))
    untagged = read_pixels(edge, PixelSpec())  # no tag: -9999 is a value like any other, and sets the 2nd percentile
    assert np.abs(untagged[:, 8:].astype(int) - named[:, 8:]).mean() > 20
    batch = {"path": np.array(["edge.tif"], dtype=object), "bytes": np.array([edge], dtype=object)}
    decoded = decode_batch(batch, image_size=14, pixels=PixelSpec(nodata=-9999.0))  # the embedding actors' path
    assert decoded["error"][0] == "" and decoded["image"][0].shape == (14, 14, 3)

    white_edge = _with_nodata_tag(tmp_path / "w.tif", _edge_tile(whole.astype(np.uint16), 65535), "65535")
    plain = read_pixels(white_edge.read_bytes(), PixelSpec(stretch="none", nodata_fill="black"))  # nodata black
    assert (plain[:, :8] == 0).all() and plain[:, 8:].max() > 0


def test_a_tag_that_is_no_number_or_outside_the_type_masks_nothing(tmp_path, caplog):
    bands = (np.random.default_rng(5).random((3, 16, 16)) * 1000).astype(np.uint16)
    for tag in ("-9999", "n/a"):
        data = _with_nodata_tag(tmp_path / "t.tif", bands, tag).read_bytes()
        np.testing.assert_array_equal(read_pixels(data, PixelSpec()), read_pixels(data, PixelSpec(nodata="none")))
    assert not [r for r in caplog.records if r.name == "tifffile"]  # not one warning per tile of such an archive


@pytest.mark.parametrize(
    "text, value", [("auto", "auto"), ("None", "none"), ("0", 0.0), (" -9999 ", -9999.0), (3, 3.0)]
)
def test_parse_nodata(text, value):
    assert parse_nodata(text) == value


def test_parse_nodata_refuses_words():
    with pytest.raises(ValueError, match="nodata must be 'auto'"):
        parse_nodata("black")


def test_the_default_nodata_keeps_earlier_runs_identity():
    assert "nodata" not in PixelSpec().identity()  # embeddings made before the setting existed are reused
    assert PixelSpec(nodata=0.0).identity()["nodata"] == "0.0"
    assert PixelSpec(nodata="none").identity()["nodata"] == "none"
    assert PixelSpec().plain_8bit and not PixelSpec(nodata=0.0).plain_8bit


def test_nodata_filled_with_each_bands_mean_of_the_valid_pixels(tmp_path):
    rng = np.random.default_rng(6)
    whole = (rng.random((3, 24, 30)) * 600 + 300).astype(np.uint16)
    edge = _with_nodata_tag(tmp_path / "edge.tif", _edge_tile(whole, 0), "0").read_bytes()
    black = read_pixels(edge, PixelSpec(nodata_fill="black"))
    mean = read_pixels(edge, PixelSpec(nodata_fill="mean"))
    np.testing.assert_array_equal(mean[:, 10:], black[:, 10:])  # the ground is the same
    for channel in range(3):  # the nodata third is one flat tone per band: the ground's mean, not black
        assert (mean[:, :10, channel] == round(black[:, 10:, channel].mean())).all()
    assert "nodata_fill" not in PixelSpec().identity() and PixelSpec(nodata_fill="mean").identity()["nodata_fill"]
    undeclared = read_pixels(write_geotiff(tmp_path / "w.tif", _edge_tile(whole, 0)).read_bytes(), PixelSpec())
    np.testing.assert_array_equal(
        undeclared, read_pixels(tmp_path.joinpath("w.tif").read_bytes(), PixelSpec(nodata_fill="mean"))
    )


def test_a_tile_wholly_outside_the_footprint_is_skipped_with_a_reason(tmp_path):
    empty = _with_nodata_tag(tmp_path / "empty.tif", np.zeros((3, 16, 16), np.uint16), "0").read_bytes()
    nan = np.full((16, 16), np.nan, np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, nan)
    batch = {
        "path": np.array(["empty.tif", "nan.tif"], dtype=object),
        "bytes": np.array([empty, buf.getvalue()], dtype=object),
    }
    errors = decode_batch(batch, image_size=14)["error"]
    assert (
        errors[0] == "ValueError: no valid pixels: every pixel of the bands shown is nodata (0), outside the footprint"
    )
    assert errors[1] == "ValueError: no valid pixels: every pixel of the bands shown is NaN, outside the footprint"
    dark = np.zeros((3, 16, 16), np.uint16)  # no tag: a black tile is a scene like any other
    assert read_pixels(write_geotiff(tmp_path / "dark.tif", dark).read_bytes(), PixelSpec()).shape == (16, 16, 3)
    assert read_pixels(empty, PixelSpec(nodata="none")).shape == (16, 16, 3)


def test_an_8_bit_geotiffs_nodata_is_masked_and_its_ground_kept_as_stored(tmp_path):
    rgb8 = np.random.default_rng(7).integers(1, 255, (16, 18, 3), dtype=np.uint8)
    edge = rgb8.copy()
    edge[:, :6] = 255  # nodata 255, as some 8-bit mosaics declare it
    path = tmp_path / "edge8.tif"
    tifffile.imwrite(path, edge, photometric="rgb", extratags=[(42113, "s", 0, "255")])
    seen = read_pixels(path.read_bytes(), PixelSpec(nodata_fill="black"))
    assert (seen[:, :6] == 0).all()  # shown black, as deeper scenes' nodata
    np.testing.assert_array_equal(seen[:, 6:], rgb8[:, 6:])  # 8-bit ground as stored: no stretch
    outside = tmp_path / "outside8.tif"
    tifffile.imwrite(outside, np.zeros_like(rgb8), photometric="rgb", extratags=[(42113, "s", 0, "0")])
    with pytest.raises(ValueError, match="no valid pixels"):
        read_pixels(outside.read_bytes(), PixelSpec())
    np.testing.assert_array_equal(read_pixels(path.read_bytes(), PixelSpec(nodata="none")), edge)  # PIL, as before


def test_transparent_pixels_of_a_web_map_tile_are_nodata():
    rgba = np.random.default_rng(8).integers(1, 255, (16, 16, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    rgba[:5, :, :3], rgba[:5, :, 3] = 255, 0  # beyond the coverage: stored white, fully transparent

    def png(array: np.ndarray, mode: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="PNG")
        return buf.getvalue()

    seen = read_pixels(png(rgba, "RGBA"), PixelSpec(nodata_fill="black"))
    assert (seen[:5] == 0).all()
    np.testing.assert_array_equal(seen[5:], rgba[5:, :, :3])
    np.testing.assert_array_equal(read_pixels(png(rgba, "RGBA"), PixelSpec(nodata="none")), rgba[:, :, :3])
    opaque = rgba.copy()
    opaque[:, :, 3] = 255
    np.testing.assert_array_equal(read_pixels(png(opaque, "RGBA"), PixelSpec()), opaque[:, :, :3])
    empty = rgba.copy()
    empty[:, :, 3] = 0
    with pytest.raises(ValueError, match="no valid pixels: every pixel is transparent"):
        read_pixels(png(empty, "RGBA"), PixelSpec())


def test_nodata_mirrored_across_a_straight_edge_is_the_ground_reflected(tmp_path):
    rng = np.random.default_rng(9)
    whole = (rng.random((3, 20, 24)) * 600 + 300).astype(np.uint16)
    edge = _with_nodata_tag(tmp_path / "edge.tif", _edge_tile(whole, 0), "0").read_bytes()  # columns 0-7 nodata
    black = read_pixels(edge, PixelSpec(nodata_fill="black"))
    mirror = read_pixels(edge, PixelSpec())  # the default
    np.testing.assert_array_equal(mirror[:, 8:], black[:, 8:])
    # column 8 is the edge; column 8 - d takes column 8 + d (0 <= d <= 8)
    np.testing.assert_array_equal(mirror[:, :8], black[:, 16:8:-1])
    slanted = np.ones((12, 12), bool) & (np.add.outer(np.arange(12), np.arange(12)) > 14)  # a corner cut at 45 deg
    rgb = rng.integers(1, 255, (12, 12, 3), dtype=np.uint8)
    filled = fill_nodata(np.where(slanted[:, :, None], 0, rgb).astype(np.uint8), slanted, "mirror")
    assert (filled[slanted] > 0).all()  # every nodata pixel took a valid pixel's colour
    np.testing.assert_array_equal(filled[~slanted], rgb[~slanted])


GDAL_MASKED_COG = Path(__file__).parent / "data" / "gdal_masked_cog.tif"  # made by data/make_gdal_fixtures.py
GDAL_ALPHA16 = Path(__file__).parent / "data" / "gdal_alpha16.tif"
GDAL_BGRN16 = Path(__file__).parent / "data" / "gdal_bgrn16.tif"


def _gdal_cog_outside() -> np.ndarray:
    """Where the fixture's mask says the footprint ends (its maker's ``outside``)."""
    y, x = np.mgrid[:48, :64]
    return x + y // 2 < 20


def test_gdals_internal_mask_of_a_jpeg_orthophoto_is_the_footprint():
    data = GDAL_MASKED_COG.read_bytes()
    outside = _gdal_cog_outside()
    with Image.open(GDAL_MASKED_COG) as img:
        as_stored = np.asarray(img.convert("RGB"))
    assert as_stored[outside].max() > 0  # JPEG blurred the black outside: no nodata value could find it

    seen = read_pixels(data, PixelSpec(nodata_fill="black"))
    assert (seen[outside] == 0).all()
    np.testing.assert_array_equal(seen[~outside], as_stored[~outside])  # the ground as PIL decodes it
    mirrored = read_pixels(data, PixelSpec())  # the default fill: the ground reflected across the slanted edge
    np.testing.assert_array_equal(mirrored[~outside], as_stored[~outside])
    assert (mirrored[outside] > 0).all()
    np.testing.assert_array_equal(read_pixels(data, PixelSpec(nodata="none")), as_stored)  # as before


def _masked_tiff(bands: np.ndarray, valid: np.ndarray, overview: bool = False) -> bytes:
    """A band-sequential GeoTIFF followed by its internal mask IFD (NewSubfileType 4, 1 bit), as GDAL lays it out;
    with ``overview``, a half-size reduced mask first, which must not be taken for the image's."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(bands, photometric="minisblack", planarconfig="separate", extratags=GEO_TAGS)
        if overview:
            tif.write(valid[::2, ::2], subfiletype=5, photometric="mask")
        tif.write(valid, subfiletype=4, photometric="mask", compression="deflate")
    return buf.getvalue()


def test_an_internal_mask_keeps_what_it_hides_out_of_the_stretch(tmp_path):
    rng = np.random.default_rng(10)
    whole = (rng.random((3, 24, 30)) * 600 + 300).astype(np.uint16)
    stored = whole.copy()
    stored[:, :, :10] = rng.integers(0, 65535, (3, 24, 10))  # what lies under the mask is anything at all
    valid = np.ones((24, 30), bool)
    valid[:, :10] = False
    seen_whole = read_pixels(write_geotiff(tmp_path / "whole.tif", whole).read_bytes(), PixelSpec())

    for overview in (False, True):
        honoured = read_pixels(_masked_tiff(stored, valid, overview), PixelSpec(nodata_fill="black"))
        assert (honoured[:, :10] == 0).all()
        for channel in range(3):
            np.testing.assert_array_equal(honoured[:, 10:, channel], _stretched(whole[channel][:, 10:]))
        assert np.abs(honoured[:, 10:].astype(int) - seen_whole[:, 10:]).mean() < 2
    ignored = read_pixels(_masked_tiff(stored, valid), PixelSpec(nodata="none"))
    assert np.abs(ignored[:, 10:].astype(int) - seen_whole[:, 10:]).mean() > 40  # the hidden values set the stretch

    every_pixel_valid = _masked_tiff(whole, np.ones_like(valid))
    np.testing.assert_array_equal(read_pixels(every_pixel_valid, PixelSpec()), seen_whole)
    named = _masked_tiff(np.where(valid, whole, 0).astype(np.uint16), valid)  # a named value and a mask agree
    np.testing.assert_array_equal(read_pixels(named, PixelSpec(nodata=0)), read_pixels(named, PixelSpec()))


def test_a_tile_its_internal_mask_hides_whole_is_skipped_with_a_reason():
    bands = np.full((3, 16, 16), 700, np.uint16)
    hidden = _masked_tiff(bands, np.zeros((16, 16), bool))
    half = np.ones((16, 16), bool)
    half[:, :8] = False
    nodata_and_mask = io.BytesIO()  # the mask hides the left half, the nodata value the right
    with tifffile.TiffWriter(nodata_and_mask) as tif:
        right_nodata = bands.copy()
        right_nodata[:, :, 8:] = 0
        tif.write(right_nodata, photometric="minisblack", planarconfig="separate", extratags=[(42113, "s", 0, "0")])
        tif.write(half, subfiletype=4, photometric="mask")
    batch = {
        "path": np.array(["hidden.tif", "both.tif"], dtype=object),
        "bytes": np.array([hidden, nodata_and_mask.getvalue()], dtype=object),
    }
    errors = decode_batch(batch, image_size=14)["error"]
    assert errors[0] == "ValueError: no valid pixels: the TIFF's internal mask marks every pixel outside the footprint"
    assert errors[1] == (
        "ValueError: no valid pixels: every pixel of the bands shown is nodata (0) or masked, outside the footprint"
    )
    assert read_pixels(hidden, PixelSpec(nodata="none")).shape == (16, 16, 3)


def test_the_alpha_band_of_a_16_bit_geotiff_is_the_footprint(tmp_path):
    data = GDAL_ALPHA16.read_bytes()  # RGB + alpha as GDAL writes it (ExtraSamples: unassociated alpha), no nodata
    bands = np.moveaxis(tifffile.imread(GDAL_ALPHA16), -1, 0)
    y, x = np.mgrid[:40, :50]
    outside = x + y // 2 < 15
    assert (bands[3][outside] == 0).all() and (bands[3][~outside] == 65535).all()

    seen = read_pixels(data, PixelSpec(nodata_fill="black"))
    assert (seen[outside] == 0).all()
    for channel in range(3):  # the ground stretched on itself: the zeros outside stay out of the percentiles
        np.testing.assert_array_equal(seen[:, :, channel][~outside], _stretched(bands[channel][~outside]))
    ignored = read_pixels(data, PixelSpec(nodata="none"))
    assert np.abs(ignored[~outside].astype(int) - seen[~outside]).mean() > 20
    transparent = io.BytesIO()
    tifffile.imwrite(transparent, np.zeros((8, 8, 4), np.uint16), photometric="rgb", extrasamples=["unassalpha"])
    with pytest.raises(ValueError, match=r"no valid pixels: every pixel is transparent \(alpha 0\)"):
        read_pixels(transparent.getvalue(), PixelSpec())
    fourth_band = io.BytesIO()  # a 4th band that is no alpha (near infrared, say) masks nothing
    nir = np.moveaxis(np.concatenate([bands[:3], np.zeros_like(bands[:1])]), 0, -1)
    tifffile.imwrite(fourth_band, nir, photometric="rgb", extrasamples=["unspecified"])
    np.testing.assert_array_equal(read_pixels(fourth_band.getvalue(), PixelSpec(nodata_fill="black")), ignored)


def test_bands_gdal_names_red_green_and_blue_are_shown_as_such():
    data = GDAL_BGRN16.read_bytes()  # blue, green, red, near infrared; GDAL's metadata says so
    seen = read_pixels(data, PixelSpec())
    np.testing.assert_array_equal(seen, read_pixels(data, PixelSpec(bands=(3, 2, 1))))
    y, x = np.mgrid[:24, :24]
    for channel, pattern in ((0, (x + y) % 12), (1, y), (2, x)):  # each band's own pattern in its colour
        assert np.corrcoef(seen[:, :, channel].ravel(), pattern.ravel())[0, 1] > 0.95
    assert not np.array_equal(read_pixels(data, PixelSpec(bands=(1, 2, 3))), seen)  # a named order still wins


def _with_colour_roles(bands: np.ndarray, colours: list[str]) -> bytes:
    """A band-sequential TIFF whose GDAL_METADATA names each band's colour, as GDAL writes it."""
    items = "".join(
        f'<Item name="COLORINTERP" sample="{i}" role="colorinterp">{colour}</Item>' for i, colour in enumerate(colours)
    )
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        bands,
        photometric="minisblack",
        planarconfig="separate",
        extratags=[(42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>")],
    )
    return buf.getvalue()


def test_an_8_bit_bgr_stack_a_grey_band_an_alpha_role_and_bad_metadata():
    rgb = np.random.default_rng(11).integers(1, 255, (3, 12, 14), dtype=np.uint8)
    bgr = _with_colour_roles(rgb[::-1].copy(), ["Blue", "Green", "Red"])
    np.testing.assert_array_equal(read_pixels(bgr, PixelSpec()), np.moveaxis(rgb, 0, -1))  # 8 bits as stored
    grey_and_nir = _with_colour_roles(rgb[:2].astype(np.uint16) * 100, ["Gray", "Undefined"])
    np.testing.assert_array_equal(  # no red, green and blue named: band 1 as grey, as before
        read_pixels(grey_and_nir, PixelSpec()), read_pixels(grey_and_nir, PixelSpec(bands=(1,)))
    )
    with_alpha = np.concatenate([rgb.astype(np.uint16) * 100, np.full((1, 12, 14), 65535, np.uint16)])
    with_alpha[3, :, :4] = 0  # GDAL names a band "Alpha" when the photometric cannot say it
    seen = read_pixels(
        _with_colour_roles(with_alpha, ["Red", "Green", "Blue", "Alpha"]), PixelSpec(nodata_fill="black")
    )
    assert (seen[:, :4] == 0).all() and (seen[:, 4:] > 0).any()
    broken = io.BytesIO()
    tifffile.imwrite(broken, rgb, photometric="minisblack", planarconfig="separate", extratags=[(42112, "s", 0, "<x")])
    assert read_pixels(broken.getvalue(), PixelSpec()).shape == (12, 14, 3)


@pytest.mark.parametrize("planar", ["separate", "contig"])
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_three_8_bit_grey_bands_are_shown_as_red_green_and_blue(planar, compression):
    """GDAL writes PHOTOMETRIC=MINISBLACK when asked (a false-colour stack, say); PIL read such a file as band 1
    alone, or not at all."""
    rgb = np.random.default_rng(12).integers(1, 255, (12, 14, 3), dtype=np.uint8)
    buf = io.BytesIO()
    stored = np.moveaxis(rgb, -1, 0) if planar == "separate" else rgb
    tifffile.imwrite(buf, stored, photometric="minisblack", planarconfig=planar, compression=compression)
    np.testing.assert_array_equal(read_pixels(buf.getvalue(), PixelSpec()), rgb)


def test_a_scene_described_as_the_model_will_see_it(sample_dir):
    assert describe_scene(GDAL_BGRN16.read_bytes(), PixelSpec()) == (
        "24 x 24 TIFF, 4 bands of uint16; bands 3, 2, 1 as red, green, blue (named so in GDAL's metadata), "
        "stretched per band 2-98%"
    )
    assert describe_scene(GDAL_BGRN16.read_bytes(), PixelSpec(bands=(4,), stretch="none")) == (
        "24 x 24 TIFF, 4 bands of uint16; band 4 as grey (--bands), not stretched"
    )
    assert describe_scene(GDAL_MASKED_COG.read_bytes(), PixelSpec()) == (
        "64 x 48 TIFF, 3 bands of uint8; shown as stored; footprint: an internal mask (filled: mirror)"
    )
    assert describe_scene(GDAL_ALPHA16.read_bytes(), PixelSpec(nodata=0, nodata_fill="black")).endswith(
        "; footprint: nodata 0, alpha (band 4) (filled: black)"
    )
    assert describe_scene(GDAL_ALPHA16.read_bytes(), PixelSpec(nodata="none")).endswith("stretched per band 2-98%")
    jpeg = next(sample_dir.glob("*/*.jpg")).read_bytes()
    assert describe_scene(jpeg, PixelSpec()) == "64 x 64 JPEG, 3 bands of uint8; shown as stored"
    strip = io.BytesIO()
    Image.new("RGB", (5000, 8)).save(strip, format="PNG")
    assert describe_scene(strip.getvalue(), PixelSpec()).endswith(
        "a whole scene, not a tile: the model sees it "
        "shrunk to its input size, so tile such scenes "
        "first (e.g. gdal_retile.py)"
    )
    with pytest.raises(OSError):
        describe_scene(jpeg[: len(jpeg) // 2], PixelSpec())  # read as the job reads it: a truncated file fails
