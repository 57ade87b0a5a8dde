"""The app (streamlit AppTest) and the library modules it stands on: sdnet.images, sdnet.attribution."""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import bench_module
from PIL import Image

import sdnet
from sdnet import attribution, images

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app" / "main.py")
if str(ROOT) not in sys.path:  # `from app import state` as the app itself does
    sys.path.insert(0, str(ROOT))


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that only claims a size: signature, IHDR, an empty IDAT, IEND (what a bomb looks like to open())."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- sdnet.images: every upload becomes a clean model input, or a clear error ---------------------

def test_prepare_image_converts_every_mode():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    cases = {
        "L": rgb.convert("L"), "1": rgb.convert("1"), "LA": rgb.convert("LA"), "RGBA": rgb.convert("RGBA"),
        "P": rgb.convert("P"), "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16)),
        "F": Image.fromarray(rng.random((40, 40)).astype(np.float32)),
    }
    for mode, img in cases.items():
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "F" else "PNG")
        prep = images.prepare_image(png(img, fmt), size=32)
        assert prep.tensor.shape == (3, 32, 32) and prep.tensor.dtype == torch.float32, mode
        assert 0 <= float(prep.tensor.min()) and float(prep.tensor.max()) <= 1, mode
        if mode != "RGB":
            assert prep.notes, f"{mode}: the conversion is reported"
    # 16-bit keeps its dynamic range (scaled, not clipped to white), by its bit depth, not its brightest pixel:
    # a dark 16-bit image (0-250 of 65535) stays dark
    sixteen = images.prepare_image(png(cases["I;16"]), 32).tensor
    assert 0.2 < float(sixteen.mean()) < 0.8
    dark = Image.fromarray(rng.integers(0, 251, (40, 40)).astype(np.uint16))
    assert dark.mode == "I;16" and float(images.prepare_image(png(dark), 32).tensor.max()) < 0.01
    # a float image in [-1, 1]: its left half black, said only to be 'in [0, 1]' (a bad-input audit)
    signed = Image.fromarray(np.tile(np.linspace(-1, 1, 40, dtype=np.float32), (40, 1)))
    assert "800 pixel(s) with values below 0 shown black" in images.prepare_image(png(signed, "TIFF"), 32).notes
    # 16 bits a channel in colour: PIL says RGB, and the notes said nothing of the 16 bits
    def rgb16(pixels: np.ndarray) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        h, w = pixels.shape[:2]
        rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    deep = images.prepare_image(rgb16(np.full((8, 8, 3), 65535 // 2, np.uint16)), 8)
    assert "RGB with 16 bits a channel read as 8" in deep.notes and abs(float(deep.tensor.mean()) - 0.5) < 0.01
    assert not any("16 bits" in n for n in images.prepare_image(png(rgb), 32).notes)
    # transparent pixels go to white
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert torch.allclose(images.prepare_image(png(clear), 32).tensor, torch.ones(3, 32, 32))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    assert any("transparency composited onto white" in n for n in images.prepare_image(png(palette), 32).notes)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = Image.fromarray(np.concatenate([np.full((16, 64, 3), 255, np.uint8), np.zeros((16, 64, 3), np.uint8)]))
    tall = images.prepare_image(png(stored, "JPEG", exif=exif.tobytes()), 32)  # stored 64x32, its top half white
    assert any("EXIF orientation" in n for n in tall.notes) and tall.original_size == (64, 32)
    # and turned indeed (a uniform picture could not tell): a quarter turn clockwise puts the white top on the right
    assert float(tall.tensor[:, :, -8:].mean()) > 0.9 and float(tall.tensor[:, :, :8].mean()) < 0.1
    for fmt in ("WEBP", "BMP"):
        assert images.prepare_image(png(rgb, fmt, **({"lossless": True} if fmt == "WEBP" else {})), 32).tensor.shape == (3, 32, 32)


def test_a_cropped_upload_has_a_preview_of_the_whole_file_dimmed_outside_the_square_used():
    img = Image.new("RGB", (128, 96), (200, 100, 50))
    prep = images.prepare_image(png(img), 32)
    bright = prep.preview[..., 0] == 200
    assert prep.preview.shape == (240, 320, 3) and prep.preview.dtype == np.uint8
    ys, xs = np.nonzero(bright)  # the centre 96x96 of 128x96, at 320/128 = 2.5x
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (40, 280, 0, 240) and bright.sum() == 240 * 240
    assert (prep.preview[~bright] == np.rint(np.array([200, 100, 50]) * 0.3)).all()  # the rest dimmed, not gone
    tall = images.prepare_image(png(Image.new("RGB", (10, 40), (255, 255, 255))), 32).preview
    assert tall.shape == (320, 80, 3) and (tall[120:200] == 255).all() and (tall[:120] < 255).all()  # enlarged 8x
    strip = images.prepare_image(png(Image.new("RGB", (20000, 1))), 32).preview  # never 0 px high
    assert strip.shape == (1, 320, 3)
    assert images.prepare_image(png(Image.new("RGB", (50, 50))), 32).preview is None  # a square is used whole
    # a transparent file's preview is on the checkerboard its input pictures have, not the model's white (dimmed
    # white outside the square read as grey parts of the image)
    clear = images.prepare_image(png(Image.new("RGBA", (40, 20), (255, 0, 0, 0))), 32).preview
    board = {round(c * 255) for c in images.CHECKER}
    assert set(np.unique(clear[:, 80:240])) == board
    assert set(np.unique(clear[:, :80])) == {round(c * 0.3) for c in board}
    rotated = Image.new("RGB", (60, 30), (255, 255, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90°: the preview is upright, as the model input is
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif)
    assert images.prepare_image(buf.getvalue(), 32).preview.shape == (320, 160, 3)


def test_prepare_image_resizes_and_centre_crops():
    left, right = np.zeros((60, 50, 3), np.uint8), np.full((60, 50, 3), 255, np.uint8)
    wide = Image.fromarray(np.concatenate([left, right], axis=1))  # 100 x 60, black | white
    prep = images.prepare_image(png(wide), 32)
    assert prep.original_size == (100, 60) and prep.tensor.shape == (3, 32, 32)
    assert prep.notes == ["centre-cropped 100x60 to 60x60", "resized 60x60 -> 32x32"]
    assert float(prep.tensor[:, :, :8].mean()) < 0.05 and float(prep.tensor[:, :, -8:].mean()) > 0.95
    small = images.prepare_image(png(Image.new("RGB", (8, 8), (10, 200, 30))), 32)
    assert small.tensor.shape == (3, 32, 32)
    # downscaled with a filter that averages (nearest neighbours turned a 1-pixel checkerboard all black)
    checker = Image.fromarray((np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert 0.4 < float(images.prepare_image(png(checker), 32).tensor.mean()) < 0.6
    # a long thin strip is cropped before it is resized, never scaled up along its length
    strip = Image.fromarray(np.tile(np.arange(100_000, dtype=np.uint32) % 256, (2, 1)).astype(np.uint8)).convert("RGB")
    thin = images.prepare_image(png(strip), 32)
    assert thin.notes == ["centre-cropped 100000x2 to 2x2", "resized 2x2 -> 32x32"]
    assert thin.tensor.shape == (3, 32, 32)
    same = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    exact = images.prepare_image(png(same), 32)
    assert exact.notes == [] and np.array_equal(images.to_uint8(exact.tensor), np.asarray(same))
    assert exact.sha256 == images.image_hash(torch.from_numpy(np.array(same)).permute(2, 0, 1) / 255)


def test_a_jpeg_over_the_limit_is_decoded_at_a_smaller_scale_where_that_brings_it_under():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 801, 3), dtype=np.uint8))
    jpeg = png(photo, "JPEG")
    done = images.prepare_image(jpeg, 32, max_pixels=200_000)  # 0.48 MP at full size, 0.12 at 1/2
    assert done.original_size == (801, 600) and done.tensor.shape == (3, 32, 32)
    assert done.notes[0] == "JPEG decoded at 1/2 scale, 801x600 to 401x300 (over the 0 megapixel limit at full size)"
    assert "1/8 scale, 801x600 to 101x75" in images.prepare_image(jpeg, 32, max_pixels=8_000).notes[0]
    # 1/4 where 1/2 (401x300 = 120,300 pixels: the odd side rounds up) is still over
    assert "1/4 scale, 801x600 to 201x150" in images.prepare_image(jpeg, 32, max_pixels=120_100).notes[0]
    with pytest.raises(images.ImageError, match="801x600 = 0.5 megapixels"):  # not even 1/8 brings it under
        images.prepare_image(jpeg, 32, max_pixels=7_000)
    mpo = png(photo, "MPO", save_all=True, append_images=[photo.copy()])  # many phones' JPEGs carry a second picture
    notes = images.prepare_image(mpo, 32, max_pixels=200_000).notes
    assert notes[:2] == ["JPEG decoded at 1/2 scale, 801x600 to 401x300 (over the 0 megapixel limit at full size)",
                         "first frame used (the file has more)"], notes
    with pytest.raises(images.ImageError, match="801x600 = 0.5 megapixels; the limit is 0 megapixels"):
        images.prepare_image(png(photo), 32, max_pixels=200_000)  # no reduced decode for a PNG: refused


def test_damaged_extras_of_a_good_first_picture_are_said_not_raised_and_scans_are_capped(monkeypatch):
    """From a bad-input audit: a TIFF whose pointer to a second page leads nowhere (TypeError) and a PNG with 4 bytes
    of EXIF (struct.error) put a traceback on the page; a JPEG of 10,000 scans took 52 s to decode."""
    tiff = bytearray(png(Image.new("RGB", (6, 4), (200, 10, 10)), "TIFF"))
    ifd = struct.unpack("<I", tiff[4:8])[0]
    entries = struct.unpack("<H", tiff[ifd:ifd + 2])[0]
    tiff[ifd + 2 + 12 * entries:ifd + 6 + 12 * entries] = struct.pack("<I", len(tiff) + 10_000)  # a next page nowhere
    done = images.prepare_image(bytes(tiff), 4)
    assert done.notes[0].startswith("first frame used") and done.tensor[0].min() > 0.7
    plain = png(Image.new("RGB", (6, 4), (10, 200, 10)))
    chunk = b"eXIf" + b"MM\x00*"
    short_exif = plain[:33] + struct.pack(">I", 4) + chunk + struct.pack(">I", zlib.crc32(chunk)) + plain[33:]
    done = images.prepare_image(short_exif, 4)
    assert "its EXIF data could not be read: shown as stored, not rotated" in done.notes
    progressive = png(Image.new("RGB", (16, 16), (10, 10, 200)), "JPEG", progressive=True)
    assert images.prepare_image(progressive, 4).tensor.shape == (3, 4, 4)
    monkeypatch.setattr(images, "MAX_JPEG_SCANS", 3)
    with pytest.raises(images.ImageError, match=r"the JPEG has \d+ scans; the limit is 3"):
        images.prepare_image(progressive, 4)
    images.prepare_image(png(Image.new("RGB", (16, 16)), "JPEG"), 4)  # a baseline JPEG: one scan


def test_a_file_over_the_byte_limit_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_BYTES", 2 ** 20)
    with pytest.raises(images.ImageError, match=r"the file is 1.0 MiB; the limit is 1 MiB"):
        images.prepare_image(b"x" * (2 ** 20 + 1), 32)
    with pytest.raises(images.ImageError, match="not an image"):  # at the limit: decoded (and refused as text)
        images.prepare_image(b"x" * 2 ** 20, 32)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image, just text" * 10, "not an image"),
    (None, "truncated"),
    (png_header(50_000, 50_000), "the image is 2500 megapixels, over Pillow.s 179 megapixel limit for any file .a "
                                 "decompression bomb"),  # over Pillow's own limit: that one quoted
    (png_header(7_000, 7_000), r"7000x7000 = 49.0 megapixels; the limit is 40 megapixels: scale it down first"),
    (png_header(6_400, 6_300), r"= 40.3 megapixels; the limit is 40"),  # (rounded to 40, it read as at the limit)
    # an EPS renamed .png: never handed to Pillow's EPS decoder (Ghostscript), refused as not an image
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "not an image"),
])
def test_prepare_image_refuses_bad_files(data, message):
    if data is None:  # a real PNG cut in half
        noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        full = png(noisy)
        data = full[: len(full) // 2]
    with pytest.raises(images.ImageError, match=message):
        images.prepare_image(data, 32)


def test_non_finite_pixels_and_unknown_exif_orientations_are_handled_and_said():
    """A float image with a NaN keeps its picture (the NaN becomes 0, with a note), and an EXIF orientation outside
    2..8 (9, as some writers store) rotates nothing and claims nothing."""
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    ramp[0, 0] = np.nan
    buf = io.BytesIO()
    Image.fromarray(ramp, "F").save(buf, "TIFF")
    prepared = images.prepare_image(buf.getvalue(), 32)
    assert prepared.notes[0] == "1 NaN or infinite pixel value(s) set to 0"
    assert 0.45 < float(prepared.tensor.mean()) < 0.55  # not black
    odd = Image.new("RGB", (40, 30), (200, 10, 10))
    exif = odd.getexif()
    exif[0x0112] = 9
    buf = io.BytesIO()
    odd.save(buf, "JPEG", exif=exif)
    assert not any("EXIF" in note for note in images.prepare_image(buf.getvalue(), 32).notes)


def test_display_helpers():
    w = torch.randn(5, 3, 3, 3)
    tiles = images.atom_tiles(w)
    assert tiles.shape == (5, 3, 3, 3) and tiles.min() >= 0 and tiles.max() <= 1
    assert np.allclose(images.atom_tiles(torch.zeros(1, 3, 3, 3)), 0.5)  # grey is zero
    grid = images.tile_grid(tiles, ncols=3, pad=1)
    assert grid.shape == (2 * 4 - 1, 3 * 4 - 1, 3)
    z = np.zeros((4, 6, 6))
    z[2] = 1.0
    z[1, 0, 0] = -3.0
    assert list(np.argsort(-images.channel_activity(z))[:2]) == [2, 1]
    rgb = images.colorize(np.linspace(0, 1, 12).reshape(3, 4))
    assert rgb.shape == (3, 4, 3) and np.allclose(rgb[0, 0], [68 / 255, 1 / 255, 84 / 255])
    assert np.allclose(images.colorize(np.zeros((2, 2)), diverging=True), 1.0)  # 0 is white
    atoms = np.zeros((2, 3, 32, 32))
    atoms[:, :, 14:19, 15:18] = 1.0
    assert images.crop_to_support(atoms, margin=1).shape == (2, 3, 7, 5)
    data = images.png_bytes(np.random.default_rng(0).random((3, 8, 8)), scale=4)
    assert Image.open(io.BytesIO(data)).size == (32, 32)


def test_scored_tiles_draw_each_atom_with_a_bar_as_long_as_its_score():
    """The exported picture of the atoms that drove a decision: bar length is |score| against the largest, red
    for, blue against, none for 0; the tile itself is shown above its bar."""
    tiles = np.stack([np.full((3, 3, 3), v) for v in (0.0, 0.5, 1.0, 0.25)])
    scores = np.array([-2.0, 1.0, 0.0, 0.5])
    pic = images.scored_tiles(tiles, scores, ["a", "b", "c", "d"], ncols=4)
    cell = (pic.shape[1] - 3 * 4) // 4

    def bar_row(i: int) -> np.ndarray:  # the first row under the tile whose pixels are not all white
        col = pic[:, i * (cell + 4): i * (cell + 4) + cell]
        for y in range(col.shape[0]):
            if not np.allclose(col[y], 1.0) and y > 0 and np.allclose(col[y - 1], 1.0):
                return col[y]
        raise AssertionError(f"no bar under tile {i}")

    red, blue = np.array([214, 39, 40]) / 255, np.array([31, 119, 180]) / 255
    lengths = []
    for i in range(4):
        row = bar_row(i)
        coloured = np.all(np.isclose(row, red, atol=1e-3), 1) | np.all(np.isclose(row, blue, atol=1e-3), 1)
        lengths.append(int(coloured.sum()))
        if scores[i]:
            assert np.allclose(row[0], red if scores[i] > 0 else blue, atol=1e-3)
    assert lengths[0] == cell and lengths[2] == 0
    assert abs(lengths[1] - cell / 2) <= 1 and abs(lengths[3] - cell / 4) <= 1
    for i, v in enumerate((0.0, 0.5, 1.0, 0.25)):  # each tile on top of its cell, in its own colour
        assert np.allclose(pic[0, i * (cell + 4) + cell // 2], v, atol=1 / 255), i
    wide = images.scored_tiles(tiles[:2], scores[:2], ["#255 (-3.4e-05)", "#1"])  # a cell is as wide as its label
    assert wide.shape[1] > pic.shape[1] / 2
    with pytest.raises(ValueError, match="one score and label per tile"):
        images.scored_tiles(tiles, scores[:3], ["a", "b", "c", "d"])


def test_an_exported_figure_has_its_title_and_a_colour_bar_that_says_what_its_colours_are():
    """The Export tab's PNGs were bare pictures: no layer, no λ, no scale for their colours."""
    picture = np.full((40, 60, 3), 0.5)
    plain = images.figure(picture, "conv1's code z")
    assert plain.shape[1] >= 60 and plain.shape[0] > 40
    head = plain.shape[0] - 40 - 8  # the picture sits under the title, 8 px from the bottom
    assert np.allclose(plain[head:head + 40, 8:68], 0.5, atol=1 / 255)
    assert (plain[:head].min(-1) < 0.3).any()  # the title's dark text
    tall = images.figure(picture, "a long title " * 12, "and its subtitle")
    assert tall.shape[0] > plain.shape[0] + 30 and tall.shape[1] == plain.shape[1]  # wrapped to the width, not cut
    for diverging, hot, low in ((False, False, 0.0), (True, False, -2.0), (False, True, 0.0)):
        fig = images.figure(picture, "z", colorbar=(low, 2.0, "z"), diverging=diverging, hot=hot)
        head = fig.shape[0] - 40 - 16 - 8  # ...and the colour bar's label under it
        x = 8 + 60 + 8 + 6  # the middle of the colour bar, right of the picture
        ramp = fig[head:head + 40, x]
        for value, end in ((2.0, ramp[0]), (low, ramp[-1])):
            assert np.allclose(end, images.colorize(np.array(value), low, 2.0, diverging=diverging, hot=hot),
                               atol=2 / 255)
        assert (fig[head:head + 40, x + 12:].min(-1) < 0.3).any()  # its values written beside it
    # the saliency maps' scale, as the page draws them (plotly's Hot reversed): white at 0, black at the top
    import plotly.colors
    hot = plotly.colors.PLOTLY_SCALES["Hot"][::-1]  # the page's overlay: colorscale "Hot", reversescale
    rgb = np.array([[int(c) for c in colour[4:-1].split(",")] for _, colour in hot]) / 255
    assert np.allclose(images.colorize(np.array([1 - p for p, _ in hot]), 0, 1, hot=True), rgb)
    # a font without λ or Σ (no DejaVu Sans on the system) spells them out instead of drawing boxes
    from PIL import ImageFont
    assert images._drawable("λ=0.1 · #3 (Σ|z|)", ImageFont.load_default()) == "lambda=0.1 | #3 (sum|z|)"


def test_exported_figures_say_the_noise_and_the_lambda_of_their_layer():
    """A figure of conv1's codes read 'λ=0.1 (2 layers their own)' with conv1 at 0.5, and a continuous noise level
    c=5 of shot noise was written 'severity 5' (which is c=50)."""
    from app import state
    per_layer = {"conv1": 0.5, "layer1.0.conv1": 0.2}
    assert state.setting_text(0.1, {}, 2) == "λ=0.1, 2 steps"
    assert state.setting_text(0.1, per_layer, {"conv1": 7}) == "λ=0.1 (conv1 0.5, layer1.0.conv1 0.2), 7 steps in conv1"
    assert state.setting_text(0.1, per_layer, 1, "conv1") == "λ=0.5 in conv1 (others 0.1, 1 more with its own), 1 step"
    assert state.setting_text(0.1, {"conv1": 0.5}, 2, "conv1") == "λ=0.5 in conv1 (others 0.1), 2 steps"
    assert state.setting_text(0.1, {f"l{i}": 0.3 for i in range(3)}, 2, "conv1") == "λ=0.1 (3 layers with their own), 2 steps"
    every = {f"l{i}": 0.2 for i in range(3)}  # every layer its own: the λ for all is no layer's, not named
    assert state.setting_text(0.5, every, 2, n_layers=3) == "λ=0.2 in every layer, 2 steps"
    assert state.setting_text(0.5, dict(every, l0=0.4), 2, n_layers=3) == "λ from 0.2 to 0.4, each layer its own, 2 steps"
    assert state.setting_text(0.5, every, 2, "l1", 3) == "λ=0.2 in l1 (every layer its own), 2 steps"
    assert state.setting_text(0.5, every, 2, n_layers=4) == "λ=0.5 (3 layers with their own), 2 steps"
    assert state.noise_text(dict(kind="none", severity=None, seed=None)) == "no noise"
    assert state.noise_text(dict(kind="shot", severity=None, seed=3, level=5.0)) == "shot noise, level c=5, seed 3"
    assert state.noise_text(dict(kind="gaussian", severity=3, seed=0)) == "gaussian noise, severity 3, seed 0"
    settings = dict(checkpoint=dict(model="sdnet18_all (width 16, no shortcuts)"), image=dict(source="sample:cat_2"),
                    corruption=dict(kind="shot", severity=None, seed=3, level=5.0),
                    lam=dict(all=0.1, per_layer={"conv1": 0.5}), n_steps=2)
    assert state.export_subtitle(settings, "conv1") == ("sdnet18_all (width 16, no shortcuts) · sample:cat_2 · shot "
                                                        "noise, level c=5, seed 3 · λ=0.5 in conv1 (others 0.1), 2 steps")
    # one NaN in a code: the map keeps its colours and its scale its numbers (it was all one colour, 'nan' to 'nan')
    z = np.random.default_rng(0).random((4, 8, 8))
    z[0, 0, 0] = np.nan
    rec = dict(name="conv1", z=z)
    pic = np.asarray(Image.open(io.BytesIO(state._codes_png(rec, [0, 1, 2, 3], settings))).convert("RGB"))
    assert len(np.unique(pic.reshape(-1, 3), axis=0)) > 50


def test_exported_figures_and_code_maps_say_when_a_code_is_all_zero(monkeypatch):
    """At λ=1 deep codes are all zero: the page says 'sees nothing', but the export was a black square titled
    'contrast stretched', its code map 'its 16 most active of 128 channels' on a 0-to-0 scale, and the page's colour
    bar read '0, 0.5p, 1p' (a scale up to 1e-12)."""
    from app import plots, state
    titles = []
    real = images.figure
    monkeypatch.setattr(images, "figure", lambda picture, title, *a, **k: titles.append(title) or real(picture, title,
                                                                                                     *a, **k))
    settings = dict(checkpoint=dict(model="m"), image=dict(source="sample:cat_2"),
                    corruption=dict(kind="none", severity=None, seed=None), lam=dict(all=1.0, per_layer={}), n_steps=2)
    zero = dict(name="layer4.1.conv2", z=np.zeros((8, 4, 4)))
    state._codes_png(zero, [0, 1, 2], settings)
    state.sees_png(np.zeros((3, 32, 32)), "layer4.1.conv2", False, settings, zero=True)
    state._codes_png(dict(zero, z=np.ones((8, 4, 4))), [0, 1, 2], settings)
    assert "all 8 channels are zero at this λ" in titles[0] and "it sees nothing" in titles[1]
    assert "most active" in titles[2]
    # in absolute pixels an all-zero code's picture is BatchNorm's offsets, not nothing (it was called 'sees
    # nothing' beside the same flat picture of layers whose codes were not zero)
    state.sees_png(np.full((3, 32, 32), 0.4), "layer4.1.conv2", True, settings, zero=True)
    assert "the picture is BatchNorm's offsets alone" in titles[-1] and "sees nothing" not in titles[-1]
    grid = plots.code_grid(np.zeros((8, 4, 4)), [0, 1], np.zeros(8))
    assert grid.data[0].zmax == 1 and grid.data[0].colorbar.title.text == "z (all 0)"
    # a layer fed zeros: its input, A(z) and residual maps ran -0.5 to 0.5 in mid-teal on the page ('l2 norm'), and
    # its export's bar from 0 to 0
    flat = [(t, np.zeros((4, 4))) for t in ("input x", "A(z)", "residual")]
    maps = plots.layer_maps(flat, False, "l2 norm")
    assert (maps.data[0].zmin, maps.data[0].zmax) == (0, 1) and maps.data[0].colorbar.title.text == "l2 norm (all 0)"
    assert plots.layer_maps([(t, m + 2) for t, m in flat], False, "l2 norm").data[0].zmax == 2
    bars = []
    monkeypatch.setattr(images, "figure", lambda *a, **k: (  # figure(picture, title, subtitle, colorbar, ...)
        titles.append(a[1]), bars.append(k["colorbar"] if "colorbar" in k else a[3]), real(*a, **k))[2])
    state._recon_png(dict(zero, x=np.zeros((8, 4, 4)), recon=np.zeros((8, 4, 4)), residual=np.zeros((8, 4, 4))), None,
                     settings)
    assert bars[-1][:2] == (0.0, 1.0) and "(all 0)" in bars[-1][2] and "the layer is fed zeros" in titles[-1]


def test_display_helpers_take_uint8_pixels_non_finite_values_and_refuse_bad_sizes():
    """uint8 pictures were scaled by 255 again (every non-zero pixel white, hashes alike); NaN crashed colorize."""
    u8 = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    hwc = u8.permute(1, 2, 0).numpy()
    assert np.array_equal(images.to_uint8(u8), hwc) and np.array_equal(images.to_uint8(u8.numpy()), hwc)
    for picture in (u8, u8.numpy(), hwc):  # a CHW uint8 array was a PIL TypeError
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(images.png_bytes(picture)))), hwc)
    assert images.image_hash(u8) != images.image_hash(u8 // 2)
    rgb = images.colorize(np.array([[0.0, np.nan], [1.0, np.inf]]))
    assert np.isfinite(rgb).all() and np.allclose(rgb[0, 1], rgb[0, 0]) and np.allclose(rgb[1, 1], rgb[1, 0])
    div = images.colorize(np.array([[-1.0, np.nan], [1.0, -np.inf]]), diverging=True)
    assert np.isfinite(div).all() and np.allclose(div[0, 1], 1.0) and np.allclose(div[1, 1], div[0, 0])
    with pytest.raises(ValueError, match="ncols must be at least 1"):
        images.tile_grid(np.zeros((3, 2, 2)), ncols=0)
    with pytest.raises(ValueError, match="size must be at least 1"):
        images.prepare_image(b"", size=0)


def test_a_dark_16_bit_image_is_said_to_be_dark():
    dark = Image.fromarray(np.full((8, 8), 119, dtype=np.uint16))  # 16-bit container, a dim 8- or 12-bit picture
    buf = io.BytesIO()
    dark.save(buf, format="PNG")
    notes = images.prepare_image(buf.getvalue(), size=8).notes
    assert any("as dark as stored (brightest value 119 of 65535" in n for n in notes), notes
    for brightest, dark in ((4000, True), (5000, False)):  # 12-bit data (up to 4095) is said to be dark
        stored = png(Image.fromarray(np.full((8, 8), brightest, dtype=np.uint16)))
        assert any("as dark as stored" in n for n in images.prepare_image(stored, 8).notes) == dark


def test_a_high_dynamic_range_image_is_scaled_by_its_brightest_value():
    # float values up to 1e6: scaled to 0-255 by their maximum, not by 65535 (washed out white)
    hdr = Image.fromarray(np.linspace(0, 1e6, 64 * 64, dtype=np.float32).reshape(64, 64), "F")
    prep = images.prepare_image(png(hdr, "TIFF"), 32)
    assert any("high dynamic range" in n for n in prep.notes) and 0.45 < float(prep.tensor.mean()) < 0.55


@pytest.mark.parametrize("mode, top, said", [("F", 10.0, "float values up to 10 read as 8-bit levels (0-255): dark"),
                                              ("F", 200.0, "float values up to 200 read as 8-bit levels (0-255)"),
                                              ("F", 40.0, "float values up to 40 read as 8-bit levels (0-255): dark"),
                                              ("I", 200, "32-bit integer values up to 200 read as 8-bit levels"),
                                              ("I", 255, "32-bit integer values up to 255 read as 8-bit levels")])
def test_a_float_or_integer_image_in_8_bit_range_says_how_it_is_read(mode, top, said):
    img = Image.fromarray(np.linspace(0, top, 64, dtype=np.float32 if mode == "F" else np.int32).reshape(8, 8), mode)
    notes = images.prepare_image(png(img, "TIFF"), size=8).notes
    assert any(n.startswith(said) for n in notes) and ("dark" in said) == any("dark" in n for n in notes), notes


def test_an_rgb_png_with_a_transparent_colour_is_composited_onto_white():
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    img.putpixel((0, 0), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=(0, 0, 0))  # black is transparent (a tRNS chunk)
    prepared = images.prepare_image(buf.getvalue(), size=4)
    assert images.to_uint8(prepared.tensor)[0, 0].tolist() == [255, 255, 255]
    assert images.to_uint8(prepared.tensor)[1, 1].tolist() == [10, 20, 30]
    assert any("transparency composited onto white" in note for note in prepared.notes)


def test_rgb_pictures_hover_with_8_bit_values():
    """The hover read 'rgb=[154.33871984481812, ...]': the picture's values are the 8-bit ones the screen shows."""
    from app import plots
    z = plots._rgb_trace(np.array([[[0.6052, 0.2, 1.3]]]))["z"]
    assert z.dtype == np.uint8 and z.tolist() == [[[154, 51, 255]]]


def test_a_16_bit_grayscale_png_with_a_transparent_value_is_composited_onto_white():
    """A grayscale PNG's tRNS names one value transparent; at 16 bits Pillow gives the value, not an alpha."""
    gray = np.full((4, 4), 30000, dtype=np.uint16)
    gray[0, 0] = 1000
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", transparency=1000)
    prepared = images.prepare_image(buf.getvalue(), size=4)
    seen = images.to_uint8(prepared.tensor)
    assert seen[0, 0].tolist() == [255] * 3 and seen[1, 1].tolist() == [117] * 3  # 30000 of 65535 in 8 bits
    assert prepared.alpha[0, 0] == 0 and (prepared.alpha.flatten()[1:] == 1).all()
    assert any("transparency (value 1000) composited onto white" in note for note in prepared.notes)
    Image.fromarray(gray).save(buf := io.BytesIO(), format="PNG", transparency=7)  # no pixel has it
    assert images.prepare_image(buf.getvalue(), size=4).alpha is None
    # a dark picture whose transparent value is white-hot is still said to be dark (that value is not shown)
    gray[:] = 119
    gray[0, 0] = 65535
    Image.fromarray(gray).save(buf := io.BytesIO(), format="PNG", transparency=65535)
    assert any("brightest value 119 of 65535" in n for n in images.prepare_image(buf.getvalue(), size=4).notes)


def test_a_transparent_upload_is_shown_on_a_checkerboard_and_the_model_sees_white_there():
    """Composited onto white, as the model takes it, a transparent upload's picture merged with the white page."""
    from app import panels
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[..., 2] = 200  # blue, transparent on the left half, opaque on the right
    rgba[:, 8:, 3] = 255
    prep = images.prepare_image(png(Image.fromarray(rgba, "RGBA")), size=8)  # centre-cropped: columns 4-11
    seen = images.to_uint8(prep.tensor)
    assert (seen[:, :4] == 255).all() and (seen[:, 4:] == [0, 0, 200]).all()  # the model input, as before
    assert prep.alpha.shape == (8, 8) and (prep.alpha[:, :4] == 0).all() and (prep.alpha[:, 4:] == 1).all()
    assert images.prepare_image(png(Image.fromarray(rgba[:, 8:], "RGBA")), size=8).alpha is None  # all opaque
    frame, squares = round(panels.FRAME * 255), {round(c * 255) for c in images.CHECKER}
    for alpha, behind in ((prep.alpha, squares), (None, {255})):  # the clean image, and the model input (white)
        shown = panels.framed_picture(prep.tensor.numpy(), alpha, side=64)  # pixels 8x8, a 1-pixel frame
        assert shown.shape == (66, 66, 3)
        assert all((edge == frame).all() for edge in (shown[0], shown[-1], shown[:, 0], shown[:, -1]))
        assert set(np.unique(shown[1:-1, 1:33])) == behind and (shown[1:-1, 33:-1] == [0, 0, 200]).all()


def test_tile_titles_drop_their_usage_where_it_would_be_under_8_px():
    """Titles '#3 (12.3)' show where they fit at 8 px or more, else '#3', the usage on hover: two text traces and the
    container's width from which the long ones show. In a phone's window the code maps' long titles were 6 px; 64
    atoms in 16 columns had the short ones in any window."""
    from app import plots
    pics = np.zeros((64, 3, 3, 3))
    titles = plots.usage_titles(list(range(64)), np.full(64, 12.3))

    def chart(n, ncols):
        fig = plots.tiles(pics[:n], titles[:n], ncols=ncols)
        return fig, [t for t in fig.data if t.type == "scatter"], plots.fitted_css(fig)

    for n, ncols in ((16, 8), (64, 16)):
        fig, (short, long), css = chart(n, ncols)
        assert list(short.text) == [f"#{c}" for c in range(n)] and list(long.text) == titles[:n]
        # the titles never hover (plotly hovers from the data: a hidden trace did too, and a title beat the tile's
        # own hover within ~20 px); each tile's pixels say its whole title, the gaps between tiles nothing
        assert short.hoverinfo == long.hoverinfo == "skip"
        picture = fig.data[0]
        hover = np.asarray(picture.hovertext)
        assert hover.shape == np.asarray(picture.z).shape[:2] and picture.hoverinfo == "text"  # (no label where "")
        assert hover[0, 0] == titles[0] and hover[-1, -1] == titles[n - 1] and hover[0, 3] == "" == hover[1, 3]
        # the long ones fit at 8 px from the switch on (the pitch of their tiles, 4 px between), not below it
        for width, fits in ((css["title_switch"], True), (css["title_switch"] - 3, False)):
            assert (_css_px(css["long_title_size"], width) >= plots.LONG_TITLE_MIN - 1e-6) == fits, (n, width)
        assert fig.layout.margin.t == plots.TOOLBAR + plots.TITLE_ROOM
    # the code maps' hover: channel and Σ|z| as the title rounds it (1,234.5 -> 1,234 there; d3's .3~g wrote 1.23e+3)
    codes = plots.code_grid(np.ones((4, 5, 5)), [3, 1], np.array([0.0, 7.5, 0.0, 1234.5]))
    assert [list(px) for px in np.asarray(codes.data[0].customdata)[0, [0, -1]]] == [[3, 1234, 0, 0], [1, 7.5, 4, 0]]
    assert "Σ|z| %{customdata[1]:,.12~g}" in codes.data[0].hovertemplate and "#3 (1,234)" in codes.data[-1].text
    # 16 atoms in 8 columns: long from below an 800 px window's chart; 64 in 16: short there, long at 1400 px
    assert chart(16, 8)[2]["title_switch"] < plots.NARROW < chart(64, 16)[2]["title_switch"] < 940
    # titles without a usage, or whose long form never fits: one trace, no switch
    plain = plots.tiles(pics[:4], ["input x", "A(z)", "r", ""], ncols=4)
    assert len([t for t in plain.data if t.type == "scatter"]) == 1 and "title_switch" not in plots.fitted_css(plain)
    # a parenthetical that is a key, not a usage, goes the same way: the first layer's maps in a phone's window
    maps = plots.layer_maps([(t, np.zeros((32, 32, 3))) for t in ("input x", "A(z)", "residual x - A(z) (grey = 0)")],
                            rgb=True)
    short, long = [t for t in maps.data if t.type == "scatter"]
    assert list(short.text) == ["input x", "A(z)", "residual x - A(z)"] and long.text[2].endswith("(grey = 0)")
    assert 300 < plots.fitted_css(maps)["title_switch"] < plots.NARROW  # long in an 800 px window
    tiny = plots.tiles(np.zeros((8, 1, 1, 3)), titles[:8], ncols=8, height_per_row=4)
    (only,) = [t for t in tiny.data if t.type == "scatter"]
    assert only.text[0] == "#0" and "title_switch" not in plots.fitted_css(tiny)


def _css_px(length: str, width: float) -> float:
    """A CSS length made of clamp(), min(), calc(), px and 100cqw, in pixels for a container `width` px wide."""
    expr = length.replace("100cqw", f"{width}").replace("px", "").replace("calc", "").replace("clamp", "between")
    assert set(expr) <= set("0123456789.+-*/(), minbetw"), length
    return eval(expr, {"__builtins__": {}, "min": min, "between": lambda lo, v, hi: max(lo, min(v, hi))})


def test_tile_charts_are_as_tall_as_their_tiles_at_the_width_they_get():
    """A tile chart's height was fixed for a ~900 px wide chart: in an 800 px window (468 px) its tiles, shrunk to the
    width, left blank bands above and below. Its height is a CSS length of its width, at which the square-pixel
    picture fills the plot exactly: as wide as the plot where that limits it, else at its wanted scale."""
    from app import plots
    widths = (350, plots.NARROW, 940, 2000)  # a chart's width in a phone's, an 800 and a 1400 px window, a wide screen
    rng = np.random.default_rng(0)
    maps = [(t, rng.random((32, 32))) for t in ("input x", "A(z)", "residual")]
    figs = [plots.tiles(rng.random((16, 7, 7, 3)), [f"#{i} (1.5)" for i in range(16)], height_per_row=120),
            plots.tiles(rng.random((64, 3, 3, 3)), [f"#{i}" for i in range(64)], ncols=16),
            plots.code_grid(rng.random((16, 16, 16)), list(range(16)), np.arange(16.0)),
            plots.layer_maps([(t, rng.random((32, 32, 3))) for t, _ in maps], rgb=True),
            plots.layer_maps(maps, rgb=False, colorbar_title="l2 norm over channels"),
            # an attribution over its image (with plotly's scaleanchor a fullscreen round trip shrank it by a third)
            plots.overlay(rng.random((32, 32, 3)), rng.standard_normal((32, 32)), True, "Integrated Gradients")]
    for fig in figs:
        rows, cols = np.asarray(fig.data[0].z).shape[:2]  # the grid, in picture pixels
        margin = fig.layout.margin
        scales = []
        css = plots.fitted_css(fig)
        for width in widths:
            height, chart = _css_px(css["fitted_height"], width), _css_px(css["fitted_width"], width)
            across, down = chart - margin.l - margin.r, height - margin.t - margin.b  # the plot, in screen pixels
            scales.append(down / rows)
            # pixels square by the chart's size alone, no blank bands at any side (plotly's scaleanchor, which wrote
            # the ranges it widened back into the figure, broke the chart after fullscreen)
            assert across / cols == pytest.approx(scales[-1], rel=2e-3) and chart <= width + 1e-9, (fig.layout.height,
                                                                                                 width)
        # (plotly sets it for image traces unless told not to) and no zoom: a drag's box would stretch them
        assert fig.layout.yaxis.scaleanchor is False and fig.layout.xaxis.fixedrange and fig.layout.yaxis.fixedrange
        assert scales == sorted(scales)  # tiles grow with the width, up to their wanted scale
        # the titles as large as fit their tiles' pitch (4 px between) and the gap above them at each width, 8 to 12 px
        # (at 1400 px they stayed at the 8 px that fitted 800 px); one text trace, or two (short '#3', long
        # '#3 (12.3)'), the long ones from title_switch px on, at 8 px or more
        traces = [t for t in fig.data if t.type == "scatter"]
        keys = ["title_size", "long_title_size"][:len(traces)]
        png_w, png_h = css["png_width"], css["png_height"]

        def shown(key, width):
            return len(traces) == 1 or (width >= css["title_switch"]) == (key == "long_title_size")
        visible = []  # the shown titles' size at each width
        for titles, key in zip(traces, keys):
            longest = max(plots.text_width(t, 1) for t in titles.text)
            xs, ys = sorted(set(titles.x)), sorted(set(titles.y))
            pitch = xs[1] - xs[0] if len(xs) > 1 else cols
            gap = len(ys) * (ys[1] - ys[0]) - rows if len(ys) > 1 else None  # picture pixels between rows of tiles
            at = [(width, scale) for width, scale in zip(widths, scales) if shown(key, width)]
            sizes = [_css_px(css[key], width) for width, _ in at]
            assert sizes == sorted(sizes) and all(plots.TITLE_FLOOR <= size <= 12 for size in sizes), sizes
            assert key == "title_size" or min(sizes, default=8) >= plots.LONG_TITLE_MIN - 1e-6, sizes
            for size, (width, scale) in zip(sizes, at):
                assert size == plots.TITLE_FLOOR or size * longest + 4 <= pitch * scale + 0.01, (size, scale)
                assert size == plots.TITLE_FLOOR or gap is None or size <= gap * scale - 2 + 0.01, (size, gap, scale)
                visible.append((width, size))
            # The camera's PNG (drawn from the figure: no CSS there) shows the titles for its own width, at the size
            # the page's CSS gives there, rounded down. They were the narrow chart's 8-9 px on 80 px tiles.
            own_size = max(plots.TITLE_FLOOR, math.floor(_css_px(css[key], png_w)))
            assert titles.textfont.size == own_size and titles.opacity == shown(key, png_w), (css, png_w, key)
            assert titles.cliponaxis is False  # the first row's titles, above the plot
        # 8 px or more in the narrowest window the page is laid out for (these charts); in a phone's less, down to 5,
        # rather than overlapping
        assert min(size for width, size in visible if width == plots.NARROW) >= 8, visible
        assert plots.tiles(rng.random((4, 5, 5, 3)), [""] * 4).data[-1].text == ("",) * 4  # no titles: no crash
        # The camera's PNG: one size at any window's width (the figure's own), square pixels, no blank bands
        assert fig.layout.height == png_h and png_w <= plots.WIDTH
        assert (png_w - margin.l - margin.r) / cols == pytest.approx((png_h - margin.t - margin.b) / rows, rel=0.02)
        assert list(fig.layout.xaxis.range) == [-0.5, cols - 0.5] and list(fig.layout.yaxis.range) == [rows - 0.5, -0.5]
    assert plots.fitted_css(plots.predictions(["a", "b"], [("SDNet", "current", np.array([0.4, 0.6]))], 2)) is None


def test_the_toolbar_has_a_strip_of_its_own():
    """Plotly's toolbar, shown on hover at a chart's top right, covered the predictions chart's legend, the titles of
    the charts in half of an 800 px window and a tile chart's last titles. Two buttons are left (the camera and
    Streamlit's fullscreen), in a strip where only a title goes: legends start under it, tiles' titles too."""
    from app import panels, plots
    assert {"zoom2d", "pan2d", "zoomIn2d", "zoomOut2d", "autoScale2d", "resetScale2d"} <= set(
        panels.PLOTLY_CONFIG["modeBarButtonsToRemove"])
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    pred = plots.predictions(list("abcd"), [("SDNet at λ=0.1", "current", probs), ("trained", "trained", probs[::-1]),
                                            ("ResNet", "resnet", probs)], 2)
    depth = plots.across_depth(["conv1", "layer1.0.conv1"],
                               [("λ=0.1", "current", [0.2, 0.3]), ("trained λ", "trained", [0.2, 0.4])], "Sparsity", "s")
    lone = plots.atom_scores(np.array([1.0, -0.5]), ["atom 0", "atom 1"], "First-layer atoms")
    for fig in (pred, depth):  # its rows grow downwards from under the strip, and push the plot down
        legend = fig.layout.legend
        assert legend.yref == "container" and legend.yanchor == "top" and legend.xanchor == "right"
        assert (1 - legend.y) * fig.layout.height == pytest.approx(plots.TOOLBAR)
    for fig in (depth, lone):  # the title in the strip, at its left
        assert fig.layout.title.yref == "container" and fig.layout.title.y == 1 and fig.layout.title.yanchor == "top"
    grid = plots.tiles(np.zeros((16, 7, 7, 3)), [f"#{i} (1.5)" for i in range(16)])
    assert grid.layout.margin.t >= plots.TOOLBAR + plots.TITLE_MAX


def test_one_classs_bars_have_room_for_their_labels_under_a_two_line_legend():
    """At top-k 1 the three bars of one class got 15 px under a legend with a two-line entry ('SDNet as trained' over
    '(λ=0.1, 2 steps)'), and their 11 px labels overprinted: the legend's further lines are made room for, and the
    bars get at least 16 px each."""
    from app import plots
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    series = [("SDNet at λ=0.1, 2 steps", "current", probs), ("SDNet as trained (λ=0.1, 2 steps)", "trained", probs),
              ("ResNet baseline", "resnet", probs)]
    one, two = plots.predictions(list("abcd"), series, 1), plots.predictions(list("abcd"), series[:1] * 2, 1)
    assert one.layout.height - two.layout.height >= plots.LEGEND_LINE_PX + 16  # a legend line more, a bar more
    assert one.layout.height - 90 - 24 - plots.LEGEND_LINE_PX >= 16 * 3
    assert (1 - one.layout.legend.y) * one.layout.height == pytest.approx(plots.TOOLBAR)


def test_long_legend_entries_wrap_and_layer_names_stand_upright():
    """At 800 px 'λ=0.1 (layer2.0.conv1 0.15, layer3.1.conv2 0.15), 5 steps in conv1' ran off the legend's left edge
    (plotly does not wrap legend text), and the residual chart's 17 layer names, at 45 degrees, ran into each other."""
    from app import plots
    long = "λ=0.1 (layer2.0.conv1 0.15, layer3.1.conv2 0.15), 5 steps in conv1"
    fig = plots.across_depth(["conv1", "layer1.0.conv1"], [(long, "current", [0.2, 0.3]),
                                                           ("trained λ", "trained", [0.2, 0.4])], "Residual", "r")
    names = [t.name for t in fig.data]
    assert [n.replace("<br>", " ").rstrip("\u2003") for n in names] == [long, "trained λ"]
    assert all(len(line) <= plots.LEGEND_LINE for n in names for line in n.rstrip("\u2003").split("<br>"))
    assert names[0].count("<br>") == 2 and fig.layout.xaxis.tickangle == -90
    assert plots.legend_name("trained λ") == "trained λ"
    # a layer's λ stays beside its name, a count beside its noun: '(layer2.0.conv1' over '2)' read as two things
    assert plots.legend_name("λ=0.1 (layer2.0.conv1 2), 2 steps") == "λ=0.1 (layer2.0.conv1 2),<br>2 steps"
    # ...and a bracket that fits a line is not broken ('(λ=0.1,' over '2 steps)' in the predictions' legend)
    assert plots.legend_name("SDNet as trained (λ=0.1, 2 steps)") == "SDNet as trained<br>(λ=0.1, 2 steps)"
    assert plots.legend_name("λ=1e-3 (layer2.0.conv1 1e-05), 12 steps in conv1") == \
        "λ=1e-3 (layer2.0.conv1 1e-05),<br>12 steps in conv1"
    assert plots.legend_name("as trained (λ=0.1 (3 layers with their own), 20 steps)") == \
        "as trained (λ=0.1<br>(3 layers with their own),<br>20 steps)"  # '(3' over 'layers' before


def test_names_in_picture_captions_wrap_after_their_separators():
    """In an 800 px window a picture's caption broke mid-word ('upload:disc.pn' over 'g', 'layer1.1.c' over 'onv2'):
    a zero-width space after each separator lets it wrap there instead."""
    from app import panels
    zw = "\u200b"
    assert panels._wrappable("layer1.1.conv2") == f"layer1.{zw}1.{zw}conv2"
    assert panels._wrappable("upload:my_photo-2.png") == f"upload:{zw}my_{zw}photo-{zw}2.{zw}png"
    assert panels._wrappable("conv1") == "conv1" and panels._wrappable("a. b..") == "a. b.."  # nothing to wrap


def test_the_probability_axis_has_no_tick_past_100_percent():
    from app import plots
    for top in (1.0, 0.9, 0.5, 0.1, 0.02):
        probs = np.full(100, (1 - top) / 99)
        probs[0] = top  # 100 classes: a top probability of 0.02 left one tick, at 0%
        axis = plots.predictions([f"c{i}" for i in range(100)], [("SDNet", "red", probs)], 5).layout.xaxis
        assert axis.range[1] >= 1.2 * top  # room for the labels outside the bars
        assert max(axis.tickvals) <= 1.0 and len(axis.tickvals) >= 3, axis.tickvals  # an axis to 120% was drawn


# --- sdnet.attribution ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sdnet(calibrated_model):
    return calibrated_model("sdnet18_all", width=8, shortcut=False)


def test_integrated_gradients_is_exact_on_a_linear_model():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    ig = attribution.attribute(lin, x, 2, "integrated_gradients", ig_steps=8)
    # baseline black: IG = x * w_target exactly, and sums to the logit difference
    assert torch.allclose(ig, x * lin[1].weight[2].detach().view(3, 8, 8), atol=1e-5)


def test_attribution_methods(small_sdnet):
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in small_sdnet.state_dict().items()}
    ig = attribution.attribute(small_sdnet, x, 3, "integrated_gradients", ig_steps=8)
    assert ig.shape == (3, 32, 32) and torch.isfinite(ig).all() and float(ig.abs().sum()) > 0
    sal = attribution.attribute(small_sdnet, x, 3, "saliency")
    assert sal.shape == (3, 32, 32) and float(sal.min()) >= 0 and float(sal.max()) > 0
    assert not torch.allclose(sal, attribution.attribute(small_sdnet, x, 5, "saliency"))  # the target matters
    assert not torch.allclose(sal, attribution.attribute(small_sdnet, x, 3, "saliency", lam=1.0))  # so does λ
    # occlusion with 4 disjoint 16x16 windows: each pixel gets the logit drop of blacking out its window
    occ = attribution.attribute(small_sdnet, x, 3, "occlusion", window=16, stride=16)
    with torch.no_grad():
        full = small_sdnet(x[None])[0, 3]
        masked = x.clone()
        masked[:, 16:, :16] = 0
        drop = full - small_sdnet(masked[None])[0, 3]
    assert torch.allclose(occ[:, 16:, :16], drop.expand(3, 16, 16), atol=1e-4)
    assert attribution.attribution_map(ig, "integrated_gradients").shape == (32, 32)
    seen = []  # the modules a hook on the shared model's first layer sees run (a deep copy carries the hook along)
    spy = small_sdnet.conv1.register_forward_hook(lambda m, i, out: seen.append(m))
    try:
        name, scores = attribution.atom_attribution(small_sdnet, x, 3, "grad_x_activation")
    finally:
        spy.remove()
    assert seen and all(m is not small_sdnet.conv1 for m in seen)  # captum hooked a private copy only
    assert name == "conv1" and scores.shape == (8,)
    # gradient x activation by hand: atom c's score is the sum over positions of dlogit/dz_c * z_c, signed
    ref, codes = copy.deepcopy(small_sdnet), []
    ref.conv1.register_forward_hook(lambda m, i, out: codes.append(out))
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(ref(x[None])[0, 3], codes[0])
    expected = (grad * codes[0]).detach()[0].flatten(1).sum(1)
    assert (expected > 0).any() and (expected < 0).any()  # both signs, so a lost sign shows
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    _, lig = attribution.atom_attribution(small_sdnet, x, 3, "integrated_gradients", ig_steps=4)
    assert lig.shape == (8,) and torch.isfinite(lig).all()
    # the shared model is untouched: no hooks left behind, same weights, same lambdas
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in small_sdnet.modules())
    assert all(torch.equal(before[k], v) for k, v in small_sdnet.state_dict().items())
    assert all(layer.lam == 0.1 for _, layer in sdnet.csc_layers(small_sdnet))
    with pytest.raises(ValueError, match="unknown"):
        attribution.attribute(small_sdnet, x, 3, "guesswork")


def test_attribution_maps_sum_signed_colours_and_take_the_largest_magnitude():
    a = torch.tensor([[[1.0, -2.0]], [[-3.0, 0.5]], [[0.5, 0.5]]])  # (3 colours, 1, 2)
    torch.testing.assert_close(attribution.attribution_map(a, "integrated_gradients"), torch.tensor([[-1.5, -1.0]]))
    torch.testing.assert_close(attribution.attribution_map(a, "saliency"), torch.tensor([[3.0, 2.0]]))


def test_attribution_refuses_a_model_in_training_mode():
    """Its BatchNorm ran on the interpolated batch's statistics and changed the model's running ones."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18", width=2)  # fresh models are in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: attribution.attribute(model, torch.rand(3, 8, 8), 1, ig_steps=2),
                 lambda: attribution.atom_attribution(model, torch.rand(3, 8, 8), 1, "grad_x_activation")):
        with pytest.raises(ValueError, match=r"evaluation mode .* model.eval\(\)"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert attribution.attribute(model.eval(), torch.rand(3, 8, 8), 1, "saliency").shape == (3, 8, 8)


# --- app.state and app.panels: what the app computes and exports, function by function -----------

def test_a_replaced_checkpoint_loads_again_and_settings_name_its_new_hash(tmp_path, calibrated_model, monkeypatch):
    """A checkpoint overwritten in place (same name, same size: same architecture) must load again, under a new
    key for the data caches, and settings.json must carry the new file's sha256, not the cached one of the old."""
    from app import panels, state
    monkeypatch.setattr(state, "ROOT", tmp_path)  # the checkout: a checkpoint in it is named relative to it
    path = tmp_path / "checkpoints" / "sdnet18_all-w4.pt"
    path.parent.mkdir()
    cpu = torch.device("cpu")

    def save(seed: int, mtime_ns: int) -> state.Loaded:
        sdnet.save_checkpoint(path, calibrated_model("sdnet18_all", 4, False, seed=seed))
        os.utime(path, ns=(mtime_ns, mtime_ns))
        return state.load(path, cpu)
    def checkpoint_settings(loaded: state.Loaded) -> dict:
        ctx = panels.Context(loaded=loaded, baseline=None, clean=np.zeros((3, 32, 32), np.float32),
                             image=np.zeros((3, 32, 32), np.float32), image_info=dict(source="sample:cat_2"),
                             corruption=dict(kind="none"), device="CPU")
        return panels.settings_of(ctx, None, None, None, None, {}, None, None)["checkpoint"]
    old = save(0, 10**18)
    before = checkpoint_settings(old)  # its hash, cached
    assert before == dict(path="checkpoints/sdnet18_all-w4.pt", sha256=state.file_sha256(path), model=old.title)
    size = path.stat().st_size
    new = save(1, 10**18 + 10**9)
    assert path.stat().st_size == size  # only the modification time tells the two files apart
    assert new.key != old.key and not torch.equal(new.model.conv1.weight, old.model.conv1.weight)
    assert checkpoint_settings(new)["sha256"] == state.file_sha256(path) != before["sha256"]


def test_settings_json_says_what_the_view_was_made_from(tmp_path, calibrated_model):
    """settings.json is what a reader (and reproduce.py) has of the view: the noisy model input's hash beside the
    clean image's, the λ per layer as trained, the baseline compared with, and a checkpoint outside the checkout by
    its absolute path."""
    from app import panels, state
    path = tmp_path / "elsewhere.pt"
    sdnet.save_checkpoint(path, calibrated_model("sdnet18_all", 4, False))
    loaded = state.load(path, torch.device("cpu"))
    baseline = state.Loaded(model=None, meta={}, card=None, path=tmp_path / "resnet18-w4.pt", key="")
    clean = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    image = sdnet.corruptions.corrupt(torch.from_numpy(clean), "gaussian", 3, seed=0).numpy()
    ctx = panels.Context(loaded=loaded, baseline=baseline, clean=clean, image=image,
                         image_info=dict(source="sample:cat_2"),
                         corruption=dict(kind="gaussian", severity=3, seed=0, level=0.08), device="CPU")
    names = loaded.layer_names
    spec = state.lam_spec(names, 0.2, {names[0]: 0.5})
    s = panels.settings_of(ctx, dict(all=0.2, per_layer={names[0]: 0.5}), spec, 2, names[0], {}, None, None)
    assert s["checkpoint"] == dict(path=str(path.resolve()), sha256=state.file_sha256(path), model=loaded.title)
    assert s["image"]["sha256"] == images.image_hash(clean) != s["image"]["model_input_sha256"]
    assert s["image"]["model_input_sha256"] == images.image_hash(image)
    assert s["lam"]["trained"] == {n: pytest.approx(0.1) for n in names} and len(s["lam"]["trained"]) == len(names)
    assert s["lam"]["override"] == [[n, 0.5 if n == names[0] else 0.2] for n in sorted(names)]
    assert s["baseline"] == "resnet18-w4.pt"


def test_the_app_turns_tf32_off_on_cuda(monkeypatch):
    """TF32 convolutions differ from a CPU run by ~1e-3: on CUDA the app's codes and exports would not match
    reproduce.py's CPU run. The flags are process-wide, so they are checked where the app sets them."""
    from app import state
    monkeypatch.setattr(sdnet, "default_device", lambda: torch.device("cuda"))
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # conftest puts them back
    assert state.pick_device().type == "cuda"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_what_a_layer_sees_is_its_own_code_at_the_set_lambda_decoded(small_sdnet):
    """The Atoms tab's 'what each layer sees' (and its export): the layer's code at the slider's λ pushed back to
    pixels, contrast stretched without BatchNorm's offsets, clipped to [0, 1] with them."""
    from app import state
    x = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32)
    key = "test_what_a_layer_sees"
    probe = state.run_probe(small_sdnet, x, 0.05, 2)
    for layer in ("layer1.0.conv2", "layer3.0.conv1"):
        z = torch.from_numpy(next(r["z"] for r in probe["layers"] if r["name"] == layer))[None]
        seen = {}
        for offsets in (False, True):
            seen[offsets] = state.layer_sees(small_sdnet, key, x, 0.05, 2, layer, offsets)
            img = sdnet.decode_to_input(small_sdnet, layer, z, bias=offsets)[0].numpy()
            expected = np.clip(img, 0, 1) if offsets else images.stretch(img)
            np.testing.assert_allclose(seen[offsets], expected, atol=1e-6, err_msg=f"{layer} offsets={offsets}")
        assert not np.allclose(seen[False], seen[True]), layer
        assert not np.allclose(seen[False], state.layer_sees(small_sdnet, key, x, None, 2, layer, False)), layer


def test_pixel_atoms_are_unit_codes_at_the_centre(small_sdnet):
    """The deeper atoms in pixel space are unit codes at the centre of the code map: in the first layer, each atom
    is its weights (times the input's std, the normalisation undone without its mean) around the centre pixel,
    whole, where a code at the edge would cut it off."""
    from app import state
    w, std = small_sdnet.conv1.weight.detach(), small_sdnet.normalize.std
    pix = state.pixel_atoms(small_sdnet, "test_pixel_atoms", "conv1", (w.shape[0], 32, 32))
    expected = np.zeros_like(pix)
    expected[:, :, 15:18, 15:18] = (w * std.view(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(pix, expected, atol=1e-6)


def test_the_lam_path_runs_over_the_slider_values_and_the_trained_lambda_never_0(small_sdnet):
    """The λ path's grid is the slider's: LAM_GRID, the trained λ (0.13 is no grid value) and Auto λ's; never 0,
    which has no place on its log axis (a model trained at λ 0, an Auto λ of 0)."""
    from app import state
    model = copy.deepcopy(small_sdnet)
    layers = sdnet.csc_layers(model)
    for i, (_, layer) in enumerate(layers):
        layer.lam = 0.0 if i == 0 else 0.13
    x = np.random.default_rng(2).random((3, 32, 32)).astype(np.float32)
    path = state.lam_path(model, "test_the_lam_path_grid", x, (), 2, (0.0, 0.161))
    assert list(path["lams"]) == sorted(set(state.LAM_GRID) | {0.13, 0.161})
    assert 0.13 in state.lam_options({n: layer.lam for n, layer in layers})  # the slider offers it too


def test_lam_path_csv_columns_say_what_they_hold():
    """lam_path.csv, read away from the page: every column named for what it holds, the mean over the layers in
    its own column, a blank where a layer's residual is undefined, the held λ last."""
    from app import state
    path = dict(lams=np.array([0.1, 1.0]), layer_names=["conv1", "l2"], swept=["l2"], held={"conv1": 0.5},
                probs=np.array([[0.7, 0.3], [0.2, 0.8]]), rel_residual=np.array([[0.1, 0.2], [0.3, np.nan]]),
                sparsity=np.array([[0.5, 0.6], [0.7, 1.0]]), mean_rel_residual=np.array([0.15, 0.3]))
    assert state.lam_path_csv(path, ["cat", "dog"]).decode() == (
        "lam,prediction,p_cat,p_dog,mean_rel_residual,rel_residual_conv1,rel_residual_l2,sparsity_conv1,sparsity_l2,"
        "lam_conv1\n"
        "0.1,cat,0.7,0.3,0.15,0.1,0.2,0.5,0.6,0.5\n"
        "1,dog,0.2,0.8,0.3,0.3,,0.7,1,0.5\n")
    # a class name with a comma or a quote (they come from the checkpoint) stays one cell
    text = state.lam_path_csv(path, ['big, red', 'say "hi"']).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][2:4] == ["p_big, red", 'p_say "hi"'] and rows[1][1] == "big, red" and {len(r) for r in rows} == {10}


def test_path_segments_are_runs_of_one_class_with_their_first_and_last_lambda():
    """The λ path headline names each run of a class from its first to its last λ: a class that comes back is a
    new run."""
    from app import state
    runs = state.path_segments(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.array([1, 1, 2, 1, 1]))
    assert runs == [(1, 0.1, 0.2), (2, 0.3, 0.3), (1, 0.4, 0.5)]


def test_the_image_is_cut_off_only_where_a_code_is_all_zero():
    """A code with 99.5% zeros still carries the image: the cut-off starts where one is entirely zero (sparsity 1),
    and only where it holds to the largest λ."""
    from types import SimpleNamespace

    from app import panels
    ctx = SimpleNamespace(loaded=SimpleNamespace(layer_names=["conv1", "l2"], meta={"config": {"shortcut": False}}))
    path = dict(layer_names=["conv1", "l2"], lams=np.array([0.1, 1.0, 10.0]),
                sparsity=np.array([[0.5, 0.5], [0.5, 0.995], [0.5, 1.0]]))
    assert panels._cut_off_from(ctx, path) == 10.0
    assert panels._cut_off_from(ctx, dict(path, sparsity=np.array([[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]))) == 0.1
    assert panels._cut_off_from(ctx, dict(path, sparsity=np.array([[0.5, 1.0], [0.5, 1.0], [0.5, 0.9]]))) is None


def test_what_each_layer_sees_opens_on_layers_spread_over_the_depth():
    """The Atoms tab (and the export) opens on five layers from the first to the last, evenly apart, not on the
    five shallowest; a model with fewer layers gets them all."""
    from app import panels
    names = [f"l{i}" for i in range(17)]
    assert panels._spread(names, 5) == ["l0", "l4", "l8", "l12", "l16"]
    assert panels._spread(names[:3], 5) == names[:3]


def test_reconstructions_are_shown_in_pixels(small_sdnet):
    """The first layer's input x and A(z) live in the network's normalised space: the page and the exported
    reconstruction show them with the model's mean and std undone, clipped to displayable [0, 1]."""
    from app import panels, state
    loaded = state.Loaded(model=small_sdnet, meta={"config": {}}, card=None, path=Path("m.pt"), key="")
    show = panels.unnormalizer(loaded)
    x = np.random.default_rng(3).random((3, 4, 4)).astype(np.float32)
    normalised = small_sdnet.normalize(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(show(normalised), x.transpose(1, 2, 0), atol=1e-6)
    assert show(normalised + 100).max() == 1 and show(normalised - 100).min() == 0


def test_lambda_texts_count_only_the_layers_whose_lambda_differs():
    """A per-layer λ set to the slider's own value is no λ of its own (a legend read 'λ=0.1 (conv1 0.1)'), and
    'its own' is for one more layer, 'their own' for more."""
    from app import state
    assert state.setting_text(0.1, {"conv1": 0.1}, 2) == "λ=0.1, 2 steps"
    assert state.setting_text(0.1, {"conv1": 0.1, "l2": 0.5}, 2) == "λ=0.1 (l2 0.5), 2 steps"
    assert state.setting_text(0.1, {"conv1": 0.5, "l2": 0.2, "l3": 0.3}, 2, "conv1") == (
        "λ=0.5 in conv1 (others 0.1, 2 more with their own), 2 steps")


def _hand_view(layer: str = "conv1", top: list[int] | None = None):
    """A View as build_view makes one, by hand: two CSC layers (the second one's code all zero), two input
    attributions, atom scores."""
    from app import state
    rng = np.random.default_rng(0)

    def record(name: str, channels: int, lam: float, zero: bool = False) -> dict:
        x = rng.random((3 if name == "conv1" else 8, 8, 8)).astype(np.float32)
        z = np.zeros((channels, 8, 8), np.float32) if zero else rng.random((channels, 8, 8)).astype(np.float32)
        return dict(name=name, x=x, z=z, recon=0.9 * x, residual=0.1 * x, rel_residual=0.01 * channels,
                    sparsity=1.0 if zero else 0.25, lam=lam, input_zero=False)
    probe = dict(logits=np.arange(10, dtype=np.float32), probs=np.full(10, 0.1, np.float32),
                 layers=[record("conv1", 8, 0.5), record("layer1.0.conv1", 6, 0.2, zero=True)], mean_rel_residual=0.07)
    settings = dict(checkpoint=dict(model="m"), image=dict(source="sample:cat_2"),
                    corruption=dict(kind="none", severity=None, seed=None),
                    lam=dict(all=0.2, per_layer={"conv1": 0.5}), n_steps=2,
                    attribution=dict(methods=["saliency", "integrated_gradients"], atom_method="grad_x_activation",
                                     target=3))
    image = rng.random((3, 8, 8)).astype(np.float32)
    return state.View(settings=settings, classes=[f"class{i}" for i in range(10)], clean=image, image=image,
                      probe=probe, trained=dict(probe, logits=-np.arange(10, dtype=np.float32)), layer=layer,
                      top_channels=[5, 2, 7] if top is None else top, atom_tiles=rng.random((8, 3, 3, 3)),
                      atom_order=[3, 1, 0, 2, 4, 5, 6, 7], sees=rng.random((3, 8, 8)),
                      attributions={"saliency": rng.random((3, 8, 8)),
                                    "integrated_gradients": rng.standard_normal((3, 8, 8))},
                      atom_scores=rng.standard_normal(8))


def test_each_exported_figure_shows_what_its_name_says(monkeypatch):
    """Each PNG of the Export tab is made from its own data: each attribution method's picture its own method
    (made lazily, they all drew the last one), the code map the page's channels, and 'what a layer sees' says when
    the layer's code is all zero."""
    from app import state
    titles = []
    real = images.figure
    monkeypatch.setattr(images, "figure", lambda picture, title, *a, **k: titles.append(title) or real(picture, title,
                                                                                                     *a, **k))

    def title(view, name: str) -> str:
        titles.clear()
        state.export_png_makers(view, None)[name]()
        return titles[0]
    view = _hand_view()
    assert title(view, "attribution_saliency.png").startswith("Saliency of class class3 ")
    assert title(view, "attribution_integrated_gradients.png").startswith("Integrated Gradients of class class3 ")
    assert title(view, "codes_conv1.png") == "conv1's code z: its 3 most active of 8 channels, #channel (Σ|z|)"
    assert "sees nothing" not in title(view, "sees_conv1.png")
    assert "its code is all zero at this λ: it sees nothing" in title(_hand_view("layer1.0.conv1", [0, 1]),
                                                                     "sees_layer1_0_conv1.png")


def test_arrays_npz_holds_every_array_the_export_promises():
    """arrays.npz, the export's raw data: per layer x, z, A(z) and residual; per-layer λ, residual and sparsity in
    the network's order; the logits at the trained λ beside the current ones; the atom scores and the atom order
    of atoms_first_layer.png."""
    from app import state
    view = _hand_view()
    arrays = np.load(io.BytesIO(state.export_arrays(view)))
    layers = view.probe["layers"]
    assert set(arrays.files) == {"clean", "input", "logits", "probs", "logits_trained_lam", "layer_names",
                                 "rel_residual", "sparsity", "lam", "attribution.saliency",
                                 "attribution.integrated_gradients", "atom_attribution", "atoms_first_layer_order",
                                 *(f"{r['name']}.{k}" for r in layers for k in ("x", "z", "recon", "residual"))}
    assert np.array_equal(arrays["logits_trained_lam"], view.trained["logits"])
    assert np.array_equal(arrays["logits"], view.probe["logits"])
    assert list(arrays["layer_names"]) == ["conv1", "layer1.0.conv1"]
    assert list(arrays["lam"]) == [0.5, 0.2] and list(arrays["sparsity"]) == [0.25, 1.0]
    assert list(arrays["rel_residual"]) == pytest.approx([0.08, 0.06])
    for r in layers:
        for k in ("x", "z", "recon", "residual"):
            assert np.array_equal(arrays[f"{r['name']}.{k}"], r[k]), (r["name"], k)
    assert np.array_equal(arrays["atom_attribution"], view.atom_scores)
    assert list(arrays["atoms_first_layer_order"]) == view.atom_order


def test_settings_json_indents_nested_settings_and_keeps_flat_ones_on_a_line():
    """settings.json is read by people too: one line made it unreadable, indenting every list made 17 layers' λ a
    page long (see test_export_zip_reproduces_the_view)."""
    from app import state
    settings = {"checkpoint": {"path": "m.pt"}, "lam": {"all": 0.1, "per_layer": {"conv1": 0.5},
                                                         "override": [["conv1", 0.5], ["l2", 0.1]]},
                "image": {"source": "upload:λ.png", "original_size": [640, 480], "notes": []}, "layer": None}
    assert state.settings_json(settings) == (
        '{\n'
        '  "checkpoint": {"path": "m.pt"},\n'
        '  "lam": {\n'
        '    "all": 0.1,\n'
        '    "per_layer": {"conv1": 0.5},\n'
        '    "override": [["conv1", 0.5], ["l2", 0.1]]\n'
        '  },\n'
        '  "image": {"source": "upload:λ.png", "original_size": [640, 480], "notes": []},\n'
        '  "layer": null\n'
        '}\n')


# --- the app, through streamlit's AppTest ------------------------------------------------------

@pytest.fixture
def app(checkpoint_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(checkpoint_dir))

    def start(**state):
        at = AppTest.from_file(APP, default_timeout=180)
        for k, v in state.items():
            at.session_state[k] = v
        return at.run()
    return start


def ok(at) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def image_captions(at) -> list[str]:
    """Every picture's caption on the page (st.image's, which AppTest lists under no name of its own)."""
    def walk(node):
        for child in getattr(node, "children", {}).values():
            yield child
            yield from walk(child)
    return [im.caption.replace("\u200b", "") for e in walk(at.main) if type(e).__name__ == "Image"
            for im in e.proto.imgs]


def residual_column(at) -> list[float]:
    """The table's relative residuals; NaN for an 'undefined' cell (a layer fed all zeros)."""
    df = at.dataframe[0].value
    return [float(v) if v != "undefined" else np.nan for v in df["relative residual"]]


def test_page_renders_and_lambda_changes_residuals(app):
    at = app()
    ok(at)
    assert at.title[0].value == "SDNet Explorer"
    page = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "CPU" in page or "CUDA" in page
    assert at.selectbox(key="ckpt").value.startswith("sdnet18_all")
    for tab, marker in (("Atoms", "First-layer atoms"), ("Attribution", "Compute attribution"),
                        ("Export", "settings.json"), ("λ path", None), ("Layers", None)):
        at.session_state["tab"] = tab
        at.run()
        ok(at)
        if marker:  # only the open tab is drawn
            text = " ".join(e.value for e in at.subheader) + " ".join(b.label for b in at.button) + \
                " ".join(x.label for x in at.expander)
            assert marker in text, (tab, text)
    before = residual_column(at)
    assert len(before) == 17 and all(0 <= r <= 1.5 for r in before)
    assert at.select_slider(key="lam").value == pytest.approx(0.1)
    at.select_slider(key="lam").set_value(1.0).run()
    ok(at)
    after = residual_column(at)
    assert after != before
    view = at.session_state["view"]
    assert all(r["lam"] == 1.0 for r in view.probe["layers"]) and view.settings["lam"]["all"] == 1.0
    assert all(r["lam"] == pytest.approx(0.1) for r in view.trained["layers"])  # the trained λ beside it
    # per-layer override and FISTA steps
    at.multiselect(key="lam_layers").set_value(["conv1"]).run()
    at.select_slider(key="lam_layer:conv1").set_value(0.01).run()
    at.slider(key="n_steps").set_value(5).run()
    ok(at)
    layers = at.session_state["view"].probe["layers"]
    assert layers[0]["lam"] == 0.01 and all(r["lam"] == 1.0 for r in layers[1:])
    assert at.session_state["view"].settings["n_steps"] == 5
    # taken off, then added back: at λ for all layers, as on its first add (it came back at its old 0.01, unseen)
    at.multiselect(key="lam_layers").set_value([]).run()
    at.multiselect(key="lam_layers").set_value(["conv1"]).run()
    assert at.select_slider(key="lam_layer:conv1").value == 1.0
    assert all(r["lam"] == 1.0 for r in at.session_state["view"].probe["layers"])
    at.select_slider(key="lam_layer:conv1").set_value(0.01).run()
    every = at.session_state["view"].probe["logits"]
    # the toggle has no tooltip of its own (Streamlit cut its label then): the slider's explains it, by its label
    assert f"'{at.toggle(key='steps_first').label}'" in at.slider(key="n_steps").help
    at.toggle(key="steps_first").set_value(True).run()  # FISTA steps in the image's layer only, as robust fista does
    ok(at)
    view = at.session_state["view"]
    assert view.settings["n_steps"] == {"conv1": 5} and not np.array_equal(view.probe["logits"], every)
    from app import state
    model = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu")).model
    with torch.no_grad(), sdnet.override(lam=dict(view.settings["lam"]["override"]), n_steps={"conv1": 5}):
        assert np.allclose(model(torch.from_numpy(view.clean)[None])[0].numpy(), view.probe["logits"], atol=1e-5)
    assert any("5 steps in conv1" in str(c.proto.spec) for c in at.get("plotly_chart"))  # the legend says so
    # ...as do the controls (only the all-layers count had a note, yet 10 steps in conv1 turned the sample cat into a
    # 99% truck) and the chosen layer's caption, for conv1 and for a layer at the trained count
    assert any(c.value.startswith("In conv1 only; the others keep the trained 2.") for c in at.caption)
    assert any(c.value.startswith("conv1: ") and ", 5 FISTA steps, " in c.value for c in at.caption)
    at.selectbox(key="layer").set_value("layer1.0.conv1").run()
    assert any(c.value.startswith("layer1.0.conv1: ") and ", 2 FISTA steps, " in c.value for c in at.caption)
    at.selectbox(key="layer").set_value("conv1").run()
    at.toggle(key="steps_first").set_value(False).run()
    assert not any("only; the others keep" in c.value for c in at.caption)
    assert any(c.value.startswith("conv1: ") and ", 5 FISTA steps, " in c.value for c in at.caption)
    # a run that stops before the controls (no upload yet) does not reset them
    at.radio(key="source").set_value("Upload").run()
    at.radio(key="source").set_value("Sample").run()
    ok(at)
    assert at.select_slider(key="lam").value == 1.0 and at.slider(key="n_steps").value == 5
    assert at.session_state["view"].probe["layers"][0]["lam"] == 0.01


def test_the_layers_table_gives_each_layers_lasso_objective_which_more_fista_steps_lower(app):
    at = app()
    ok(at)

    def objectives() -> list[float]:
        return [float(v) for v in at.dataframe[0].value["Lasso objective"]]
    trained = objectives()
    for r, shown in zip(at.session_state["view"].probe["layers"], trained, strict=True):  # from the record's x, z, A(z)
        want = r["lam"] * np.abs(r["z"]).sum() + 0.5 * ((r["x"] - r["recon"]) ** 2).sum()
        assert shown == pytest.approx(want, rel=1e-4, abs=1e-6), r["name"]
    assert "FISTA" in at.dataframe[0].proto.columns  # the header's tooltip says what it is
    at.toggle(key="steps_first").set_value(True).run()
    at.slider(key="n_steps").set_value(10).run()
    ok(at)
    assert objectives()[0] < 0.5 * trained[0]  # conv1, whose input is the same image
    # the 'trained' series run at the trained FISTA steps too, and say so ('trained λ=0.1' beside 'λ=0.1, 10 steps in
    # conv1' read as one setting with two results)
    assert any("- SDNet as trained (λ=0.1, 2 steps): **" in m.value for m in at.markdown)
    # (the traces' names from the charts' JSON: plotly escapes 'λ' there unless orjson is installed)
    names = [t.get("name", "").replace("<br>", " ") for c in at.get("plotly_chart")
             for t in json.loads(c.proto.spec)["data"]]
    assert sum("as trained (λ=0.1, 2 steps)" in n for n in names) == 3, names  # predictions, residual, sparsity


def test_per_layer_lambdas_are_listed_in_the_networks_order(app):
    at = app()
    at.multiselect(key="lam_layers").set_value(["layer4.1.conv2", "conv1", "layer2.0.conv1"]).run()
    ok(at)
    assert at.multiselect(key="lam_layers").value == ["conv1", "layer2.0.conv1", "layer4.1.conv2"]
    assert [s.label for s in at.select_slider if s.key.startswith("lam_layer:")] == [
        "λ for conv1", "λ for layer2.0.conv1", "λ for layer4.1.conv2"]


def test_charts_have_the_short_toolbar_and_tile_charts_their_fitted_height(app):
    """On the page: every chart's toolbar drops the zoom buttons, and each tile chart gets the CSS that makes its
    height follow its width (see test_tile_charts_are_as_tall_as_their_tiles_at_the_width_they_get)."""
    import plotly.graph_objects as go

    from app import plots
    at = app(tab="Layers")
    ok(at)
    charts = {c.key: c for c in at.get("plotly_chart")}
    assert {"pred_chart", "residual_chart", "maps_chart", "codes_chart"} <= charts.keys()
    assert all({"zoom2d", "pan2d", "autoScale2d"} <= set(json.loads(c.proto.config)["modeBarButtonsToRemove"])
               for c in charts.values())
    styles = " ".join(h.proto.body for h in at.get("html"))
    tiles = {key for key, c in charts.items() if json.loads(c.proto.spec)["layout"].get("meta")}
    assert tiles == {"maps_chart", "codes_chart"}
    for key in tiles:
        fig = go.Figure(json.loads(charts[key].proto.spec))
        assert f".st-key-{key}_box {{container-type: inline-size}}" in styles
        css = plots.fitted_css(fig)
        assert f".st-key-{key} {{height: {css['fitted_height']}; width: {css['fitted_width']}}}" in styles
        assert f'.st-key-{key} .modebar-btn[data-title="Fullscreen"] {{display: none}}' in styles
        assert f".st-key-{key} .textpoint text {{font-size: {css['title_size']} !important" in styles
        if "title_switch" in css:  # titles in two lengths: the long ones from the container's width where they fit
            switch = css["title_switch"]
            trace = f".st-key-{key} .scatterlayer .trace:nth-last-child"
            assert f"@container (width >= {switch}px) {{{trace}(2) {{display: none" in styles
            assert f"@container (width < {switch}px) {{{trace}(1) {{display: none" in styles
        camera = json.loads(charts[key].proto.config)["toImageButtonOptions"]  # the size its titles were made for
        assert (camera["width"], camera["height"]) == (css["png_width"], css["png_height"])


def test_layers_fed_all_zeros_are_left_out_of_the_mean_residual(app):
    """At the largest λ deep layers get an all-zero input: their residual is undefined (said in the table),
    and the headline mean is over the other layers, not pulled towards 0 by them."""
    from app import state
    at = app()
    ok(at)
    at.select_slider(key="lam").set_value(max(state.LAM_GRID)).run()
    ok(at)
    probe = at.session_state["view"].probe
    dead = [r for r in probe["layers"] if r["input_zero"]]
    alive = [r["rel_residual"] for r in probe["layers"] if not r["input_zero"]]
    assert dead and alive
    assert probe["mean_rel_residual"] == pytest.approx(sum(alive) / len(alive))
    column = residual_column(at)
    assert sum(pd.isna(v) for v in column) == len(dead)
    # text (a NaN cell read "None" in the browser), right-aligned as the numbers beside it
    assert json.loads(at.dataframe[0].proto.columns)["relative residual"]["alignment"] == "right"
    headline = " ".join(m.value for m in at.markdown if "Mean relative residual" in m.value)
    assert f"{probe['mean_rel_residual']:.4f}" in headline and f"{len(dead)} layer(s) fed all zeros left out" in headline


@pytest.mark.parametrize("kind", sdnet.corruptions.KINDS)
def test_each_corruption(app, kind):
    at = app(noise=kind)
    ok(at)
    view = at.session_state["view"]
    assert not np.array_equal(view.image, view.clean)
    assert view.settings["corruption"] == dict(kind=kind, severity=3, seed=0,
                                               level=sdnet.corruptions.level(kind, 3))
    expected = sdnet.corruptions.corrupt(torch.from_numpy(view.clean), kind, 3, seed=0).numpy()
    assert np.array_equal(view.image, expected)
    if kind == "gaussian":  # a continuous level, and a new seed, give another picture
        at.radio(key="noise_mode").set_value("Continuous level").run()
        at.number_input(key="seed").set_value(7).run()
        ok(at)
        other = at.session_state["view"]
        assert other.settings["corruption"]["seed"] == 7 and not np.array_equal(other.image, view.image)
        # a level is not written as a severity (shot's 'severity 5.0' was c = 5, its severity 5 is c = 50)
        assert other.settings["corruption"] == dict(kind=kind, severity=None, seed=7, level=0.08)


def test_switching_the_noise_strength_keeps_it_as_strong(app):
    """Impulse at severity 5 switched to a continuous level became the slider's default 0.03 (severity 3), and the
    prediction changed; now the level is the severity's, and back the nearest severity."""
    at = app(noise="impulse")
    at.slider(key="severity").set_value(5).run()
    before = at.session_state["view"]
    at.radio(key="noise_mode").set_value("Continuous level").run()
    ok(at)
    after = at.session_state["view"]
    assert at.slider(key="level_impulse").value == pytest.approx(0.07) and np.array_equal(after.image, before.image)
    at.slider(key="level_impulse").set_value(0.045).run()
    at.radio(key="noise_mode").set_value("Severity 1-5").run()
    ok(at)
    assert at.slider(key="severity").value == 4  # 0.05 is nearer 0.045 than 0.03, on a log scale


def test_attribution_maps_come_two_a_row(app):
    """All three methods side by side left each picture 51 px wide in an 800 px window (its colour bar's margin
    taking the rest of a third of the column): two a row."""
    at = app(attr_methods=["integrated_gradients", "saliency", "occlusion"], attr_atom_method="grad_x_activation",
             tab="Attribution")
    at.button(key="attr_run").click().run()
    ok(at)

    def rows(node):  # the blocks of columns, each as the keys of the blocks in its columns
        children = list(getattr(node, "children", {}).values())
        if children and all(type(c).__name__ == "Column" for c in children):
            yield [[getattr(b, "key", None) for b in col.children.values()] for col in children]
        for child in children:
            yield from rows(child)
    maps = [[keys for keys in row if any(str(k).startswith("attr_") and str(k).endswith("_box") for k in keys)]
            for row in rows(at.main)]
    maps = [row for row in maps if row]
    assert [len(row) for row in maps] == [2, 1] and maps[1] == [["attr_occlusion_box"]], maps
    # the atoms' bars come in order of |score|, signs mixed: the caption says so (it read 'strongest first' only)
    assert any("strongest first by |score| (a negative one counts against the class)" in c.value for c in at.caption)


def test_attribution_that_is_all_zero_says_why(app):
    """At the largest λ the first layer's code is empty: every attribution is exactly 0, and the page says so
    instead of showing blank maps with a colour bar from -1p to 1p."""
    from app import state
    at = app(attr_methods=["saliency"], attr_atom_method="grad_x_activation", tab="Attribution")
    at.select_slider(key="lam").set_value(max(state.LAM_GRID)).run()
    at.button(key="attr_run").click().run()
    ok(at)
    assert not np.any(at.session_state["view"].attributions["saliency"])
    assert any("Every attribution is exactly zero: conv1's code was all zeros at λ = 10" in i.value
               and "compute it again at the trained settings (λ=0.1, 2 steps)" in i.value for i in at.info)
    assert not any(c.key and c.key.startswith("attr_") for c in at.get("plotly_chart"))  # no blank maps
    assert not any("settings changed since" in w.value for w in at.warning)  # fresh: no stale warning
    view = at.session_state["view"]
    assert "attribution_atoms.png" not in state.export_png_makers(view, None)  # nor a picture of empty bars
    assert "attribution_saliency.png" not in state.export_png_makers(view, None)  # nor an empty overlay (0 / 0 / -0)
    at.select_slider(key="lam").set_value(0.1).run()  # not recomputed: the message names the old λ, no advice
    assert any("at λ = 10" in i.value and "compute it again" not in i.value for i in at.info)
    assert any("settings changed since this attribution was computed" in w.value for w in at.warning)
    at.button(key="attr_run").click().run()
    ok(at)
    assert not any("Every attribution is exactly zero" in i.value for i in at.info)
    assert any(c.key and c.key.startswith("attr_") for c in at.get("plotly_chart"))  # the maps are back
    assert {"attribution_atoms.png", "attribution_saliency.png"} <= set(state.export_png_makers(
        at.session_state["view"], None))


def test_lam_path_tab_follows_the_slider_and_keeps_per_layer_lambdas(app):
    from app import state
    at = app(tab="λ path")
    ok(at)
    charts = {c.key: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    # each chart saves itself as a PNG named by its key (not plotly's "newplot"), at twice the screen's pixels
    saved = {c.key: json.loads(c.proto.config)["toImageButtonOptions"] for c in at.get("plotly_chart")}
    assert saved["path_probs_chart"] == {"format": "png", "scale": 2, "filename": "path_probs"}
    assert {"path_probs_chart", "path_residual_chart", "path_sparsity_chart"} <= charts.keys()
    # one tick a decade on all three (plotly labelled 2 and 5 between decades on the wide one only)
    assert all(charts[k]["layout"]["xaxis"]["dtick"] == 1 for k in ("path_probs_chart", "path_residual_chart",
                                                                    "path_sparsity_chart"))
    page = " ".join(m.value for m in at.markdown)
    assert "Prediction along λ:" in page
    view = at.session_state["view"]
    csv = view.lam_path_csv().decode().splitlines()
    header, rows = csv[0].split(","), [r.split(",") for r in csv[1:]]
    lams = [float(r[0]) for r in rows]
    assert lams == sorted(lams) and set(state.LAM_GRID) <= set(lams) and 0.1 in lams
    assert header[:2] == ["lam", "prediction"] and len(header) == 2 + 10 + 1 + 2 * 17
    # the row at the slider's λ is what the page shows at that λ
    at_trained = rows[lams.index(0.1)]
    probs = [float(v) for v in at_trained[2:12]]
    assert probs == pytest.approx(view.probe["probs"].tolist(), abs=1e-5)
    residuals = [float(v) for v in at_trained[13:13 + 17]]  # and every layer's residual and sparsity, in order
    sparsity = [float(v) for v in at_trained[13 + 17:13 + 34]]
    assert residuals == pytest.approx([r["rel_residual"] for r in view.probe["layers"]], abs=1e-5)
    assert sparsity == pytest.approx([r["sparsity"] for r in view.probe["layers"]], abs=1e-5)
    assert "nan" not in view.lam_path_csv().decode()  # a layer fed all zeros (at λ 10) has a blank, not nan
    assert any(",," in r for r in view.lam_path_csv().decode().splitlines()[1:])
    # the export's name names the checkpoint and the image, and tells two settings of one image apart, but not the
    # device one view was computed on
    stem = state.export_stem(view.settings)
    ckpt = Path(view.settings["checkpoint"]["path"]).stem
    assert stem.startswith(f"{ckpt}-view-{view.settings['image']['sha256'][:8]}-") and stem != state.export_stem(
        {**view.settings, "lam": {**view.settings["lam"], "all": 0.5}})
    assert stem == state.export_stem({**view.settings, "device": "cuda" if view.settings["device"] == "cpu" else "cpu"})
    for path, name in (("/up loads/my model (2).pt", "my_model_2"), ("模型.pt", "model"), ("..pt", "model"),
                       ("-x.pt", "x"), ("a" * 300 + ".pt", "a" * 80)):
        stem = state.export_stem({**view.settings, "checkpoint": {**view.settings["checkpoint"], "path": path}})
        assert stem.startswith(f"{name}-view-"), (path, stem)
    assert at_trained[1] == view.classes[int(np.argmax(view.probe["probs"]))]
    # the segments of the text are the CSV's predictions
    assert all(r[1] in page for r in rows)
    # an Auto λ the slider offers (it adds its value to the slider) is on the path too
    at.session_state["lam_extra"] = [0.161]
    at.run()
    assert 0.161 in [float(r.split(",")[0]) for r in at.session_state["view"].lam_path_csv().decode().splitlines()[1:]]
    # a layer with its own λ keeps it along the path: its residual is the same in every row
    at.session_state["lam_layers"] = ["conv1"]
    at.session_state["lam_layer:conv1"] = 0.5
    at.run()
    ok(at)
    rows = [r.split(",") for r in at.session_state["view"].lam_path_csv().decode().splitlines()[1:]]
    first = header.index("rel_residual_conv1")
    assert len({r[first] for r in rows}) == 1 and len({r[first + 1] for r in rows}) > 1
    held_header = at.session_state["view"].lam_path_csv().decode().splitlines()[0].split(",")
    assert held_header == header + ["lam_conv1"] and all(r[-1] == "0.5" for r in rows)  # the held λ, in the file
    # ...and on the page, in the network's order, however many (three named, the rest counted)
    assert any("16 of 17 CSC layers (the others keep their own λ: conv1 0.5)" in c.value for c in at.caption)
    at.session_state["lam_layers"] = ["layer4.1.conv2", "conv1", "layer1.1.conv2", "layer2.0.conv1"]
    at.run()
    assert any("13 of 17 CSC layers (the others keep their own λ: conv1 0.5, layer1.1.conv2 0.1, layer2.0.conv1 0.1 "
               "and 1 more)" in c.value for c in at.caption), [c.value for c in at.caption]
    at.session_state["lam_layers"] = ["conv1"]
    at.run()
    # from the λ where a code goes all zero the headline says the image is cut off, not a class
    headline = next(m.value for m in at.markdown if m.value.startswith("Prediction along λ:"))
    assert "the image is cut off" in headline and "for any input" in headline  # λ 10 zeroes a code here
    # a held first layer at λ 10 cuts the whole path off; the prediction, the same for any input, still moves with
    # the other layers' λ: the headline lists those runs (it named the class at the largest λ only)
    at.session_state["lam_layer:conv1"] = 10.0
    at.run()
    ok(at)
    rows = [r.split(",") for r in at.session_state["view"].lam_path_csv().decode().splitlines()[1:]]
    headline = next(m.value for m in at.markdown if m.value.startswith("Prediction along λ:"))
    assert headline.startswith(f"Prediction along λ: from {float(rows[0][0]):g} the image is cut off, the same for")
    assert len({r[1] for r in rows}) > 1 and all(f"**{r[1]}**" in headline for r in rows)
    # a model trained at λ 0 (train --lam 0 is allowed), or the slider at 0: nothing marked at log10(0), no crash
    from app import plots
    fig = plots.lam_path_probs(np.array([0.001, 0.1]), np.full((2, 10), 0.1), view.classes, [0], 0.0, 0.0, None)
    assert not fig.layout.shapes and not fig.layout.annotations
    # each mark says what it is on the chart (a camera PNG has no caption): the current λ, the trained one where it
    # differs, and the band from the λ where a code goes all zero
    fig = plots.lam_path_probs(np.array([0.001, 10.0]), np.full((2, 10), 0.1), view.classes, [0], 1.0, 0.1, 5.0)
    assert [a.text for a in fig.layout.annotations] == ["λ=1", "trained λ=0.1", "a code all 0"]
    fig = plots.lam_path_probs(np.array([0.001, 10.0]), np.full((2, 10), 0.1), view.classes, [0], 0.1, 0.1, None)
    assert [a.text for a in fig.layout.annotations] == ["λ=0.1"]
    # every layer held: no path, said so
    at.session_state["lam_layers"] = list(at.session_state["view"].probe["layers"][i]["name"] for i in range(17))
    at.run()
    ok(at)
    assert any("no path to follow" in i.value for i in at.info)
    assert at.session_state["view"].lam_path_csv is None


def test_the_page_orders_atoms_and_code_channels_by_this_images_use(app):
    """The first-layer atoms (on the page and in atoms_first_layer.png) and the code maps come most used first:
    by Σ|z| of this image's code, ties by channel number."""
    from app import state
    at = app()
    ok(at)
    view = at.session_state["view"]
    model = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu")).model

    def ranked(z: np.ndarray) -> list[int]:
        return [int(c) for c in np.argsort(-images.channel_activity(z), kind="stable")]
    first = view.probe["layers"][0]
    assert view.atom_order == ranked(first["z"]) and view.atom_order != sorted(view.atom_order)
    assert np.array_equal(view.atom_tiles, images.atom_tiles(model.conv1.weight.detach())[view.atom_order])
    rec = state.layer_record(view.probe, view.layer)
    assert view.top_channels == ranked(rec["z"])[:at.session_state["n_codes"]]


def test_a_layer_with_fewer_code_channels_than_shown_shows_all_of_its_own(app):
    """The code channels slider set to a deep layer's 128 channels, then conv1 (16) picked: the count follows
    the layer, not past its channels."""
    at = app(tab="Layers")
    names = [r["name"] for r in at.session_state["view"].probe["layers"]]
    at.selectbox(key="layer").set_value(names[-1]).run()
    at.slider(key="n_codes").set_value(at.slider(key="n_codes").max).run()
    channels = at.session_state["view"].probe["layers"][0]["z"].shape[0]
    assert at.slider(key="n_codes").value > channels
    at.selectbox(key="layer").set_value(names[0]).run()
    ok(at)
    assert at.slider(key="n_codes").value == channels == len(at.session_state["view"].top_channels)


def test_what_a_layer_sees_follows_the_show_setting(app):
    """'Show' in the Atoms tab picks the code's own contribution (stretched: 0 to 1) or absolute pixels; the view,
    and so the export, follows it even with the tab closed."""
    from app import panels
    at = app()
    ok(at)
    view = at.session_state["view"]
    assert not view.sees_offsets and view.sees.min() == 0 and view.sees.max() == 1
    at.session_state["sees_mode"] = panels.SEES_MODES[1]
    at.run()
    ok(at)
    assert at.session_state["view"].sees_offsets


def test_the_exported_deeper_atoms_are_those_the_atoms_tab_shows(app, monkeypatch):
    """The Atoms tab's 'Atoms shown' count holds in the export too (atoms_<layer>.png), not the default 16."""
    from app import state
    at = app()
    at.session_state["n_atoms"] = 4
    at.run()
    ok(at)
    view = at.session_state["view"]
    deep = at.session_state["atoms_layer"]
    calls = []
    monkeypatch.setattr(state, "deep_atoms_png", lambda *args: calls.append(args) or b"")
    view.more_pngs[f"{state.file_stem('atoms', deep)}.png"]()
    z = state.layer_record(view.probe, deep)["z"]
    assert calls[0][4] == [int(c) for c in np.argsort(-images.channel_activity(z), kind="stable")[:4]]


def test_an_attribution_is_stale_when_any_of_its_settings_change(app):
    """An attribution is left out of the export, and said to be stale, once the FISTA steps, the methods, the atom
    method or the class explained differ from those it was computed with; back at them, it is current again."""
    at = app(attr_methods=["saliency"], attr_atom_method="grad_x_activation", tab="Attribution")
    view = at.session_state["view"]
    classes, predicted = view.classes, int(np.argmax(view.probe["probs"]))
    picked, other = (classes[(predicted + i) % len(classes)] for i in (1, 2))
    # "another class" explains the class picked, not the predicted one (which the FISTA steps may move)
    at.session_state["attr_which"], at.session_state["attr_class"] = "another class", picked
    at.button(key="attr_run").click().run()
    ok(at)
    assert at.session_state["view"].settings["attribution"]["target"] == classes.index(picked)
    stale = "The settings changed since this attribution was computed"
    for key, value in (("n_steps", at.slider(key="n_steps").value + 1), ("attr_methods", ["saliency", "occlusion"]),
                       ("attr_atom_method", "integrated_gradients"), ("attr_class", other)):
        back = at.session_state[key]
        at.session_state[key] = value
        at.run()
        ok(at)
        assert any(stale in w.value for w in at.warning), key
        assert at.session_state["view"].attributions == {}, key
        at.session_state[key] = back
        at.run()
        assert not any(stale in w.value for w in at.warning), key
        assert set(at.session_state["view"].attributions) == {"saliency"}, key


class ExportZip:
    """The export ZIP, read by the names of its files in its one folder (named as the ZIP is: `unzip` scattered
    them into the folder it ran in)."""

    def __init__(self, view):
        from app import panels, state
        loaded = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu"))
        self.zip = zipfile.ZipFile(io.BytesIO(state.export_zip(view, panels.unnormalizer(loaded))))
        self.top = state.export_stem(view.settings) + "/"
        assert all(name.startswith(self.top) for name in self.zip.namelist()), self.zip.namelist()

    def namelist(self) -> list[str]:
        return [name.removeprefix(self.top) for name in self.zip.namelist()]

    def read(self, name: str) -> bytes:
        return self.zip.read(self.top + name)

    def extractall(self, path: Path) -> Path:
        """Unpack into `path`; the folder the files are in."""
        self.zip.extractall(path)
        return path / self.top


def test_export_zip_reproduces_the_view(app, tmp_path):
    at = app(attr_methods=["saliency"], attr_atom_method="grad_x_activation", tab="Attribution")
    at.button(key="attr_run").click().run()
    ok(at)
    at.session_state["tab"] = "Export"
    at.run()
    ok(at)
    view = at.session_state["view"]
    assert set(view.attributions) == {"saliency"} and view.atom_scores is not None
    labels = [b.label for b in at.get("download_button")]
    assert "Download everything (ZIP)" in labels and "atoms_first_layer.png" in labels
    from app import state
    loaded = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu"))  # absolute stays so
    zf = ExportZip(view)
    names = set(zf.namelist())
    for expected in ("png/atoms_first_layer.png", "png/codes_conv1.png", "png/reconstruction_conv1.png",
                     "png/attribution_saliency.png", "png/attribution_atoms.png",
                     "png/input_clean.png", "png/sees_conv1.png", "arrays.npz", "settings.json", "lam_path.csv"):
        assert expected in names
    # the Atoms tab's pictures too, as its widgets stand though it is closed: what each chosen layer sees, and
    # the deeper atoms shown (only the Layers tab's layer and the first-layer atoms were exported)
    for layer in at.session_state["sees_layers"]:
        assert f"png/sees_{layer.replace('.', '_')}.png" in names
    assert f"png/atoms_{at.session_state['atoms_layer'].replace('.', '_')}.png" in names
    assert len(at.session_state["sees_layers"]) > 1
    for name in names:
        if name.endswith(".png"):
            Image.open(io.BytesIO(zf.read(name))).verify()
            pic = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
            if name.startswith("png/input_"):  # the images themselves, to use as inputs: no title
                assert pic.shape[:2] == (256, 256), name
            else:  # the figures have a title (dark text on white) above their picture
                assert (pic[:6] == 255).all() and (pic[6:24].min(-1) < 80).any(), name
    settings = json.loads(zf.read("settings.json"))
    assert {"checkpoint", "image", "corruption", "lam", "n_steps"} <= set(settings)
    # its 17 layers' λ a line each (per layer, the override and as trained), it was 90 lines, a page-long expander
    text = zf.read("settings.json").decode()
    assert text == state.settings_json(settings) and len(text.splitlines()) < 30, text
    assert json.loads(state.settings_json(view.settings)) == json.loads(json.dumps(view.settings))
    assert settings["image"]["sha256"] == images.image_hash(view.clean)
    arrays = np.load(io.BytesIO(zf.read("arrays.npz")))
    names17 = list(arrays["layer_names"])
    assert len(names17) == 17 and {f"{n}.{k}" for n in names17 for k in ("z", "recon", "residual")} <= set(arrays.files)
    # settings.json + arrays.npz reproduce the trace, with nothing else
    model, _ = sdnet.load_checkpoint(loaded.path)
    x = torch.from_numpy(arrays["clean"])
    assert settings["corruption"]["kind"] == "none"
    lam = settings["lam"]["override"]
    with sdnet.override(lam=dict(lam) if isinstance(lam, list) else lam, n_steps=settings["n_steps"]):
        t = sdnet.trace(model, x[None])
    assert np.allclose(t.layers[5].z[0].numpy(), arrays[f"{names17[5]}.z"], atol=1e-5)
    assert np.allclose(t.logits[0].numpy(), arrays["logits"], atol=1e-4)
    # and reproduce.py (the "Reproduce in Python" snippet) does it, run as a script where the ZIP was unpacked,
    # and says so: it printed nothing
    assert zf.read("reproduce.py").decode() == state.reproduce_snippet(settings)
    # each readable by all once unpacked (writestr's mode was 0600: only its owner could read them)
    assert {info.external_attr >> 16 for info in zf.zip.infolist()} == {0o644}
    unpacked = zf.extractall(tmp_path / "export")
    # the last layer's atoms reach the whole 32 px image: 4 of them are drawn at 3x, about as large as the page's
    # tiles (at 1x in 64 px cells they looked like stamps)
    last = view.probe["layers"][-1]
    png = state.deep_atoms_png(loaded.model, loaded.key, last["name"], tuple(last["z"].shape), [0, 1, 2, 3],
                               np.ones(last["z"].shape[0]), view.settings)
    if images.crop_to_support(state.pixel_atoms(loaded.model, loaded.key, last["name"],
                                                tuple(last["z"].shape))[:4]).shape[-1] == 32:
        assert Image.open(io.BytesIO(png)).width >= 4 * (96 + 8)
    assert_reproduces(unpacked, arrays, loaded.classes)


def assert_reproduces(folder: Path, arrays, classes: list[str], codes: bool = True) -> None:
    """reproduce.py, run as a script in an unpacked export, prints the export's prediction and differences from
    its arrays too small to matter (the logits', and the codes' unless `codes` is False: a model without CSC
    layers has none), and no doubt about the checkpoint."""
    # run from another folder: it reads the files beside it; `import sdnet` from this checkout, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, str(folder / "reproduce.py")], cwd=folder.parent, capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    best = int(np.argmax(arrays["probs"]))
    assert f"prediction: {classes[best]} {arrays['probs'][best]:.1%}" in out, out
    for what in ("logit", "code") if codes else ("logit",):
        gap = re.search(rf"largest {what} difference .*: (\S+)", out)
        assert gap and float(gap.group(1)) < 1e-4, out
    assert codes or "code difference" not in out, out
    assert "not the file the export was made with" not in out


def test_reproduce_py_redraws_the_noise_and_finds_a_checkpoint_in_the_checkout(app, tmp_path):
    at = app(noise="shot", seed=7, tab="Export")
    at.slider(key="severity").set_value(4).run()
    ok(at)
    from app import state
    view = at.session_state["view"]
    loaded = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu"))
    folder = ExportZip(view).extractall(tmp_path)
    arrays = np.load(folder / "arrays.npz")
    assert not np.allclose(arrays["input"], arrays["clean"])  # the script must draw the same noise
    assert_reproduces(folder, arrays, loaded.classes)
    # a checkpoint in the checkout (as the app's own are) is named relative to it, from the checkout's root
    shipped = ROOT / "checkpoints" / loaded.path.name
    if shipped.is_file():
        settings = dict(view.settings, checkpoint=dict(view.settings["checkpoint"],
                                                       path=f"checkpoints/{loaded.path.name}"))
        (folder / "settings.json").write_text(state.settings_json(settings))
        script = state.reproduce_snippet(settings)
        assert f"checkout = Path({str(ROOT)!r})" in script
        (folder / "reproduce.py").write_text(script)
        assert_reproduces(folder, arrays, loaded.classes)
    # and one that is not where it was says so, and where it looked
    (folder / "settings.json").write_text(state.settings_json(
        dict(view.settings, checkpoint=dict(view.settings["checkpoint"], path=str(tmp_path / "gone.pt")))))
    run = subprocess.run([sys.executable, "reproduce.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"No checkpoint at {tmp_path / 'gone.pt'}" in run.stderr, run.stderr
    # at a continuous level: settings.json has no severity (it read 'severity 55.0'), and the script draws the level
    at.radio(key="noise_mode").set_value("Continuous level").run()
    at.slider(key="level_shot").set_value(55.0).run()
    view = at.session_state["view"]
    assert view.settings["corruption"] == dict(kind="shot", severity=None, seed=7, level=55.0)
    level = ExportZip(view).extractall(tmp_path / "level")
    assert_reproduces(level, np.load(level / "arrays.npz"), loaded.classes)


def _resnet_name(checkpoint_dir: Path) -> str:
    """The ResNet among the test checkpoints (the shipped SDNet-All's baseline, or its stand-in)."""
    return sorted(p.name for p in checkpoint_dir.glob("resnet*.pt"))[0]


def test_the_address_is_read_with_each_bad_value_named_and_written_back_as_read():
    from app import state
    sidebar = dict(checkpoints=["a.pt"], samples=["cat_2", "dog_1"], tabs=["Layers", "Atoms"])
    layers = ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    values, left = state.read_address(dict(model="a.pt", image="dog_1", noise="shot", severity="5", seed="12",
                                           tab="Atoms", lam="0.5"), **sidebar)  # λ is the second reading's
    assert values == dict(ckpt="a.pt", source="Sample", sample="dog_1", noise="shot", noise_mode=state.STRENGTHS[0],
                          severity=5, seed=12.0, tab="Atoms") and left == []
    # per-layer λ, in the network's order whatever the address's ('lam.conv1=0.25': a link dropped them silently)
    view, left = state.read_address({"lam": "0.13", "steps": "7", "steps_first": "1", "layer": "conv1", "tab": "x",
                                     "lam.layer1.0.conv2": "2", "lam.conv1": "0.25"}, layers=layers)
    assert view == {"lam": 0.13, "n_steps": 7, "steps_first": True, "layer": "conv1", "lam_layer:layer1.0.conv2": 2.0,
                    "lam_layer:conv1": 0.25, "lam_layers": ["conv1", "layer1.0.conv2"]} and left == []
    back = state.address({**values, **view})
    assert back == {"model": "a.pt", "image": "dog_1", "noise": "shot", "severity": "5", "seed": "12", "lam": "0.13",
                    "lam.conv1": "0.25", "lam.layer1.0.conv2": "2", "steps": "7", "steps_first": "1", "tab": "Atoms",
                    "layer": "conv1"}
    assert state.read_address(back, **sidebar)[0] == values and state.read_address(back, layers=layers)[0] == view
    assert "steps_first" not in state.address(dict(steps_first=False, n_steps=2))  # off unless said
    # the Atoms tab's deeper layer and the layers 'seen', each once, in the network's order ('sees=': none)
    atoms = state.read_address(dict(atoms="layer1.0.conv2", sees="layer1.0.conv2,conv1,conv1"), layers=layers)
    assert atoms == (dict(atoms_layer="layer1.0.conv2", sees_layers=["conv1", "layer1.0.conv2"]), [])
    assert state.address(atoms[0]) == dict(atoms="layer1.0.conv2", sees="conv1,layer1.0.conv2")
    assert state.read_address(dict(sees=""), layers=layers)[0] == dict(sees_layers=[])
    # how many are shown: top-k within the classes, code channels and deeper atoms within the layers' channels
    counts = state.read_address(dict(topk="3", codes_shown="24", atoms_shown="64"), layers=layers, classes=10,
                                channels=64)
    assert counts == (dict(topk=3, n_codes=24, n_atoms=64), [])
    assert state.address(counts[0]) == dict(topk="3", codes_shown="24", atoms_shown="64")
    assert state.read_address(dict(topk="11", codes_shown="0", atoms_shown="65"), layers=layers, classes=10,
                              channels=64) == ({}, ["topk=11: not a whole number from 1 to 10",
                                                    "codes_shown=0: not a whole number from 1 to 64",
                                                    "atoms_shown=65: not a whole number from 1 to 64"])
    assert state.read_address(dict(atoms="conv1", sees="conv1,conv9,x"), layers=layers) == ({}, [
        "atoms=conv1: no deeper CSC layer of that name", "sees=conv1,conv9,x: no CSC layer named conv9, x"])
    # a continuous level, in its noise's range (a link opened c=0.105 at the slider's default 0.08)
    level = dict(noise="gaussian", noise_mode=state.STRENGTHS[1], level_gaussian=0.105, seed=3.0)
    assert state.address(level) == dict(noise="gaussian", level="0.105", seed="3")
    assert state.read_address(state.address(level), **sidebar)[0] == level
    assert state.read_address(dict(level="0.105"), **sidebar)[1] == ["level=0.105: no noise to set it for"]
    assert state.read_address(dict(noise="gaussian", severity="2", level="0.2"), **sidebar) == (  # (the level won, unsaid)
        dict(noise="gaussian", noise_mode=state.STRENGTHS[1], level_gaussian=0.2),
        ["severity=2: a level is given too, and used"])
    assert state.read_address(dict(noise="shot", level="2"), **sidebar)[1] == [
        "level=2: outside shot's levels 5 to 1000"]
    # λ as the shortest text that reads back the same ('{:g}' kept 6 digits: a trained 0.1234567891 came back changed)
    for lam in (0.1, 1.0, 0.13, 1e-3, 0.1234567891, 10.0):
        assert state.read_address(state.address(dict(lam=lam)), layers=["conv1"])[0]["lam"] == lam
    assert state.address(dict(lam=1.0, seed=7.0)) == dict(seed="7", lam="1")
    # every bad value is left out and named with why; the rest is used
    bad = dict(model="../etc/passwd", image="cat_9", noise="fog", severity="6", seed="1.5", tab="Export")
    values, left = state.read_address(bad, **sidebar)
    assert values == {} and left == ["model=../etc/passwd: no checkpoint in the folder of that name",
                                     "image=cat_9: no sample image of that name", "noise=fog: no noise of that name",
                                     "severity=6: not a whole number from 1 to 5",
                                     "seed=1.5: not a whole number from 0 to 2147483647",
                                     "tab=Export: no tab of that name"]
    for lam, why in (("abc", "not a number"), ("100", "outside the slider's 0.001 to 10"), ("nan", "outside"),
                     ("-1", "outside"), ("inf", "outside")):
        values, left = state.read_address({"lam": lam, "steps": "0", "layer": "x" * 300, "lam.nope": "0.1",
                                           "lam.conv1": lam}, layers=["conv1"], max_steps=20)
        assert values == {} and left[0].startswith(f"lam={lam}: {why}"), left
        assert left[1:] == ["steps=0: not a whole number from 1 to 20", f"layer={'x' * 40}: no CSC layer of that name",
                            "lam.nope=0.1: no CSC layer of that name",
                            f"lam.conv1={lam}: " + left[0].split(": ", 1)[1]]


def test_a_reload_or_a_link_keeps_the_view_and_says_what_it_could_not_use(app):
    """The page's address holds its settings (a reload lost the whole view): a link opens on them, moving λ rewrites
    it, and a value it cannot use is named on the page while the others are used."""
    from streamlit.testing.v1 import AppTest
    at = app()
    at.select_slider(key="lam").set_value(0.5).run()
    at.selectbox(key="noise").set_value("impulse").run()
    at.session_state["tab"] = "Atoms"
    at.run()
    ok(at)
    link = dict(at.query_params)
    assert {k: link[k] for k in ("image", "noise", "severity", "seed", "lam", "steps", "tab")} == dict(
        image="cat_2", noise="impulse", severity="3", seed="0", lam="0.5", steps="2", tab="Atoms")
    assert link["model"] == at.selectbox(key="ckpt").value and link["layer"] == "conv1"
    view = at.session_state["view"]
    again = AppTest.from_file(APP, default_timeout=180)  # a new session at that address
    again.query_params.update(link)
    again.run()
    ok(again)
    assert not again.warning or all("address" not in w.value for w in again.warning)
    same = again.session_state["view"]
    assert same.settings == view.settings and np.array_equal(same.probe["logits"], view.probe["logits"])
    assert again.session_state["tab"] == "Atoms"
    # a λ off the slider's grid is offered there; a bad value is named, the rest used
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(dict(link, lam="0.13", steps="zwei", layer="layer1.0.conv1"))
    again.run()
    assert not again.exception
    assert [w.value for w in again.warning if "address" in w.value] == [
        "Not used from the page's address (the page's own settings instead): steps=zwei: not a number."]
    assert again.select_slider(key="lam").value == 0.13 and again.slider(key="n_steps").value == 2
    assert again.session_state["view"].layer == "layer1.0.conv1"
    again.select_slider(key="lam").set_value(1.0).run()  # moved in the live part: the address follows
    assert again.query_params["lam"] == "1" and not any("address" in w.value for w in again.warning)
    # the browser's Back: an earlier address of this session is read again (Back seemed dead: the page kept its
    # settings and wrote them straight back), the noise that address did not have gone, and no reset toast
    at.session_state["seed"] = 1e10  # the seed written is the one used, not as typed
    at.run()
    assert at.query_params["seed"] == "2147483647"
    assert at.session_state["view"].settings["corruption"]["seed"] == 2 ** 31 - 1
    at.query_params.clear()
    at.query_params.update({k: v for k, v in link.items() if k not in ("noise", "severity", "seed")} | dict(lam="0.2"))
    at.run()
    ok(at)
    assert at.select_slider(key="lam").value == 0.2 and at.selectbox(key="noise").value == "none" and not at.toast
    assert at.query_params["lam"] == "0.2" and "noise" not in at.query_params
    at.select_slider(key="lam").set_value(0.3).run()  # ...and from then on the page's own moves are kept
    at.selectbox(key="noise").set_value("shot").run()
    assert at.select_slider(key="lam").value == 0.3 and at.query_params["noise"] == "shot"
    # per-layer λ and a continuous level are kept too (a link opened without them, silently: another prediction)
    assert not next(e for e in at.expander if e.label == "Per-layer λ").proto.expanded  # folded till it is used
    at.multiselect(key="lam_layers").set_value(["conv1"]).run()
    at.select_slider(key="lam_layer:conv1").set_value(0.25).run()
    at.radio(key="noise_mode").set_value("Continuous level").run()
    at.slider(key="level_shot").set_value(55.0).run()
    ok(at)
    link = dict(at.query_params)
    assert link["lam.conv1"] == "0.25" and link["level"] == "55" and "severity" not in link
    view = at.session_state["view"]
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(link)
    again.run()
    ok(again)
    assert again.session_state["view"].settings == view.settings
    assert np.array_equal(again.session_state["view"].probe["logits"], view.probe["logits"])
    per_layer = next(e for e in again.expander if e.label == "Per-layer λ")
    assert per_layer.proto.expanded  # its slider shown, not folded away
    # and Back to an address without them drops them
    at.query_params.clear()
    at.query_params.update({k: v for k, v in link.items() if k not in ("lam.conv1", "level")} | dict(severity="2"))
    at.run()
    ok(at)
    assert at.session_state["view"].settings["lam"]["per_layer"] == {}
    assert next(e for e in at.expander if e.label == "Per-layer λ").proto.expanded  # kept open (Chromium folded it)
    assert at.session_state["view"].settings["corruption"]["severity"] == 2
    # a ResNet named in a link that also gives λ: said, not dropped silently
    resnet = next(n for n in at.selectbox(key="ckpt").options if n.startswith("resnet")).split(" · ")[0]  # (its label)
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(dict(model=resnet, lam="0.5", steps="3", tab="Atoms"))
    again.run()
    assert not again.exception and [w.value for w in again.warning if "address" in w.value] == [
        "Not used from the page's address (the page's own settings instead): lam, steps, tab: "
        f"{resnet} has no CSC layer."]
    assert "tab" not in again.query_params  # (its page has no tabs)


def test_the_address_keeps_the_atoms_tabs_layers(app):
    """The Atoms tab's deeper layer and the layers of 'what each layer sees' are part of the view a link shares (a
    link opened on the first deeper layer and the default five); the default five are not written."""
    from streamlit.testing.v1 import AppTest

    from app import panels
    at = app(tab="Atoms")
    names = [r["name"] for r in at.session_state["view"].probe["layers"]]
    assert at.query_params["atoms"] == names[1] and "sees" not in at.query_params  # the defaults
    at.selectbox(key="atoms_layer").set_value(names[-1]).run()
    at.multiselect(key="sees_layers").set_value([names[2], names[0]]).run()  # kept in the network's order
    ok(at)
    link = dict(at.query_params)
    assert link["atoms"] == names[-1] and link["sees"] == f"{names[0]},{names[2]}"
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(link)
    again.run()
    ok(again)
    assert not any("address" in w.value for w in again.warning)
    assert again.selectbox(key="atoms_layer").value == names[-1]
    assert again.multiselect(key="sees_layers").value == [names[0], names[2]]
    assert "deep_atoms_chart" in {c.key for c in again.get("plotly_chart")}
    # Back to an address without them: the default layers seen again (the deeper layer, like 'layer', stays)
    at.query_params.clear()
    at.query_params.update({k: v for k, v in link.items() if k != "sees"})
    at.run()
    ok(at)
    assert at.multiselect(key="sees_layers").value == panels._spread(names, 5) and "sees" not in at.query_params


def test_the_address_keeps_how_many_are_shown(app, checkpoint_dir):
    """Top-k, the code channels shown and the deeper atoms shown are part of the view a link shares (a link opened on
    5, 16 and 16 whatever its sender saw); each is written only where it is not the default, and Back to an address
    without one restores the default."""
    from streamlit.testing.v1 import AppTest
    at = app()
    assert not {"topk", "codes_shown", "atoms_shown"} & set(at.query_params)  # the defaults
    at.slider(key="topk").set_value(2).run()
    at.slider(key="n_codes").set_value(7).run()
    at.session_state["tab"] = "Atoms"
    at.run()
    at.slider(key="n_atoms").set_value(9).run()
    ok(at)
    link = dict(at.query_params)
    assert {k: link[k] for k in ("topk", "codes_shown", "atoms_shown")} == dict(topk="2", codes_shown="7",
                                                                                 atoms_shown="9")
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(link)
    again.run()
    ok(again)
    assert not any("address" in w.value for w in again.warning)
    assert [again.slider(key=k).value for k in ("topk", "n_atoms")] == [2, 9]
    assert again.session_state["n_codes"] == 7 and len(again.session_state["view"].top_channels) == 7
    # Back to an address without them: the defaults again, and none written
    at.query_params.clear()
    at.query_params.update({k: v for k, v in link.items() if k not in ("topk", "codes_shown", "atoms_shown")})
    at.run()
    ok(at)
    assert [at.slider(key=k).value for k in ("topk", "n_atoms")] == [5, 16] and at.session_state["n_codes"] == 16
    assert not {"topk", "codes_shown", "atoms_shown"} & set(at.query_params)
    # a ResNet keeps its top-k, and names the counts it has no use for
    resnet = _resnet_name(checkpoint_dir)
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(dict(model=resnet, topk="3", codes_shown="7"))
    again.run()
    assert not again.exception and again.slider(key="topk").value == 3 and again.query_params["topk"] == "3"
    assert [w.value for w in again.warning if "address" in w.value] == [
        f"Not used from the page's address (the page's own settings instead): codes_shown: {resnet} has no CSC layer."]


def test_a_switch_of_checkpoint_says_when_it_resets_the_lambda_and_steps_set(app, checkpoint_dir, tmp_path):
    """Each checkpoint starts at its trained λ and FISTA steps: a switch to the ResNet and back lost a λ of 1 without
    a word. A toast says so where something set was reset, and nothing where nothing was."""
    at = app()
    sdnet_name = at.selectbox(key="ckpt").value
    at.selectbox(key="ckpt").set_value(_resnet_name(checkpoint_dir)).run()  # nothing moved: nothing to say
    ok(at)
    assert not at.toast
    at.selectbox(key="ckpt").set_value(sdnet_name).run()
    assert not at.toast
    at.select_slider(key="lam").set_value(1.0).run()
    at.slider(key="n_steps").set_value(5).run()
    at.selectbox(key="ckpt").set_value(_resnet_name(checkpoint_dir)).run()
    ok(at)
    # short, naming what went (a longer one was cut at 'an SDNet starts aga...' behind Streamlit's 'view more')
    assert [t.value for t in at.toast] == [f"λ=1, 5 steps dropped: {_resnet_name(checkpoint_dir)} has no CSC layer."]
    at.selectbox(key="ckpt").set_value(sdnet_name).run()
    assert not at.toast and at.select_slider(key="lam").value == pytest.approx(0.1)  # said at the first switch
    at.multiselect(key="lam_layers").set_value(["conv1"]).run()  # a per-layer λ alone is a setting too
    at.select_slider(key="lam_layer:conv1").set_value(0.5).run()
    other = tmp_path / "other.pt"  # another SDNet: a copy elsewhere is another checkpoint to the app
    other.write_bytes((checkpoint_dir / sdnet_name).read_bytes())
    at.session_state["ckpt_path"] = str(other)
    at.selectbox(key="ckpt").set_value("Other path...").run()
    ok(at)
    assert [t.value for t in at.toast] == ["λ=0.1 (conv1 0.5), 2 steps reset: other.pt starts at its trained λ=0.1, "
                                           "2 steps."]
    assert at.select_slider(key="lam").value == pytest.approx(0.1) and at.slider(key="n_steps").value == 2


def test_a_resnet_page_exports_its_inputs_logits_and_attribution(app, checkpoint_dir, tmp_path):
    """A ResNet checkpoint's page showed its predictions and attribution with no way to export them: it gets the
    SDNet page's export, less what a model without CSC layers does not have (λ, layers, atoms, λ path)."""
    from app import state
    at = app(ckpt=_resnet_name(checkpoint_dir), noise="shot", seed=3, attr_methods=["saliency"])
    at.button(key="attr_run").click().run()
    ok(at)
    assert "Export" in [h.value for h in at.subheader]
    labels = [b.label for b in at.get("download_button")]
    assert {"input_clean.png", "input_model.png", "attribution_saliency.png", "Download everything (ZIP)"} <= set(
        labels) and not any(label.startswith(("codes_", "atoms_", "lam_path")) for label in labels), labels
    view = at.session_state["view"]
    assert view.layer is None and view.probe["layers"] == [] and set(view.attributions) == {"saliency"}
    # settings.json: λ and FISTA steps do not apply (None, as the layer and the baseline), the attribution does
    assert view.settings["lam"] is None and view.settings["n_steps"] is None and view.settings["layer"] is None
    assert view.settings["attribution"] == dict(methods=["saliency"], atom_method=None,
                                                target=int(np.argmax(view.probe["probs"])))
    shown = [c.value.strip() for c in at.code]  # (st.code drops the final newline)
    assert state.settings_json(view.settings).strip() in shown  # the page's settings.json expander
    # the figures' subtitle names no λ
    assert state.export_subtitle(view.settings) == (f"{view.settings['checkpoint']['model']} · sample:"
                                                    f"{state.DEFAULT_SAMPLE} · shot noise, severity 3, seed 3")
    loaded = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu"))
    zf = ExportZip(view)
    assert set(zf.namelist()) == {"png/input_clean.png", "png/input_model.png", "png/attribution_saliency.png",
                                  "arrays.npz", "settings.json", "reproduce.py"}
    # the ZIP is named after the ResNet's checkpoint (it was sdnet-view-...)
    assert state.export_stem(view.settings).startswith(f"{Path(view.settings['checkpoint']['path']).stem}-view-")
    for name in ("png/input_clean.png", "png/input_model.png"):
        assert Image.open(io.BytesIO(zf.read(name))).size == (256, 256)
    figure = np.asarray(Image.open(io.BytesIO(zf.read("png/attribution_saliency.png"))).convert("RGB"))
    assert (figure[:6] == 255).all() and (figure[6:24].min(-1) < 80).any()  # titled
    assert json.loads(zf.read("settings.json")) == json.loads(json.dumps(view.settings))
    arrays = np.load(io.BytesIO(zf.read("arrays.npz")))
    assert set(arrays.files) == {"clean", "input", "logits", "probs", "attribution.saliency"}
    assert np.array_equal(arrays["logits"], view.probe["logits"]) and np.array_equal(arrays["input"], view.image)
    # ...the logits the page shows: its prediction, in words
    best = int(np.argmax(arrays["probs"]))
    summary = next(m.value for m in at.markdown if m.value.startswith("- resnet18"))
    assert f"**{loaded.classes[best]}** {arrays['probs'][best]:.1%}" in summary
    # reproduce.py: no λ to set, no codes to compare; it recomputes the logits (redrawing the noise) and says how close
    script = zf.read("reproduce.py").decode()
    assert script == state.reproduce_snippet(view.settings) and "override" not in script and "t.layers" not in script
    assert script.strip() in shown  # the page's "Reproduce in Python"
    assert_reproduces(zf.extractall(tmp_path / "export"), arrays, loaded.classes, codes=False)


def test_a_stale_resnet_attribution_is_left_out_of_its_export(app, checkpoint_dir):
    """As on an SDNet's page: an attribution computed for another image is said to be stale and left out."""
    from app import state
    at = app(ckpt=_resnet_name(checkpoint_dir), attr_methods=["saliency"])
    at.button(key="attr_run").click().run()
    ok(at)
    assert "attribution_saliency.png" in [b.label for b in at.get("download_button")]
    at.selectbox(key="noise").set_value("gaussian").run()  # another model input: the attribution is now stale
    ok(at)
    assert any("left out of the export" in w.value for w in at.warning), [w.value for w in at.warning]
    labels = [b.label for b in at.get("download_button")]
    assert "input_model.png" in labels and "attribution_saliency.png" not in labels
    view = at.session_state["view"]
    assert view.attributions == {} and view.settings["attribution"] == dict(methods=[], atom_method=None, target=None)
    assert "attribution.saliency" not in np.load(io.BytesIO(state.export_arrays(view))).files
    at.button(key="attr_run").click().run()  # computed again for this image: back in the export
    ok(at)
    assert "attribution_saliency.png" in [b.label for b in at.get("download_button")]
    assert set(at.session_state["view"].attributions) == {"saliency"}


def test_a_bad_upload_or_a_switch_of_source_keeps_the_corruption_and_the_sample(app):
    """Widgets a run stopped before drawing (no upload yet, a bad file) lost their values: the noise came back
    as none, the severity and seed at their defaults, the sample at the first one."""
    at = app(noise="shot", seed=7)
    at.slider(key="severity").set_value(5).run()
    at.selectbox(key="sample").set_value(at.selectbox(key="sample").options[-1]).run()
    sample = at.selectbox(key="sample").value
    at.radio(key="source").set_value("Upload").run()
    at.file_uploader(key="upload").set_value(("x.png", b"not an image", "image/png")).run()
    # the noise controls stay in the sidebar while the upload is refused (the whole section vanished)
    assert at.selectbox(key="noise").value == "shot" and at.slider(key="severity").value == 5
    at.radio(key="source").set_value("Sample").run()
    ok(at)
    assert at.selectbox(key="sample").value == sample
    assert at.session_state["view"].settings["corruption"] == {"kind": "shot", "severity": 5, "seed": 7,
                                                               "level": sdnet.corruptions.level("shot", 5)}
    at.selectbox(key="noise").set_value("none").run()
    at.selectbox(key="noise").set_value("gaussian").run()
    assert at.slider(key="severity").value == 5  # not back at 3
    # a seed out of range is said and clamped (the box showed -3 while the page used the last seed in range)
    at.number_input(key="seed").set_value(-3).run()
    ok(at)
    assert at.session_state["view"].settings["corruption"]["seed"] == 0
    assert any("Seed -3 is outside 0 to 2147483647: using 0." in w.value for w in at.sidebar.warning)
    # ...and so is one that is not a whole number (the integer box's browser side cut a typed 1.5 to 1, unsaid)
    at.number_input(key="seed").set_value(1.5).run()
    ok(at)
    assert at.session_state["view"].settings["corruption"]["seed"] == 1
    assert any("Seed 1.5 is not a whole number: using 1." in w.value for w in at.sidebar.warning)
    at.number_input(key="seed").set_value(1e300).run()  # quoted as typed, not in 301 digits
    assert any("Seed 1e+300 is outside 0 to 2147483647: using 2147483647." in w.value for w in at.sidebar.warning)
    at.number_input(key="seed").set_value(4).run()  # a whole one: nothing to say
    assert at.session_state["view"].settings["corruption"]["seed"] == 4 and not at.sidebar.warning


def test_a_stored_command_is_shown_one_long_option_to_a_line_and_runs_as_it_was():
    """The sidebar's 'How it was made' wrapped a training command as one line in 250 px: '--no-' over 'shortcut', a
    '--' at a line's end. Shown one long option to a line with bash continuations, it is the same words."""
    from app import panels
    command = "python -m sdnet.train --model sdnet18_all --no-shortcut --data '/my data/c.tar.gz' --out runs/x"
    shown = panels._command_lines(command)
    assert shown.splitlines() == ["python -m sdnet.train \\", "  --model sdnet18_all \\", "  --no-shortcut \\",
                                  "  --data '/my data/c.tar.gz' \\", "  --out runs/x"]
    pasted = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + shown.split(" ", 1)[1]], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert pasted == shlex.split(command)[1:]  # what bash hands the program: the same words
    assert panels._command_lines("python -m sdnet.train") == "python -m sdnet.train"
    assert panels._command_lines("echo 'unbalanced") == "echo 'unbalanced"  # not shell words: as it is


def test_the_image_layers_reconstruction_says_how_far_the_threshold_shrank_it(app):
    """A(z) of the image layer is x shrunk toward zero: in pixels a tinted, greyer picture, which read as a colour
    bug with nothing said. The caption gives ||A(z)|| / ||x|| of the shown record; a body layer gets none."""
    at = app(noise="gaussian", severity=5)
    ok(at)
    view = at.session_state["view"]
    rec = next(r for r in view.probe["layers"] if r["name"] == view.layer)
    assert rec["x"].shape[0] == 3  # the first layer is shown first
    ratio = float(np.linalg.norm(rec["recon"]) / np.linalg.norm(rec["x"]))
    assert ratio < 0.9
    assert any(c.value.startswith(f"A(z) is x shrunk toward zero by the threshold (||A(z)|| = {ratio:.2f} ||x||")
               for c in at.caption), [c.value for c in at.caption]
    at.selectbox(key="layer").set_value(view.probe["layers"][1]["name"]).run()
    ok(at)
    assert not any("shrunk toward zero" in c.value for c in at.caption)


def test_what_each_layer_sees_gives_the_stretch_under_each_stretched_picture(app, monkeypatch):
    """Stretched to [0, 1], a deep layer's contribution of 1e-10 of a pixel looked as vivid as the first layer's:
    each picture's caption, and its exported figure's title, gives the factor it was stretched by (1 / its range in
    pixels); absolute pixels get none."""
    from app import state
    at = app(tab="Atoms")
    ok(at)
    # (and the deeper atoms' caption says what the number in their titles is, as the first layer's does)
    assert any("Each title is #atom (usage: Σ|z| of its code channel for this image)" in c.value for c in at.caption)

    view, picks = at.session_state["view"], at.multiselect(key="sees_layers").value
    loaded = state.load(ROOT / view.settings["checkpoint"]["path"], torch.device("cpu"))
    spec, steps = state.lam_spec(loaded.layer_names, view.settings["lam"]["all"], {}), view.settings["n_steps"]
    gains = []
    for name in picks:
        z = torch.from_numpy(state.layer_record(view.probe, name)["z"])[None]
        img = sdnet.decode_to_input(loaded.model, name, z, bias=False)[0].numpy()
        gains.append(1 / (img.max() - img.min()))
        shown = f"{gains[-1]:.3g}".replace("e+0", "e").replace("e+", "e")  # '5.61e4': no '+' to wrap after
        assert f"{name} (×{shown})" in image_captions(at), (name, image_captions(at))
        assert state.sees_stretch(loaded.model, loaded.key, view.image, spec, steps, name) == pytest.approx(gains[-1])
    assert gains[-1] > 1000 * gains[0]  # the deepest is stretched far more than the first layer
    titles = []
    real = images.figure
    monkeypatch.setattr(images, "figure", lambda picture, title, *a, **k: titles.append(title) or real(picture, title,
                                                                                                     *a, **k))
    makers = state.export_png_makers(view, lambda a: a)
    for name, gain in zip(picks, gains):  # the Atoms tab's pictures, and the Layers tab's chosen layer's
        shown = f"{gain:.3g}".replace("e+0", "e").replace("e+", "e")
        for make in (view.more_pngs[f"{state.file_stem('sees', name)}.png"],) + (
                (makers[f"{state.file_stem('sees', name)}.png"],) if name == view.layer else ()):
            make()
            assert titles[-1].endswith(f"(the code's own contribution, offsets left out, contrast stretched ×{shown})")
    at.radio(key="sees_mode").set_value(at.radio(key="sees_mode").options[1]).run()
    ok(at)
    assert not any("(×" in c for c in image_captions(at))
    view = at.session_state["view"]
    view.more_pngs[f"{state.file_stem('sees', picks[-1])}.png"]()
    assert titles[-1].endswith("(in absolute pixels, with BatchNorm's offsets)") and view.sees_stretch is None
    at.select_slider(key="lam").set_value(10.0).run()  # deep codes all zero: in absolute pixels, the offsets
    captions = image_captions(at)
    assert any("(all-zero code: BatchNorm's offsets alone)" in c for c in captions)
    assert not any("sees nothing" in c for c in captions)


def test_what_each_layer_sees_is_in_the_networks_order_in_rows_of_six(app):
    """All 17 layers picked, in any order, were drawn in the order picked, in one row of 45 px pictures with their
    captions broken mid-word: they come in the network's order (the list and the address too), six to a row."""
    at = app(tab="Atoms")
    names = [r["name"] for r in at.session_state["view"].probe["layers"]]
    at.multiselect(key="sees_layers").set_value(names[::-1]).run()
    ok(at)
    assert at.multiselect(key="sees_layers").value == names
    assert at.query_params["sees"] == ",".join(names)
    captions = [c for c in image_captions(at) if c == "model input" or c.split(" (")[0] in names]
    assert [c.split(" (")[0] for c in captions] == ["model input", *names]

    def rows(node):  # the picture rows' boxes and the columns in each
        for key, child in getattr(node, "children", {}).items():
            if getattr(child, "key", None) and str(child.key).startswith("sees_pictures"):
                yield child.key, [len(getattr(b, "children", {})) for b in child.children.values()][0]
            yield from rows(child)
    assert list(rows(at.main)) == [("sees_pictures", 6), ("sees_pictures_2", 6), ("sees_pictures_3", 6)]


def test_top_k_stays_within_a_models_classes(app, tmp_path):
    """Top-k is kept across checkpoints, but a 3-class model opened after a 10-class one at top-5 had a slider
    value above its maximum."""
    torch.manual_seed(0)
    small = sdnet.build_model("sdnet18_all", num_classes=3, width=4, shortcut=False).eval()
    sdnet.save_checkpoint(tmp_path / "three.pt", small, classes=["cat", "dog", "frog"])
    at = app()
    at.slider(key="topk").set_value(5).run()
    at.session_state["ckpt_path"] = str(tmp_path / "three.pt")
    at.selectbox(key="ckpt").set_value("Other path...").run()
    ok(at)
    assert at.slider(key="topk").value == 3 and at.slider(key="topk").max == 3


def test_file_names_are_shown_as_text_not_markdown(app):
    at = app(source="Upload")
    at.file_uploader(key="upload").set_value((":red[x]*a*.png", b"not an image", "image/png")).run()
    assert any("`:red[x]*a*.png`" in e.value for e in at.error), [e.value for e in at.error]


def test_predictions_say_when_they_no_longer_depend_on_the_image(app):
    """An all-zero code cuts the image off; so, nearly, do codes near zero: at 1 FISTA step the last layer's was
    8e-4 at most, every image got 'cat 30.8%', and the page said nothing (or, at λ=0.1, 'Lower λ to see the model
    classify again', which no λ did). It says so, and points to the trained settings where they classify."""
    at = app()
    assert not any("all-zero code" in w.value or "hardly depends" in w.value for w in at.warning)
    at.select_slider(key="lam").set_value(10.0).run()
    ok(at)
    back = "At its trained settings (λ=0.1, 2 steps) the model classifies this image."
    assert any("all-zero code" in w.value and "same for any input" in w.value and back in w.value
               for w in at.warning), [w.value for w in at.warning]
    at.select_slider(key="lam").set_value(0.001).run()
    at.slider(key="n_steps").set_value(1).run()
    ok(at)
    assert not any("all-zero code" in w.value for w in at.warning)
    assert [w.value for w in at.warning if "hardly depends" in w.value] == [
        "At these settings the prediction hardly depends on the image: the training images' mean colour and random "
        f"noise get the same, every class within 1 point. {back}"]
    # ...and the attribution computed there says its maps show how little gets through
    at.session_state["tab"] = "Attribution"
    at.session_state["attr_methods"] = ["saliency"]
    at.run()
    at.button(key="attr_run").click().run()
    ok(at)
    assert any("these maps, at most" in w.value and "not what the decision rests on" in w.value for w in at.warning)
    at.slider(key="n_steps").set_value(2).run()
    at.button(key="attr_run").click().run()
    assert not any("hardly depends" in w.value or "these maps" in w.value for w in at.warning)


def test_predictions_say_when_more_fista_steps_blow_the_logits_up(app):
    at = app()
    assert not any("logits reach" in w.value for w in at.warning)
    at.select_slider(key="lam").set_value(0.001).run()  # λ alone keeps them near the trained settings' size
    assert not any("logits reach" in w.value for w in at.warning)
    for steps in (3, 4):  # warned exactly when the largest logit passes 10x the trained settings'
        at.slider(key="n_steps").set_value(steps).run()
        view = at.session_state["view"]
        grown = np.abs(view.probe["logits"]).max() / np.abs(view.trained["logits"]).max()
        assert any("logits reach" in w.value for w in at.warning) == (grown > 10), (steps, grown)
    at.slider(key="n_steps").set_value(8).run()  # deep layers trained on 2-step codes: their activations explode
    ok(at)
    view = at.session_state["view"]
    big, usual = np.abs(view.probe["logits"]).max(), np.abs(view.trained["logits"]).max()
    warned = [w.value for w in at.warning if "logits reach" in w.value]
    assert big > 10 * usual and warned == [w for w in warned if f"reach {big:.3g} (at the trained settings at most "
                                           f"{usual:.3g})" in w] and len(warned) == 1
    at.toggle(key="steps_first").set_value(True).run()  # 8 steps in the image's layer only: no explosion
    assert not any("logits reach" in w.value for w in at.warning)


def test_the_path_headline_names_each_run_of_a_class_and_what_cuts_the_image_off():
    from types import SimpleNamespace

    from app import panels
    classes = ["airplane", "automobile", "bird", "cat"]
    runs = [(0, 0.001, 0.1), (1, 0.2, 0.2), (0, 0.3, 10.0)]
    assert panels._run_texts(runs, classes, True, True) == ["**airplane** up to 0.1", "**automobile** 0.2",
                                                            "**airplane** from 0.3"]
    assert panels._run_texts([(3, 0.001, 2.0)], classes, True, True) == ["**cat** throughout"]
    assert panels._run_texts([(3, 0.001, 2.0)], classes, True, False) == ["**cat** up to 2"]  # a cut follows
    assert panels._run_texts([(3, 0.4, 2.0), (2, 3.0, 10.0)], classes, False, True) == ["**cat** 0.4-2",
                                                                                         "**bird** from 3"]
    # the λ just under the cut where this image's output is already the cut-off one (every class within a point) are
    # said to be so: 'cat 0.3' read as the image recovering its class (the walk-through's Gaussian-5 cat); not as
    # 'nearly cut off ... the output for any input': at 0.3 other images still got other classes
    lams = np.array([0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5])

    def probs(*rows):
        out = np.full((len(rows), 5), 0.0)
        for i, (c, v) in enumerate(rows):
            out[i] = (1 - v) / 4
            out[i, c] = v
        return out
    cut_off = (3, 0.308)
    rows = [(2, 0.5), (2, 0.5), (4, 0.5), (4, 0.5), (3, 0.309), cut_off, cut_off]
    classes5 = classes + ["deer"]
    assert panels._path_headline(lams, probs(*rows), classes5, 0.4) == (
        "Prediction along λ: **bird** up to 0.15 · **deer** 0.2-0.25 · already at the cut-off output: **cat** 0.3 "
        "(every class within 1 point of what any input gets from 0.4) · from 0.4 the image is cut off (**cat** for "
        "any input)")
    rows[4] = (3, 0.35)  # 4 points off: the image still counts there
    assert panels._path_headline(lams, probs(*rows), classes5, 0.4) == (
        "Prediction along λ: **bird** up to 0.15 · **deer** 0.2-0.25 · **cat** 0.3 · from 0.4 the image is cut off "
        "(**cat** for any input)")
    assert panels._path_headline(lams, probs(*[cut_off] * 7), classes5, 0.4).startswith(
        "Prediction along λ: already at the cut-off output: **cat** 0.1-0.3 (")  # all the way: no run before it
    assert panels._path_headline(lams, probs(*rows), classes5, None) == (
        "Prediction along λ: **bird** up to 0.15 · **deer** 0.2-0.25 · **cat** from 0.3")  # no cut, nothing near
    # an all-zero code cuts the image off at the stem (no shortcut around it) or anywhere without shortcuts
    with_shortcuts = SimpleNamespace(layer_names=["conv1", "layer1.0.conv1"], meta={"config": {"shortcut": True}})
    assert panels._cuts_off(with_shortcuts, ["conv1", "layer1.0.conv1"])
    assert not panels._cuts_off(with_shortcuts, ["layer1.0.conv1"]) and not panels._cuts_off(with_shortcuts, [])
    assert panels._cuts_off(SimpleNamespace(layer_names=["conv1", "l1"], meta={"config": {"shortcut": False}}), ["l1"])


def test_the_upload_limit_is_the_one_the_app_enforces():
    import re  # (tomllib is Python 3.11's; the project supports 3.10)
    config = (Path(APP).parents[1] / ".streamlit" / "config.toml").read_text()
    limit = re.search(r"^\[server\][^\[]*^maxUploadSize\s*=\s*(\d+)", config, re.M | re.S)
    assert limit and int(limit.group(1)) * 2 ** 20 == images.MAX_BYTES  # not Streamlit's "200MB per file"


def test_an_upload_survives_a_look_at_a_sample(app):
    """Source Sample and back to Upload emptied the file box, and the page asked for the file again (the box
    forgets a file it does not draw): the page keeps it, and says so. A file taken out of the box is forgotten."""
    at = app(source="Upload")
    photo = png(Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    at.file_uploader(key="upload").set_value(("mine.png", photo, "image/png")).run()
    ok(at)
    mine = at.session_state["view"].clean
    at.radio(key="source").set_value("Sample").run()
    assert at.session_state["view"].settings["image"]["source"].startswith("sample:")
    at.radio(key="source").set_value("Upload").run()
    ok(at)
    view = at.session_state["view"]
    assert view.settings["image"]["source"] == "upload:mine.png" and np.array_equal(view.clean, mine)
    assert any("Using `mine.png`, uploaded earlier" in c.value for c in at.sidebar.caption)
    at.selectbox(key="noise").set_value("shot").run()  # ...and on later runs
    assert at.session_state["view"].settings["image"]["source"] == "upload:mine.png"
    at.file_uploader(key="upload").set_value(("other.png", photo, "image/png")).run()  # another replaces it...
    assert at.session_state["view"].settings["image"]["source"] == "upload:other.png"
    # ...but not one that cannot be used: a look at a sample then brought back the bad file and its error
    at.file_uploader(key="upload").set_value(("notes.png", b"not an image", "image/png")).run()
    assert any("Cannot use `notes.png`" in e.value for e in at.error)
    at.radio(key="source").set_value("Sample").run()
    at.radio(key="source").set_value("Upload").run()
    ok(at)
    assert at.session_state["view"].settings["image"]["source"] == "upload:other.png"
    at.file_uploader(key="upload").set_value(("other.png", photo, "image/png")).run()
    at.file_uploader(key="upload").set_value(None).run()  # ...and one taken out of the box (its x) is gone
    assert any("Upload an image" in i.value for i in at.info)


def test_bad_uploads_give_a_message(app):
    at = app(source="Upload")
    ok(at)
    assert any("Upload an image" in i.value for i in at.info)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = png(noisy)
    bad = {"notes.png": (b"hello, not an image" * 4, "not an image"), "cut.png": (full[: len(full) // 2], "truncated"),
           "empty.png": (b"", "empty"), "bomb.png": (png_header(50_000, 50_000), "decompression bomb")}
    for name, (data, message) in bad.items():
        at.file_uploader(key="upload").set_value((name, data, "image/png")).run()
        assert not at.exception
        assert any(name in e.value and message in e.value for e in at.error), [e.value for e in at.error]
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 4), dtype=np.uint8), "RGBA")
    at.file_uploader(key="upload").set_value(("photo.png", png(big), "image/png")).run()
    ok(at)
    view = at.session_state["view"]
    assert view.settings["image"]["source"] == "upload:photo.png" and view.clean.shape == (3, 32, 32)
    assert any("centre-cropped 200x300 to 200x200" in c.value and "resized 200x200 -> 32x32" in c.value for c in at.caption)
    assert not any("Only the middle" in w.value for w in at.warning)  # two thirds of it kept: the caption says it
    strip = Image.fromarray(np.random.default_rng(4).integers(0, 256, (400, 20, 3), dtype=np.uint8))
    at.file_uploader(key="upload").set_value(("strip.png", png(strip), "image/png")).run()
    ok(at)  # 95% of a tall strip cut away was said in the grey caption only, under a picture of the crop
    assert any("Only the middle 20x20 of this 20x400 image is used (5% of it)" in w.value for w in at.warning), [
        w.value for w in at.warning]
    whole = "The whole upload: the model is given the bright square."
    assert whole in [c.value for c in at.caption]  # the two pictures are the crop: the whole file shows what it cut
    photo = png(Image.new("RGB", (8000, 6000), (120, 30, 200)), "JPEG")  # 48 megapixels: decoded at half scale
    at.file_uploader(key="upload").set_value(("phone.jpg", photo, "image/jpeg")).run()
    ok(at)
    assert any(c.value.startswith("Uploaded 8000x6000 RGB image; JPEG decoded at 1/2 scale, 8000x6000 to 4000x3000")
               for c in at.caption), [c.value for c in at.caption]
    small = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    at.file_uploader(key="upload").set_value(("tiny.png", png(small), "image/png")).run()
    ok(at)
    assert any(c.value.startswith("Uploaded 32x32 RGB image; used as it is. A reload or a link of this page opens on "
                                  "a sample") for c in at.caption)  # it had no caption at all
    assert whole not in [c.value for c in at.caption]  # a square is used whole
    assert not any("smaller than the model's" in w.value for w in at.warning)
    dot = Image.new("RGB", (1, 1), (200, 0, 0))  # a flat 32x32 square, its predictions and Auto λ given as usual
    at.file_uploader(key="upload").set_value(("dot.png", png(dot), "image/png")).run()
    ok(at)
    assert any("smaller than the model's 32x32 input: its 1x1 square is enlarged 32x" in w.value
               for w in at.warning), [w.value for w in at.warning]
    bilevel = Image.fromarray(np.random.default_rng(3).integers(0, 2, (32, 32), dtype=np.uint8) * 255).convert("1")
    at.file_uploader(key="upload").set_value(("bw.png", png(bilevel), "image/png")).run()
    ok(at)
    assert any(c.value.startswith("Uploaded 32x32 1-bit image;") for c in at.caption)  # PIL's mode "1", in words


def test_a_transparent_upload_says_how_it_is_shown(app):
    at = app(source="Upload")
    clear = Image.new("RGBA", (32, 32), (200, 0, 0, 0))
    clear.paste((200, 0, 0, 255), (8, 8, 24, 24))  # a red square on a transparent ground
    at.file_uploader(key="upload").set_value(("icon.png", png(clear), "image/png")).run()
    ok(at)
    assert any("composited onto white" in c.value and "on a checkerboard; the model sees them white" in c.value
               for c in at.caption), [c.value for c in at.caption]
    view = at.session_state["view"]
    assert (view.clean[:, 0, 0] == 1).all() and np.allclose(view.clean[:, 16, 16], [200 / 255, 0, 0])
    json.dumps(view.settings)  # the opacity went to the picture only, not into settings.json
    at.file_uploader(key="upload").set_value(("opaque.png", png(clear.convert("RGB")), "image/png")).run()
    assert not any("checkerboard" in c.value for c in at.caption)


def test_a_checkpoint_path_that_fails_takes_the_model_out_of_the_address(app, checkpoint_dir, tmp_path,
                                                                          monkeypatch):
    """The page stopped at the error before writing its address, so the previous checkpoint's name stayed in it: a
    reload or a link opened that model, not the path the user was fixing."""
    from streamlit.testing.v1 import AppTest
    resnet = _resnet_name(checkpoint_dir)
    at = app(ckpt=resnet)
    assert at.query_params["model"] == resnet
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    at.session_state["ckpt_path"] = str(junk)
    at.selectbox(key="ckpt").set_value("Other path...").run()
    assert any("Cannot load the checkpoint" in e.value for e in at.error)
    assert "model" not in at.query_params and at.query_params["image"] == "cat_2"  # the rest is kept
    at.text_input(key="ckpt_path").set_value("").run()  # an empty box: the same
    assert "model" not in at.query_params and not at.exception
    again = AppTest.from_file(APP, default_timeout=180)  # the reload: the folder's first checkpoint, no warning
    again.query_params.update(dict(at.query_params))
    again.run()
    ok(again)
    assert again.selectbox(key="ckpt").value != resnet and all("address" not in w.value for w in again.warning)
    at.text_input(key="ckpt_path").set_value(str(checkpoint_dir / resnet)).run()  # the path mended: its model
    ok(at)
    assert "model" not in at.query_params and at.session_state["view"].settings["checkpoint"]["path"].endswith(resnet)
    # a path that loads writes the address once, not first without the model and then the view's (two history
    # entries: Back landed on the first, the new model with the old λ)
    from streamlit.runtime.state.query_params_proxy import QueryParamsProxy
    writes, real = [], QueryParamsProxy.from_dict
    monkeypatch.setattr(QueryParamsProxy, "from_dict", lambda self, params: (writes.append(dict(params)),
                                                                             real(self, params))[1])
    at.selectbox(key="ckpt").set_value(resnet).run()
    writes.clear()
    at.selectbox(key="ckpt").set_value("Other path...").run()
    assert len(writes) == 1 and "model" not in writes[0]
    # a checkpoint of the folder that does not load is the one the address names (a reload opened the previous)
    (checkpoint_dir / "broken.pt").write_text("not a checkpoint")
    try:
        at.selectbox(key="ckpt").set_value(resnet).run()
        at.selectbox(key="ckpt").set_value("broken.pt").run()
        assert any("Cannot load the checkpoint" in e.value for e in at.error) and at.query_params["model"] == "broken.pt"
    finally:
        (checkpoint_dir / "broken.pt").unlink()


def test_bad_checkpoint_paths_and_no_checkpoints(app, tmp_path, monkeypatch):
    at = app(ckpt="Other path...", ckpt_path=str(tmp_path / "missing.pt"))
    assert not at.exception and any("no file at" in e.value for e in at.error)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    at.text_input(key="ckpt_path").set_value(str(junk)).run()
    assert not at.exception and any("Cannot load the checkpoint" in e.value for e in at.error)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    at.text_input(key="ckpt_path").set_value(str(tmp_path / "other.pt")).run()
    assert any("not an SDNet Explorer checkpoint" in e.value for e in at.error)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(empty))
    at = app()
    assert not at.exception
    assert any("No checkpoints found" in w.value for w in at.warning)
    hint = next(c.value for c in at.code if "python -m sdnet.train" in c.value)
    assert f"cp runs/sdnet18_all-w16/model.pt {empty}/sdnet18_all-w16.pt" in hint  # into the folder the app reads
    assert "checkpoints/" not in hint


def test_the_app_opens_on_the_most_accurate_sdnet_all(tmp_path):
    from app import state
    for name, acc in (("resnet18-w16.pt", 90.0), ("sdnet18_all-w16-a.pt", 80.0), ("sdnet18_all-w16-b.pt", 85.0),
                      ("sdnet18_all-w16.pt", None), ("sdnet18_all-w16-nan.pt", float("nan")),
                      ("sdnet18-w16.pt", 88.0)):
        (tmp_path / name).write_bytes(b"")  # only the names and cards matter here
        sdnet.write_card(tmp_path / name, {"test_accuracy": acc})
    (tmp_path / "broken.pt").write_bytes(b"")
    (tmp_path / "broken.json").write_text("{not json")
    assert [p.name for p in state.list_checkpoints(tmp_path)] == [
        "sdnet18_all-w16-b.pt", "sdnet18_all-w16-a.pt", "sdnet18_all-w16-nan.pt", "sdnet18_all-w16.pt",
        "resnet18-w16.pt", "sdnet18-w16.pt", "broken.pt"]
    assert state.list_checkpoints(tmp_path / "missing") == []
    # the sidebar lists each with its accuracy and epochs, as its card gives them ('sdnet18_all-w16.pt' had trained
    # for 3 epochs and looked like the main model); what a card lacks or has of the wrong kind is left out
    sdnet.write_card(tmp_path / "sdnet18_all-w16.pt", {"epochs": 3, "test_accuracy": 54.23})
    sdnet.write_card(tmp_path / "sdnet18-w16.pt", {"epochs": 1, "test_accuracy": "88%"})
    labels = [state.checkpoint_label(tmp_path / n) for n in ("sdnet18_all-w16.pt", "sdnet18-w16.pt",
                                                             "sdnet18_all-w16-nan.pt", "broken.pt")]
    assert labels == ["sdnet18_all-w16.pt · 54%, 3 ep", "sdnet18-w16.pt · 1 ep", "sdnet18_all-w16-nan.pt", "broken.pt"]
    # epochs its name gives are not said twice (the closed box cut '...-e40.pt · 86%, 40 ep' before 'ep')
    for name, epochs, label in (("sdnet18_all-w16-e40.pt", 40, "sdnet18_all-w16-e40.pt · 86%"),
                                ("sdnet18_all-w16-e4.pt", 40, "sdnet18_all-w16-e4.pt · 86%, 40 ep"),
                                ("e40_sdnet.pt", 40, "e40_sdnet.pt · 86%"), ("model40.pt", 40, "model40.pt · 86%, 40 ep"),
                                ("edited-e40.pt", "40 (stopped early", "edited-e40.pt · 86%"),  # (a regex error)
                                ("edited2.pt", "[40", "edited2.pt · 86%")):
        (tmp_path / name).write_bytes(b"")
        sdnet.write_card(tmp_path / name, {"epochs": epochs, "test_accuracy": 86.1})
        assert state.checkpoint_label(tmp_path / name) == label


def test_the_baseline_is_a_resnet_of_the_same_width_or_none(tmp_path):
    from app import state
    for name in ("resnet18-w16-e40.pt", "resnet18-w1.pt", "resnet34-w4-e3.pt", "sdnet18_all-w4.pt"):
        (tmp_path / name).write_bytes(b"")
    run = tmp_path / "run" / "model.pt"  # a model trained elsewhere, no baseline on its card

    def loaded(width, card=None):
        return state.Loaded(model=None, meta={"config": {"width": width}}, card=card, path=run, key="")
    assert state.baseline_path(loaded(4), tmp_path).name == "resnet34-w4-e3.pt"
    assert state.baseline_path(loaded(16), tmp_path).name == "resnet18-w16-e40.pt"
    assert state.baseline_path(loaded(1), tmp_path).name == "resnet18-w1.pt"  # not w16's prefix
    assert state.baseline_path(loaded(8), tmp_path) is None  # was the width-16 ResNet, called the baseline
    assert state.baseline_path(loaded(8, {"baseline": "resnet18-w16-e40.pt"}), tmp_path).name == "resnet18-w16-e40.pt"


def _with_card(checkpoint_dir, folder, drop=(), **changes):
    """The default SDNet-All checkpoint (a link) in `folder`, with a copy of its card less `drop` and any fit,
    plus `changes`; its path."""
    src = sorted(checkpoint_dir.glob("sdnet18_all*.pt"))[0]
    folder.mkdir()
    (folder / src.name).symlink_to(src)
    card = {k: v for k, v in (sdnet.load_card(src) or {}).items() if k not in ("robust_fit", *drop)}
    sdnet.write_card(folder / src.name, {**card, **changes})
    return folder / src.name


def test_auto_lambda_from_the_card_fit(app, checkpoint_dir, tmp_path, monkeypatch):
    # no fit on the card: the button explains what is missing
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(_with_card(checkpoint_dir, tmp_path / "nofit").parent))
    at = app()
    btn = at.button(key="auto_lam_btn")
    assert btn.disabled and any("python -m sdnet.robust fit" in c.value for c in at.caption)
    # a copy of the default checkpoint whose card carries an Algorithm 1 fit (made in every layer), as
    # `python -m sdnet.train` writes a card, before `python -m sdnet.evaluate --update-card`
    points = [{"level": c, "residual": r, "lam": lam} for c, r, lam in ((0.04, 0.3, 0.1), (0.1, 0.5, 0.6))]
    fit = {"slope": 2.0, "intercept": 0.05, "lam_range": [0.05, 2.0], "points": points,
           "command": "python -m sdnet.robust fit --checkpoint X"}
    training = {"command": "python -m sdnet.train --width 16", "seconds": 600.0, "test_acc_during_training": 71.25,
                "test_subset_during_training": 2000}
    path = _with_card(checkpoint_dir, tmp_path / "fit", drop=("test_accuracy", "data"), robust_fit={"gaussian": fit},
                      dataset="cifar10", training=training)
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(path.parent))
    at = app(noise="gaussian")
    ok(at)
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "71.25% at the end of training (on 2000 test images)" in sidebar and "**data**: cifar10" in sidebar
    assert not at.sidebar.warning  # a trained model is not called a stand-in
    # parsed first: depending on the installed JSON encoder, the spec writes λ as is or as \u03bb
    fit_fig = next(spec for spec in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                   if "λ(r)" in json.dumps(spec["layout"], ensure_ascii=False))
    assert [t["name"].rstrip("\u2003") for t in fit_fig["data"]] == ["training", "fit", "this image"]
    r = at.session_state["view"].trained["mean_rel_residual"]
    expected = float(f"{sdnet.adaptive_lam(fit, r):.3g}")  # to 3 digits: the slider reads 0.502, not 0.502475
    assert fit_fig["data"][2]["x"] == [pytest.approx(r)] and fit_fig["data"][2]["y"] == [pytest.approx(expected)]
    # every command on the page (training, fit) wraps: the fit's was cut at its popover's edge; each long option on a
    # line of its own (wrapped as one line, '--no-shortcut' broke after '--no-')
    from app import panels
    commands = [c for c in at.code if c.language == "bash"]
    assert {panels._command_lines(fit["command"]), panels._command_lines(training["command"])} <= {
        c.value for c in commands} and all(c.proto.wrap_lines for c in commands)
    at.button(key="auto_lam_btn").click().run()
    ok(at)
    assert at.select_slider(key="lam").value == pytest.approx(expected)
    assert at.session_state["view"].settings["lam"]["all"] == pytest.approx(expected)
    assert any("Algorithm 1 (gaussian fit)" in c.value for c in at.caption)
    from streamlit.testing.v1 import AppTest
    again = AppTest.from_file(APP, default_timeout=180)  # a link to it: the note with it
    again.query_params.update(dict(at.query_params))
    again.run()
    assert any("Algorithm 1 (gaussian fit)" in c.value for c in again.caption)
    at.select_slider(key="lam").set_value(0.1).run()  # moved away: the note no longer describes the view
    assert not any("Algorithm 1 (gaussian fit)" in c.value for c in at.caption)
    at.button(key="auto_lam_btn").click().run()
    at.slider(key="severity").set_value(1).run()  # another image: the note quoted the old one's residual
    assert not any("Algorithm 1 (gaussian fit)" in c.value for c in at.caption)
    # ...but λ is still the one it set: said, not left to the prediction's label
    assert any(f"λ is still Auto λ's {expected:g} for an earlier image" in c.value for c in at.caption)
    # the fit follows the sidebar's noise; one made on another noise, or far from the image's residual, says so
    at.selectbox(key="noise").set_value("shot").run()
    assert any("The image has shot noise; this fit was made on gaussian noise." in c.value for c in at.caption)
    assert not any("Flat fit" in w.value for w in at.warning)  # slope 2
    assert "does not grow" not in at.button(key="auto_lam_btn").help


@pytest.mark.parametrize("slope", [-2.35, 0.0])  # 0: what fit_line gives when the residuals do not vary
def test_auto_lambda_says_when_its_fit_does_not_grow_with_the_residual(app, checkpoint_dir, tmp_path, monkeypatch,
                                                                       slope):
    """The shipped card's speckle fit has slope -2.35: Auto λ fell as the noise grew, with nothing said."""
    fit = {"slope": slope, "intercept": 1.2, "lam_range": [0.1, 1.5],
           "points": [{"level": c, "residual": r, "lam": lam} for c, r, lam in ((0.06, 0.3, 0.5), (0.2, 0.4, 0.3))]}
    path = _with_card(checkpoint_dir, tmp_path / "down", robust_fit={"speckle": fit})
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(path.parent))
    at = app(noise="speckle")
    ok(at)
    assert any(f"Flat fit (slope {slope:.3g}): λ does not rise with the noise." == w.value for w in at.warning), \
        [w.value for w in at.warning]
    # ...as a warning, not in grey (it read as a recommendation), in a few words (the sentence was 15 lines in its
    # column at 800 px); the button's help says why
    assert f"does not grow with the residual (slope {slope:.3g}): on its training data the best λ did not rise with " \
           "speckle noise" in at.button(key="auto_lam_btn").help


def test_auto_lambda_of_a_first_layer_fit_sets_that_layer_only(app, checkpoint_dir, tmp_path, monkeypatch):
    # the default `python -m sdnet.robust fit` changes lambda in the first CSC layer and reads its residual
    src = sorted(checkpoint_dir.glob("sdnet18_all*.pt"))[0]
    first = sdnet.csc_layers(sdnet.load_checkpoint(src)[0])[0][0]
    fit = {"slope": 3.0, "intercept": -0.5, "lam_range": [0.1, 1.5], "layers": [first],
           "points": [{"level": 0.04, "residual": 0.3, "lam": 0.2}, {"level": 0.1, "residual": 0.6, "lam": 1.2}]}
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(_with_card(checkpoint_dir, tmp_path / "fit1",
                                                           robust_fit={"gaussian": fit}).parent))
    at = app(noise="gaussian")
    ok(at)
    trained = at.session_state["view"].trained
    r = next(rec["rel_residual"] for rec in trained["layers"] if rec["name"] == first)
    assert r != pytest.approx(trained["mean_rel_residual"])  # the fit reads the first layer, not the mean
    expected = float(f"{sdnet.adaptive_lam(fit, r):.3g}")
    lam0 = at.select_slider(key="lam").value
    at.select_slider(key="lam").set_value(0.5).run()  # moved away first: Auto λ puts it back, as the fit measured
    at.button(key="auto_lam_btn").click().run()
    ok(at)
    assert at.select_slider(key="lam").value == lam0  # the other layers at their trained lambda
    assert at.multiselect(key="lam_layers").value == [first]
    layers = {rec["name"]: rec["lam"] for rec in at.session_state["view"].probe["layers"]}
    assert layers[first] == pytest.approx(expected) and all(v == lam0 for n, v in layers.items() if n != first)
    assert any(f"in {first}" in c.value and "Algorithm 1 (gaussian fit)" in c.value for c in at.caption)
    # a link to this view keeps the note (its λ in that layer looked set by hand); one with another λ there does not
    from streamlit.testing.v1 import AppTest
    link = dict(at.query_params)
    assert link[f"lam.{first}"] == repr(expected).removesuffix(".0")
    for edit, noted in (({}, True), ({f"lam.{first}": "0.3"}, False), ({"lam": "0.3"}, False)):
        again = AppTest.from_file(APP, default_timeout=180)
        again.query_params.update({**link, **edit})
        again.run()
        ok(again)
        assert any(f"in {first}" in c.value and "Algorithm 1 (gaussian fit)" in c.value
                   for c in again.caption) == noted, edit
        if noted:  # ...and it goes when λ moves, as the button's own does
            again.select_slider(key=f"lam_layer:{first}").set_value(0.5).run()
            assert not any("Algorithm 1 (gaussian fit)" in c.value for c in again.caption)


def test_auto_lambda_with_a_fit_for_other_layers_says_so(app, checkpoint_dir, tmp_path, monkeypatch):
    fit = {"slope": 1.0, "intercept": 0.0, "lam_range": [0.1, 1.5], "layers": ["no_such_layer"], "points": []}
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(_with_card(checkpoint_dir, tmp_path / "stale",
                                                           robust_fit={"gaussian": fit}).parent))
    at = app(noise="gaussian")
    ok(at)
    assert at.button(key="auto_lam_btn").disabled
    assert any("does not match this model" in c.value and "no_such_layer" in c.value for c in at.caption)


def test_a_hand_edited_card_of_the_wrong_kinds_is_named_not_fatal(app, checkpoint_dir, tmp_path, monkeypatch):
    """Fields of the wrong kind on the model card are left out and named in a warning; the page still works, and
    a fit with a NaN slope offers no "Auto λ = nan" button."""
    fits = {"gaussian": {"slope": float("nan"), "intercept": 0.0, "lam_range": [0.1, 1.5]},
            "shot": {"intercept": 0.1}, "impulse": "a fit"}
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(_with_card(
        checkpoint_dir, tmp_path / "edited", test_accuracy="86%", training="by hand", robust_fit=fits).parent))
    at = app(noise="gaussian")
    ok(at)
    warning = " ".join(w.value for w in at.warning)
    for text in ("test_accuracy is '86%', not a number", "training is not a dictionary",
                 "robust_fit.gaussian needs a finite numeric slope", "robust_fit.impulse is a str"):
        assert text in warning, (text, warning)
    assert not any("nan" in b.label for b in at.button)


@pytest.mark.parametrize("typed", ["~nosuchuser_sdnet/model.pt", "a" * 5000 + ".pt"])
def test_an_unreadable_other_path_is_said_in_a_line(typed):
    """'Other path...': a home of no user (RuntimeError) and a name too long (OSError) showed tracebacks."""
    from app import state
    with pytest.raises(sdnet.CheckpointError, match="^cannot read "):
        state.load(typed, torch.device("cpu"))


def test_the_card_names_the_file_where_its_run_had_another_name(app, checkpoint_dir, tmp_path, monkeypatch):
    """A card names the run it describes (sdnet18_all-w16-e3), which need not be the file's stem: the sidebar read
    'sdnet18_all-w16-e3' for a pick of sdnet18_all-w16.pt (a browser review). The file is named beside it then."""
    path = _with_card(checkpoint_dir, tmp_path / "named", name="my-run-e3 (no shortcuts)")
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(path.parent))
    at = app()
    ok(at)
    card = next(m.value for m in at.sidebar.markdown if m.value.startswith("- **name**"))
    assert card.startswith(f"- **name**: my-run-e3 (no shortcuts); file `{path.name}`\n"), card
    path.with_suffix(".json").write_text(json.dumps({**json.loads(path.with_suffix(".json").read_text()),
                                                     "name": f"{path.stem} (no shortcuts)"}))
    at = app()
    card = next(m.value for m in at.sidebar.markdown if m.value.startswith("- **name**"))
    escaped = path.stem.replace("_", "\\_")  # (the card's values are plain text in its Markdown)
    assert card.startswith(f"- **name**: {escaped} (no shortcuts)\n"), card  # the file's own name: said once
    copy = tmp_path / "copied" / "my model (1).pt"  # a browser's copy with no card: its stem, said once
    copy.parent.mkdir()
    copy.symlink_to(path.resolve())
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(copy.parent))
    at = app()
    card = next(m.value for m in at.sidebar.markdown if m.value.startswith("- **name**"))
    assert card.startswith("- **name**: my model (1)\n"), card
    # a card's values are one line of plain text each: a dataset with a row and an image link of its own added a
    # forged row to the card and had the browser fetch the image (a bad-input audit)
    copy.with_suffix(".json").write_text(json.dumps({"data": "cifar10\n- **test accuracy**: 99.9%\n"
                                                             "![t](http://x.invalid/t.png)"}))
    at = app()
    card = next(m.value for m in at.sidebar.markdown if m.value.startswith("- **name**"))
    assert "- **data**: cifar10 - \\*\\*test accuracy\\*\\*\\: 99.9% \\!\\[t\\](http\\://x.invalid/t.png)\n" in card, card
    assert card.count("\n- ") == 6 and "99.9%" not in card.split("**data**")[0], card


def test_card_fields_are_checked_one_by_one():
    from sdnet.cards import checked_card
    good = {"slope": 0.5, "intercept": 0.1, "lam_range": [0.1, 1.5], "n_steps": 2, "layers": ["conv1"]}
    card, problems = checked_card({"test_accuracy": 85.0, "robust_fit": {"gaussian": good,
                                   "shot": dict(good, n_steps=10**9), "speckle": dict(good, lam_range=[2, 1])},
                                   "training": {"seconds": "long", "command": "python -m sdnet.train"}})
    assert card["test_accuracy"] == 85.0 and list(card["robust_fit"]) == ["gaussian"]
    assert card["training"] == {"command": "python -m sdnet.train"}
    assert len(problems) == 3 and checked_card(None) == (None, [])
    # a fit naming its layers as one string (iterated letter by letter: KeyError 'c'), a baseline that is no name
    card, problems = checked_card({"robust_fit": {"gaussian": dict(good, layers="conv1")}, "baseline": 3})
    assert card["robust_fit"] == {} and "baseline" not in card
    assert problems == ["baseline is not a file name: left out",
                        "robust_fit.gaussian has layers that are not a list of layer names: left out"]


def test_app_threads_from_the_environment(monkeypatch):
    from app import state
    for text, threads in (("", 1), ("abc", 1), ("3", 3), ("0", 1)):
        monkeypatch.setenv("SDNET_APP_THREADS", text)
        assert state.cpu_threads() == threads, text


def test_two_sessions_share_the_model_not_their_results(app, monkeypatch):
    from app import state
    state._load.clear()
    loads, real = [], sdnet.load_checkpoint
    monkeypatch.setattr(sdnet, "load_checkpoint", lambda path, **kw: (loads.append(path), real(path, **kw))[1])
    a, b = app(), app()
    assert loads and len(loads) == len(set(loads))  # each file loaded once, for both sessions (it said so, untested)
    a.select_slider(key="lam").set_value(0.01).run()
    b.select_slider(key="lam").set_value(2.0).run()
    ra, rb = residual_column(a), residual_column(b)
    assert ra != rb
    assert all(r["lam"] == 0.01 for r in a.session_state["view"].probe["layers"])
    assert all(r["lam"] == 2.0 for r in b.session_state["view"].probe["layers"])


def test_concurrent_probes_on_one_model(calibrated_model):
    """Threads with different lambdas on one shared model get exactly their serial results."""
    from app import state
    model = calibrated_model("sdnet18_all", width=4, shortcut=False)
    x = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    lams = [0.01, 0.1, 0.5, 2.0] * 3
    def seen(probe):  # the logits and each layer's record the page shows (the logits alone missed a shared recorder)
        return [probe["logits"]] + [np.asarray(r[k], dtype=np.float64) for r in probe["layers"]
                                    for k in ("lam", "rel_residual", "sparsity", "z")]
    serial = {lam: seen(state.run_probe(model, x, lam, 2)) for lam in set(lams)}
    results, errors = {}, []

    def worker(i, lam):
        try:
            for _ in range(3):
                results[i] = seen(state.run_probe(model, x, lam, 2))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i, lam)) for i, lam in enumerate(lams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(results[i]) == len(serial[lam]) and all(np.allclose(a, b, atol=1e-6, equal_nan=True) for a, b in
                                                          zip(results[i], serial[lam])) for i, lam in enumerate(lams))
    assert all(layer.lam == 0.1 for _, layer in sdnet.csc_layers(model))  # never mutated


def test_other_architectures(app, calibrated_model, tmp_path, monkeypatch):
    """A ResNet (no CSC layer) shows predictions, attribution and export, no λ; an SDNet with shortcuts says why
    it cannot be decoded to pixels, and the rest works."""
    from streamlit.testing.v1 import AppTest
    for name, arch, shortcut in (("resnet18-w8.pt", "resnet18", True), ("sdnet18-w8.pt", "sdnet18", True)):
        sdnet.save_checkpoint(tmp_path / name, calibrated_model(arch, 8, shortcut))
    monkeypatch.setenv("SDNET_CHECKPOINTS", str(tmp_path))
    at = app(ckpt="resnet18-w8.pt")
    ok(at)
    assert any("no CSC layers" in i.value for i in at.info)
    summary = next(m.value for m in at.markdown if m.value.startswith("- resnet18"))
    assert "SDNet" not in summary and summary.startswith("- resnet18 (resnet18-w8.pt): **") and "\n" not in summary
    assert "lambda / FISTA steps**: - (no CSC layer)" in " ".join(m.value for m in at.sidebar.markdown)
    # its attribution, to compare with an SDNet's: the input methods, no atoms (it has none)
    assert not [b for b in at.selectbox if b.key == "attr_atom_method"]
    at.multiselect(key="attr_methods").set_value(["saliency", "occlusion"]).run()
    at.button(key="attr_run").click().run()
    ok(at)
    result = at.session_state["attr_result"]
    assert set(result["attributions"]) == {"saliency", "occlusion"} and result["atoms"] is None
    assert all(np.any(a) for a in result["attributions"].values())
    assert {c.key for c in at.get("plotly_chart")} >= {"attr_saliency", "attr_occlusion"}
    assert "atom_attr_chart" not in {c.key for c in at.get("plotly_chart")}
    at = app(ckpt="sdnet18-w8.pt", tab="Atoms")
    ok(at)
    assert any("without shortcuts" in i.value for i in at.info)
    assert "atoms" not in at.query_params and "sees" not in at.query_params  # (its Atoms tab has no such choice)
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(dict(model="sdnet18-w8.pt", tab="Atoms", atoms="conv1", sees="conv1"))
    again.run()
    assert not again.exception and [w.value for w in again.warning if "address" in w.value] == [
        "Not used from the page's address (the page's own settings instead): atoms, sees: sdnet18-w8.pt has "
        "shortcuts (its Atoms tab shows the first layer's alone)."]
    assert [r["name"] for r in at.session_state["view"].probe["layers"]] == ["conv1"]
    assert any("No model card" in w.value for w in at.sidebar.warning)
    # its only CSC layer is the stem, which no shortcut bypasses: all zeros there, and any image gets this answer
    at.select_slider(key="lam").set_value(10.0).run()
    assert any("from conv1 on nothing depends on the image" in w.value for w in at.warning), [w.value for w in at.warning]


def test_latency_benchmark_runs(checkpoint_dir, monkeypatch):
    """bench/app_latency.py (its numbers are in bench/README.md) times real probes through the app's cache."""
    app_latency = bench_module("app_latency")
    ckpt = sorted(checkpoint_dir.glob("sdnet18_all*.pt"))[0]
    result = app_latency.main(["--checkpoint", str(ckpt), "--repeats", "3", "--threads", "1", "--json"])
    timing = result["probe"]["1 thread"]
    assert result["csc_layers"] == 17 and timing["n"] == 3 and 0 < timing["min_ms"] <= timing["median_ms"]
    assert "load average" in result["load"]
    # a relative path (its help's default is one) crashed; a missing file or sample was a traceback
    monkeypatch.chdir(ckpt.parent)
    assert app_latency.main(["--checkpoint", ckpt.name, "--repeats", "1", "--threads", "1", "--json"])["csc_layers"] == 17
    for args, said in ((["--checkpoint", "nope.pt"], "error: no file at"), (["--sample", "dog_99"], "not an image of")):
        with pytest.raises(SystemExit, match=said):
            app_latency.main([*args, "--checkpoint", ckpt.name] if "--sample" in args else args)


def test_the_fit_hint_is_one_shell_command_and_jpeg_takes_its_other_names(tmp_path):
    """A checkpoint named 'my model (copy).pt' gave a hint that was a syntax error in bash; a JPEG saved as .jfif
    (as browsers on Windows save them) was refused by the upload box as 'not allowed'."""
    import shlex
    from app import state
    path = tmp_path / "my model (copy).pt"
    words = shlex.split(state.fit_hint(path))
    assert words[words.index("--checkpoint") + 1] == str(path) and words[-1] == "reports/my model (copy)"
    assert {"jfif", "jpe"} <= set(images.SUFFIXES)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="JPEG")
    assert images.prepare_image(buf.getvalue(), 8).tensor.shape == (3, 8, 8)  # decoded by content, not by name


def test_every_layer_with_its_own_lambda_is_said_so_and_has_no_lambda_path(app, checkpoint_dir):
    """With all 17 layers at 0.2 and the slider at 0.5, the legend read 'SDNet at λ=0.5 (17 layers with their own)'
    (no layer at 0.5, 0.2 never named), and the Export caption promised a lam_path.csv it did not offer."""
    at = app()
    names = at.multiselect(key="lam_layers").options
    at.select_slider(key="lam").set_value(0.5).run()
    for name in names:
        at.session_state[f"lam_layer:{name}"] = 0.2
    at.multiselect(key="lam_layers").set_value(names).run()
    at.session_state["tab"] = "Export"
    at.run()
    ok(at)
    specs = " ".join(json.dumps(json.loads(c.proto.spec), ensure_ascii=False) for c in at.get("plotly_chart"))
    assert "SDNet at λ=0.2 in every layer" in specs and "layers with their own" not in specs
    caption = next(c.value for c in at.caption if c.value.startswith("PNGs of what is on the page"))
    assert "lam_path.csv" not in caption and "lam_path.csv" not in [b.label for b in at.get("download_button")]
    at.selectbox(key="ckpt").set_value(_resnet_name(checkpoint_dir)).run()  # ...as the reset's toast says it
    assert [t.value for t in at.toast][0].startswith("λ=0.2 in every layer, 2 steps dropped")


def test_a_model_of_the_same_layers_keeps_what_is_looked_at(app, checkpoint_dir, tmp_path):
    """e40 to e30 (one architecture) reset the Layers tab's layer and count and the Atoms tab's layers, unsaid:
    comparing two trainings on one layer is what the switch is for. Another architecture starts afresh."""
    at = app()
    names = at.selectbox(key="layer").options
    at.selectbox(key="layer").set_value(names[5]).run()
    at.slider(key="n_codes").set_value(4).run()
    at.session_state["atoms_layer"], at.session_state["sees_layers"] = names[3], [names[0], names[9]]
    at.run()
    other = tmp_path / "other.pt"  # the same architecture, as another file
    other.write_bytes(next(checkpoint_dir.glob("sdnet18_all*.pt")).read_bytes())
    at.session_state["ckpt_path"] = str(other)
    at.selectbox(key="ckpt").set_value("Other path...").run()
    ok(at)
    assert at.session_state["view"].settings["checkpoint"]["path"].endswith("other.pt")
    assert (at.selectbox(key="layer").value, at.slider(key="n_codes").value) == (names[5], 4)
    assert at.session_state["atoms_layer"] == names[3] and at.session_state["sees_layers"] == [names[0], names[9]]
    at.selectbox(key="ckpt").set_value(_resnet_name(checkpoint_dir)).run()  # no CSC layers: then all afresh
    at.selectbox(key="ckpt").set_value("Other path...").run()
    ok(at)
    assert at.selectbox(key="layer").value == names[0] and at.slider(key="n_codes").value != 4


def test_a_count_shown_is_kept_through_a_look_at_a_narrower_layer(app):
    """40 atoms shown of layer4.1.conv2, a look at layer1.0.conv1 (16 channels at width 16) and back: it was 16, and
    the address had lost atoms_shown=40. The same for the code maps' count."""
    at = app()
    names = at.selectbox(key="layer").options
    wide, narrow = names[-1], names[1]
    for tab, key, layer_key in (("Layers", "n_codes", "layer"), ("Atoms", "n_atoms", "atoms_layer")):
        at.session_state["tab"] = tab
        at.run()
        at.selectbox(key=layer_key).set_value(wide).run()
        at.slider(key=key).set_value(40).run()
        at.selectbox(key=layer_key).set_value(narrow).run()
        assert at.slider(key=key).value == at.slider(key=key).max < 40
        at.selectbox(key=layer_key).set_value(wide).run()
        ok(at)
        assert at.slider(key=key).value == 40, key
    assert at.query_params["atoms_shown"] == "40" and at.query_params["codes_shown"] == "40"
    at.selectbox(key="atoms_layer").set_value(narrow).run()
    at.slider(key="n_atoms").set_value(5).run()  # a count set on the narrow layer is the one asked for from then
    at.selectbox(key="atoms_layer").set_value(wide).run()
    assert at.slider(key="n_atoms").value == 5


def test_the_baseline_switched_off_is_kept_by_a_reload_and_a_link(app, checkpoint_dir):
    """Off, a reload brought the ResNet baseline back: the address now says baseline=0 (on unless said), and Back to
    an address without it turns it on again."""
    from streamlit.testing.v1 import AppTest
    at = app()
    assert at.toggle(key="compare").value and "baseline" not in at.query_params
    assert at.session_state["view"].settings["baseline"].startswith("resnet")
    at.toggle(key="compare").set_value(False).run()
    ok(at)
    link = dict(at.query_params)
    assert link["baseline"] == "0" and at.session_state["view"].settings.get("baseline") is None
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(link)
    again.run()
    ok(again)
    assert again.toggle(key="compare").value is False and again.session_state["view"].settings.get("baseline") is None
    assert not any("address" in w.value for w in again.warning)
    at.query_params.clear()  # Back to an address of before
    at.query_params.update({k: v for k, v in link.items() if k != "baseline"})
    at.run()
    ok(at)
    assert at.toggle(key="compare").value is True
    at.toggle(key="compare").set_value(False).run()
    at.selectbox(key="ckpt").set_value(_resnet_name(checkpoint_dir)).run()  # no toggle there: no baseline=0
    ok(at)
    assert "baseline" not in at.query_params


def _png_with_trns(width: int, bits: int, colour_type: int, row: bytes, trns: bytes) -> bytes:
    """A square PNG of `row` repeated, written chunk by chunk: PIL writes neither low-bit grey nor 16-bit colour
    with a tRNS."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, width, bits, colour_type, 0, 0, 0))
            + chunk(b"tRNS", trns) + chunk(b"IDAT", zlib.compress((b"\x00" + row) * width)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits, row, clear", [(1, bytes([0b01000000]), 1), (2, bytes([0b00011011]), 2),
                                              (4, bytes([0x01, 0x23]), 2)])
def test_a_low_bit_grayscale_png_with_a_transparent_value_is_composited_onto_white(bits, row, clear):
    """PIL scales 2- and 4-bit grey to 8 bits and kept the file's value (2 of 0-3, pixels read 170): the
    transparent pixel showed opaque, with the note "fully opaque". (1 bit: PIL itself says 255, left so.)"""
    import struct
    prepared = images.prepare_image(_png_with_trns(4, bits, 0, row, struct.pack(">H", clear)), size=4)
    assert prepared.alpha is not None and (prepared.alpha[:, clear] == 0).all(), prepared.notes
    assert (prepared.alpha.sum(axis=1) == 3).all()  # one column of the four transparent
    assert images.to_uint8(prepared.tensor)[0, 0].tolist() == [0, 0, 0]  # value 0: black, opaque
    assert not any("fully opaque" in n for n in prepared.notes) and any("composited" in n for n in prepared.notes)


def test_a_16_bit_colour_png_with_a_transparent_colour_is_said_to_be_shown_opaque():
    """PIL reads 16-bit colour as 8 bits (the high byte): the colour the file names cannot be matched, and the
    note said "fully opaque"."""
    import struct
    data = _png_with_trns(2, 16, 2, struct.pack(">6H", 1000, 2000, 3000, 65535, 0, 0), struct.pack(">3H", 1000, 2000, 3000))
    prepared = images.prepare_image(data, size=2)
    assert prepared.alpha is None
    assert any("(1000, 2000, 3000) is named at 16 bits" in n and "shown opaque" in n for n in prepared.notes)
    assert not any("fully opaque" in n for n in prepared.notes), prepared.notes


def test_every_colour_bar_has_at_least_two_labels():
    """Plotly's own ticks (nticks=4) spaced an attribution map of peak 4.44 at 5: its bar read a lone '0'."""
    from app import plots
    amap = np.zeros((8, 8))
    amap[0, 0], amap[1, 1] = 4.44, -4.44
    bar = plots.overlay(np.zeros((8, 8, 3)), amap, True, "occlusion").data[1].colorbar
    assert list(bar.tickvals) == [-2.5, 0.0, 2.5] and list(bar.ticktext) == ["-2.5", "0", "2.5"]
    for peak in np.geomspace(1e-6, 1e6, 400):  # every range: two to five labels, all on the bar
        for lo in (-peak, 0.0):
            ticks = plots.scale_ticks(lo, peak)
            assert 2 <= len(ticks) <= 5 and lo - 1e-9 * peak <= min(ticks) and max(ticks) <= peak * (1 + 1e-9), (lo, peak)
    codes = plots.code_grid(np.full((2, 4, 4), 47.0), [0, 1], np.ones(2)).data[0].colorbar
    assert len(codes.tickvals) >= 2 and codes.title.text == "z"


def test_a_classs_bars_read_down_in_the_legends_order():
    """Plotly stacks a group's horizontal bars from the bottom: the legend read red, blue, grey and the bars, from
    the top, grey, blue, red."""
    from app import plots
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    pred = plots.predictions(list("abcd"), [("SDNet", "current", probs), ("trained", "trained", probs),
                                            ("ResNet", "resnet", probs)], 2)
    # the legend in the order given; the axis top down, the highest class first, and in a group the first series
    assert [t.name.strip() for t in pred.data] == ["SDNet", "trained", "ResNet"]
    assert pred.layout.yaxis.autorange == "reversed" and list(pred.data[0].y) == ["d", "c"]
