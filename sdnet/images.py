"""Images in and out: decode any upload safely to a model input, and turn tensors into pictures.

`prepare_image(data, size)` is the one entry point for user files: it refuses what is not an
image, truncated files, empty files and decompression bombs with an `ImageError` whose message
says what is wrong, converts every mode (grayscale, RGBA, palette, 16-bit, CMYK, ...) to RGB,
and resizes and centre-crops to the model's square input, recording every step it took.
The rest are small, pure helpers to show tensors: atoms as RGB tiles, heatmaps as colours,
grids of tiles and PNG bytes.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000   # width * height above this is refused (a decompression bomb, or just too big)
MAX_BYTES = 50 * 2 ** 20  # files above 50 MiB are refused before decoding
MAX_JPEG_SCANS = 200  # a progressive JPEG has about 10 scans; each more is a pass over the whole picture
# (jfif and jpe: JPEG under the names some browsers save it with; an upload box refused them as "not allowed")
SUFFIXES = ("png", "jpg", "jpeg", "jfif", "jpe", "webp", "bmp", "gif", "tif", "tiff")
# The only decoders an upload may reach (JPEG's also opens a phone's MPO). Pillow otherwise tries every format it
# knows by the file's first bytes, whatever its name: an EPS renamed .png would be handed to Ghostscript.
DECODERS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ValueError):
    """A file that cannot be used as an input image; the message says why, for the user."""


@dataclass
class PreparedImage:
    """A model input made from a user file, and how it was made."""
    tensor: torch.Tensor            # (3, size, size) float32 in [0, 1]
    original_size: tuple[int, int]  # (width, height) of the file
    original_mode: str              # PIL mode of the file ("RGB", "L", "I;16", "CMYK", ...)
    notes: list[str] = field(default_factory=list)  # each conversion step, for the user
    file_sha256: str = ""           # of the file's bytes
    # (size, size) opacity in [0, 1], resized and cropped as the tensor was, where the file has transparent pixels
    # (the tensor is composited onto white there: what the model sees); None for an opaque file. For display only.
    alpha: np.ndarray | None = None
    # the whole (rotated, RGB) file, fit in 320 x 320 px, transparent parts on a checkerboard, dimmed outside the
    # square the model is given; None for a square file. For display only: the model input alone did not show what
    # a crop left out
    preview: np.ndarray | None = None

    @property
    def sha256(self) -> str:
        """Hash of the model input itself (its uint8 pixels)."""
        return image_hash(self.tensor)


def input_size(config: dict) -> int:
    """The square input side a model expects, from its checkpoint config (CIFAR stem: 32)."""
    return 224 if config.get("stem") == "imagenet" else 32


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode `data` fully (first frame), refusing non-images, truncated files and bombs: the image, its size in
    the file and what was done. A JPEG over `max_pixels` is decoded at 1/2, 1/4 or 1/8 scale (its DCT scaling)
    where that brings it under: a 48-megapixel phone photo was refused, for a model that takes 32x32 pixels. Over
    Pillow's own bomb limit (about 179 megapixels) any file is refused as it opens, before that can be tried."""
    if not data:
        raise ImageError("the file is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        # one decimal: '50 MiB; the limit is 50 MiB' read as a refusal at the limit
        raise ImageError(f"the file is {len(data) / 2 ** 20:.1f} MiB; the limit is {MAX_BYTES // 2 ** 20} MiB")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels, under which ours is checked below (after a JPEG's reduced decode);
            # from twice that it raises DecompressionBombError, caught below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODERS)
        full = w, h = img.size
        if w * h > max_pixels and img.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with more pictures in it
            k = next((k for k in (2, 4, 8) if -(-w // k) * -(-h // k) <= max_pixels), None)
            if k is not None:
                img.draft(img.mode, (w // k, h // k))
                w, h = img.size
                notes.append(f"JPEG decoded at 1/{k} scale, {full[0]}x{full[1]} to {w}x{h} (over the "
                             f"{max_pixels / 1e6:.0f} megapixel limit at full size)")
        if w * h > max_pixels:
            raise ImageError(f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                             f"{max_pixels / 1e6:.0f} megapixels: scale it down first (a model input is "
                             "32x32 or 224x224 pixels)")
        if w < 1 or h < 1:
            raise ImageError(f"the image has no pixels ({w}x{h})")
        scans = data.count(b"\xff\xda") if img.format in ("JPEG", "MPO") else 0  # (0xFF in a scan's data is escaped)
        if scans > MAX_JPEG_SCANS:  # each is decoded over the whole picture: 10,000 of 59 bytes took 52 s
            raise ImageError(f"the JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS} (a progressive JPEG has about "
                             "10): re-save it")
        img.seek(0)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow's own, higher limit, tripped as the file opened: that one is quoted (ours quoted here read as if a
        # 150-megapixel JPEG, decoded at 1/2 and used, were over it), with the size Pillow's message gives
        size = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{int(size.group(1)) / 1e6:.0f} megapixels" if size else "too large"
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(f"the image is {what}, over Pillow's {bomb / 1e6:.0f} megapixel limit for any file (a "
                         "decompression bomb is refused before decoding); under it a JPEG is decoded at reduced "
                         f"scale, other images must be under {max_pixels / 1e6:.0f} megapixels") from None
    except UnidentifiedImageError:
        raise ImageError("this file is not an image PIL can read (expected PNG, JPEG, WebP, BMP, GIF or TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"the image could not be decoded (truncated or corrupt file?): {e}") from None
    return img, full, notes


def to_rgb(img: Image.Image) -> tuple[Image.Image, Image.Image | None, list[str]]:
    """Convert any PIL mode to 8-bit RGB; transparent pixels are composited onto white, and the alpha channel
    (mode L) it composited with comes back too (None when no pixel was transparent)."""
    mode, notes = img.mode, []
    if mode == "RGB" and "transparency" not in img.info:  # an RGB PNG may name a transparent colour (tRNS)
        return img, None, notes
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # float32 is exact to 2^24, plenty for 8 bits out; the steps below work in place, so a 40-megapixel
        # 16-bit image needs one float copy (160 MB), not one per step
        arr = np.array(img, dtype=np.float32)
        # a grayscale PNG may name one value transparent (tRNS): those pixels go onto white, as in colour images
        key = img.info.get("transparency") if mode != "F" else None
        clear = arr == float(key) if isinstance(key, int) else None
        if clear is not None and not clear.any():
            clear = None
        if mode == "F":
            bad = ~np.isfinite(arr)
            if bad.any():  # NaN or inf in a float image: say so, rather than let them blacken the whole picture
                arr[bad] = 0.0
                notes.append(f"{int(bad.sum())} NaN or infinite pixel value(s) set to 0")
            del bad
        # the brightest pixel shown (a transparent value goes to white, whatever it is)
        hi = float(arr.max(initial=0.0, where=True if clear is None else ~clear)) if arr.size else 0.0
        if mode.startswith("I;16"):
            # 16 bits per pixel whatever the content: a dark 16-bit image stays dark
            arr *= 255.0 / 65535.0
            notes.append(f"{mode} (16-bit) scaled to 8 bits" + (
                f", as dark as stored (brightest value {hi:.0f} of 65535: 12-bit or fewer data?)" if hi < 4096 else ""))
        elif mode == "F" and hi <= 1.0:
            arr *= 255.0
            notes.append("float image in [0, 1] scaled to 8 bits")
        elif hi > 255:
            # 32-bit integers or floats carry no bit depth: 0-65535 is read as 16-bit, more as HDR
            arr *= 255.0 / (65535.0 if hi <= 65535 else hi)
            notes.append(f"{mode} ({'16-bit range' if hi <= 65535 else 'high dynamic range'}) scaled to 8 bits")
        else:  # 1-255 (integers: any 8-bit picture; floats: 0-10 was shown near black, and said nothing)
            notes.append(f"{'float' if mode == 'F' else '32-bit integer'} values up to {hi:g} read as 8-bit levels "
                         "(0-255)" + (": dark" if hi < 64 else ""))
        below = int((arr <= -0.5).sum())  # (scaled as the brightest says: a float in [-1, 1] read as [0, 1])
        if below:  # clipped to black: said, where the note above spoke of the top of the range alone
            notes.append(f"{below} pixel(s) with values below 0 shown black")
        np.clip(np.rint(arr, out=arr), 0, 255, out=arr)
        alpha = None
        if clear is not None:
            arr[clear] = 255.0
            alpha = Image.fromarray(np.where(clear, np.uint8(0), np.uint8(255)), "L")  # (uint8: no 8-byte copy)
            notes.append(f"{mode} with transparency (value {key}) composited onto white")
        img = Image.fromarray(arr.astype(np.uint8), "L")
        notes.append("grayscale converted to RGB")
        return img.convert("RGB"), alpha, notes
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette image expanded")
        if img.mode == "RGB":
            return img, None, notes
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode != "RGBA" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            notes.append(f"{mode} (fully opaque) converted to RGB")
            return rgba.convert("RGB"), None, notes
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{mode} with transparency composited onto white")
        return Image.alpha_composite(background, rgba).convert("RGB"), rgba.getchannel("A"), notes
    if mode in ("L", "1"):
        notes.append(f"{'black-and-white' if mode == '1' else 'grayscale'} converted to RGB")
    elif mode != "P":
        notes.append(f"{mode} converted to RGB")
    return img.convert("RGB"), None, notes


# A transparent upload's picture shows its transparent parts on light and dark grey squares, as image editors do
# (the model, like the page's white, has white there)
CHECKER = (0.85, 0.65)


def on_checkerboard(picture: np.ndarray, alpha: np.ndarray, square: int) -> np.ndarray:
    """(H, W, 3) in [0, 1], composited onto white with opacity `alpha` (H, W) in [0, 1] -> the same over a
    checkerboard of `square`-pixel squares."""
    ys, xs = np.indices(alpha.shape) // max(1, square)
    board = np.where((ys + xs) % 2 == 0, CHECKER[0], CHECKER[1])[..., None]
    return np.clip(picture + (1 - alpha[..., None]) * (board - 1), 0, 1)


def crop_preview(img: Image.Image, alpha: Image.Image | None = None, side: int = 320,
                 dim: float = 0.3) -> np.ndarray | None:
    """`img` (RGB) fit in side x side pixels (a small one enlarged with nearest neighbours), its transparent parts
    (`alpha`, mode L) on a checkerboard, and the part outside the centre square that fit_to_input keeps dimmed to
    `dim` of its brightness: (H, W, 3) uint8. None for a square."""
    w, h = img.size
    if w == h:
        return None
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))

    def small(picture: Image.Image) -> np.ndarray:
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
        return np.asarray(picture.resize(size, resample, reducing_gap=3.0), dtype=np.float32) / 255
    out = small(img)
    if alpha is not None:
        out = on_checkerboard(out, small(alpha), side // 32)
    keep = np.zeros(out.shape[:2], dtype=bool)  # the square, in preview pixels (rounded out: never hidden)
    sq = min(w, h)
    left, top = (w - sq) // 2, (h - sq) // 2
    keep[int(top * scale):math.ceil((top + sq) * scale), int(left * scale):math.ceil((left + sq) * scale)] = True
    out[~keep] *= dim
    return to_uint8(out)


def fit_to_input(img: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """Centre-crop to a square, then resize it to size x size (antialiased).

    Cropping first means a long, thin image is never scaled up along its length (a 100000 x 1 strip resized
    shorter side first would become 3200000 x 32 pixels)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img, []
    notes = []
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append(f"centre-cropped {w}x{h} to {side}x{side}")
    if side != size:
        scale = size / side
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((size, size), resample=resample, reducing_gap=3.0 if scale < 0.5 else None)
        notes.append(f"resized {side}x{side} -> {size}x{size}")
    return img, notes


def _png_bit_depth(data: bytes) -> int | None:
    """The bits a channel of a PNG file, from its header (IHDR comes first), or None for another file."""
    return data[24] if len(data) > 25 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" else None


def _match_png_transparency(img: Image.Image, bits: int | None, notes: list[str]) -> None:
    """Make a PNG's transparent value (tRNS) name pixels as PIL reads them. PIL scales 2- and 4-bit grey up to
    8 bits but keeps the value the file names (2 of 0-3, where the pixels read 170): the transparent part
    showed opaque, said to be "fully opaque". 16-bit colour it reads as 8 (the high byte): a colour named at 16
    bits cannot be matched there, so the picture is shown opaque, and said to be."""
    key = img.info.get("transparency")
    if bits is None or key is None or img.format != "PNG":
        return
    if isinstance(key, int) and img.mode in ("1", "L") and bits < 8 and key < 2 ** bits:  # (1-bit: PIL says 255)
        img.info["transparency"] = key * 255 // (2 ** bits - 1)
    elif isinstance(key, tuple) and img.mode == "RGB" and bits == 16:
        del img.info["transparency"]
        notes.append(f"its transparent colour {key} is named at 16 bits a channel, which cannot be matched in the "
                     "8 bits read: shown opaque")


def prepare_image(data: bytes, size: int = 32, max_pixels: int = MAX_PIXELS) -> PreparedImage:
    """A user file (bytes) -> the model input (3, size, size) in [0, 1], with every step recorded.

    Raises `ImageError` with a message meant for the user when the file cannot be used.
    """
    if int(size) < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")
    img, original_size, notes = open_image(data, max_pixels)
    original_mode, bits = img.mode, _png_bit_depth(data)
    if img.format == "PNG" and img.mode in ("RGB", "RGBA") and bits == 16:
        # PIL reads 16 bits a channel as 8 without a word (its mode says RGB); a 16-bit grayscale one is said
        notes.append(f"{img.mode} with 16 bits a channel read as 8")
    _match_png_transparency(img, bits, notes)
    try:  # is_animated looks at the second frame alone: n_frames walked a TIFF's every page (60,000 pages, 45 s)
        if getattr(img, "is_animated", False):
            notes.append("first frame used (the file has more)")
    except Exception:  # noqa: BLE001 - a broken pointer to a second page (TypeError, ...): the first decoded fine
        notes.append("first frame used (the rest of the file could not be read)")
    try:
        if img.getexif().get(0x0112, 1) in range(2, 9):  # EXIF orientation, as cameras write it (1: as stored)
            img = ImageOps.exif_transpose(img)
            notes.append("rotated as its EXIF orientation says")
    except Exception:  # noqa: BLE001 - a damaged EXIF block (struct.error on 4 bytes of it): a traceback on the page
        notes.append("its EXIF data could not be read: shown as stored, not rotated")
    img, alpha, conv = to_rgb(img)
    preview = crop_preview(img, alpha)
    img, fit = fit_to_input(img, size)
    tensor = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    if alpha is not None:
        alpha = np.asarray(fit_to_input(alpha, size)[0], dtype=np.float32) / 255
    return PreparedImage(tensor=tensor, original_size=original_size, original_mode=original_mode,
                         notes=notes + conv + fit, file_sha256=hashlib.sha256(data).hexdigest(), alpha=alpha,
                         preview=preview)


def load_rgb_file(path, size: int = 32) -> torch.Tensor:
    """A trusted image file (e.g. a shipped sample) as a (3, size, size) model input."""
    with open(path, "rb") as f:
        return prepare_image(f.read(), size).tensor


# --- showing tensors ------------------------------------------------------------------------

def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A tensor's values as numpy, half floats as float32: numpy has no bfloat16 (a bf16 model's trace could not be
    shown), and a float16 sum over a code overflows."""
    x = x.detach().cpu()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) or (H, W, 3) or (H, W) values in [0, 1], or uint8 0..255 as they are, -> uint8 (H, W, 3) or (H, W)."""
    arr = _as_numpy(image) if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:  # already pixels (scaling them by 255 made every non-zero value white)
        return np.ascontiguousarray(arr)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def image_hash(image: torch.Tensor | np.ndarray) -> str:
    """sha256 of an image's uint8 pixels: the same picture always gets the same name."""
    arr = to_uint8(image)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()


def png_bytes(image: np.ndarray | torch.Tensor, scale: int = 1) -> bytes:
    """PNG of an image in [0, 1] (or uint8), enlarged `scale` times with nearest neighbours."""
    arr = enlarge(to_uint8(image), scale)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def enlarge(picture: np.ndarray, scale: int) -> np.ndarray:
    """(H, W[, C]) -> (scale H, scale W[, C]) with nearest neighbours: pixels stay pixels."""
    return picture.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else picture


def display_rgb(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any (3, H, W) signal -> (H, W, 3) in [0, 1] by one min-max over all channels."""
    arr = _as_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return stretch(arr).transpose(1, 2, 0)


def atom_tiles(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Atoms (C, 3, k, k) -> RGB tiles (C, k, k, 3) in [0, 1]: grey is 0, each atom scaled to its max |w|."""
    w = _as_numpy(weight).astype(np.float32) if isinstance(weight, torch.Tensor) else np.asarray(weight, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"atom_tiles needs RGB atoms (C, 3, k, k), got {w.shape}")
    peak = np.abs(w).reshape(len(w), -1).max(1).clip(1e-12).reshape(-1, 1, 1, 1)
    return (0.5 + 0.5 * w / peak).transpose(0, 2, 3, 1)


def channel_activity(z: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per channel of a code (C, H, W): sum of |z|, how much the image uses each atom."""
    arr = _as_numpy(z) if isinstance(z, torch.Tensor) else np.asarray(z)
    return np.abs(arr).reshape(arr.shape[0], -1).sum(1)


def tile_grid(tiles: np.ndarray, ncols: int | None = None, pad: int | tuple[int, int] = 1,
              fill: float = 1.0) -> np.ndarray:
    """(N, h, w[, 3]) tiles -> one image, row-major, `pad` (or (pad_y, pad_x)) pixels of `fill` between."""
    tiles = np.asarray(tiles)
    n = len(tiles)
    if n == 0:
        raise ValueError("tile_grid needs at least one tile")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    py, px = (pad, pad) if isinstance(pad, int) else pad
    ncols = min(ncols or int(np.ceil(np.sqrt(n))), n)
    nrows = int(np.ceil(n / ncols))
    h, w = tiles.shape[1:3]
    out = np.full((nrows * (h + py) - py, ncols * (w + px) - px, *tiles.shape[3:]), fill, dtype=np.float64)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        out[r * (h + py): r * (h + py) + h, c * (w + px): c * (w + px) + w] = t
    return out


# Exported figures' text is drawn in DejaVu Sans where the system has it (Debian's fonts-dejavu-core, the font
# fontconfig usually brings): Pillow's own font has no λ, Σ or ‖ and drew boxes. Without it, those are spelt out.
_SPELT = {"λ": "lambda", "Σ": "sum", "‖": "||", "−": "-", "·": "|"}


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except ImportError:  # a Pillow without FreeType has only its fixed bitmap font
            return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """`text` as `font` can draw it: its non-ASCII symbols spelt out unless the font is DejaVu Sans."""
    if "DejaVu" in str(getattr(font, "path", "")):
        return text
    return "".join(_SPELT.get(ch, ch if ch.isascii() else "?") for ch in text)


def scored_tiles(tiles: np.ndarray, scores: np.ndarray | None, labels: list[str], ncols: int = 8,
                 cell: int = 64) -> np.ndarray:
    """Ranked tiles (N, h, w, 3) in [0, 1] with their labels, as one RGB picture in [0, 1]: each tile enlarged
    to about `cell` pixels wide, under it (given `scores`) a bar as long as its |score| against the largest (red
    for a positive score, blue for a negative one, none for 0), then its label. A bar chart of atoms that needs
    no plotting library, so it can go in a PNG export; without scores, a grid of labelled tiles."""
    tiles = np.asarray(tiles)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64)
    if not len(tiles) == len(labels) or (scores is not None and len(scores) != len(tiles)):
        raise ValueError(f"scored_tiles needs one score and label per tile, got {len(tiles)} tiles, "
                         f"{'no' if scores is None else len(scores)} scores, {len(labels)} labels")
    peak = float(np.abs(scores).max()) if scores is not None and scores.size else 0.0
    font = _font(11)
    h, w = tiles.shape[1:3]
    scale = max(1, (cell - 8) // max(h, w))
    # as wide as the widest label: "#255 (-3.4e-05)" was cut at both ends in 64 px
    labels = [_drawable(label, font) for label in labels]
    side = max(cell, w * scale + 8, *(int(np.ceil(font.getlength(label))) + 6 for label in labels))
    bar, text = (6 if scores is not None else 0), 14
    cells = []
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        img = Image.new("RGB", (side, h * scale + bar + text + 8), "white")
        img.paste(Image.fromarray(enlarge(to_uint8(tile), scale)), ((side - w * scale) // 2, 0))
        draw = ImageDraw.Draw(img)
        top = h * scale + 3
        if scores is not None:
            draw.rectangle((0, top, side - 1, top + bar - 1), fill=(230, 230, 230))  # the track: the largest |score|
            length = round(abs(scores[i]) / peak * side) if peak > 0 else 0
            if length:
                draw.rectangle((0, top, length - 1, top + bar - 1),
                               fill=(214, 39, 40) if scores[i] > 0 else (31, 119, 180))
        draw.text((side // 2, top + bar + 2), label, fill=(0, 0, 0), font=font, anchor="mt")
        cells.append(np.asarray(img, dtype=np.float64) / 255)
    return tile_grid(np.stack(cells), ncols=ncols, pad=4)


def _wrapped(text: str, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken at spaces, and a word wider than that (a long layer
    name) after its dots or underscores, else anywhere: it ran off the figure's edge."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
            continue
        while font.getlength(word) > width and len(word) > 1:
            fits = max(i for i in range(1, len(word) + 1) if i == 1 or font.getlength(word[:i]) <= width)
            breaks = [i + 1 for i in range(fits - 1) if word[i] in "._/-"]
            cut = breaks[-1] if breaks else fits
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def figure(picture: np.ndarray, title: str, subtitle: str = "", colorbar: tuple[float, float, str] | None = None,
           diverging: bool = False, hot: bool = False) -> np.ndarray:
    """A picture (H, W, 3) in [0, 1] as an exported figure, RGB in [0, 1]: its title (and a grey subtitle) above,
    wrapped to its width, and given `colorbar` = (low, high, label), the colour scale of `colorize` (viridis, or
    blue-white-red when `diverging`, white-yellow-red-black when `hot`) at its right with those values at its ends
    (and 0 in the middle when diverging), so a PNG read alone says what its colours mean."""
    pic = Image.fromarray(to_uint8(picture))
    width, height = pic.size
    pad, font, small = 8, _font(13), _font(11)
    bar = None
    if colorbar is not None:
        low, high, label = colorbar
        ticks = [(0.0, f"{high:.3g}"), (1.0, f"{low:.3g}")] + ([(0.5, "0")] if diverging else [])
        ramp = colorize(np.linspace(high, low, max(height, 2))[:, None].repeat(12, 1), low, high, diverging=diverging,
                        hot=hot)
        text_w = max(font.getlength(t) for _, t in ticks)
        bar = (Image.fromarray(to_uint8(ramp)), ticks, _drawable(label, small))
        extra = 12 + 4 + int(np.ceil(max(text_w, small.getlength(bar[2])))) + pad
    else:
        extra = 0
    total = max(width + extra, 240) + 2 * pad  # room for a readable title over a small picture
    title_lines = _wrapped(_drawable(title, font), font, total - 2 * pad)
    sub_lines = _wrapped(_drawable(subtitle, small), small, total - 2 * pad) if subtitle else []
    head = pad + 17 * len(title_lines) + 14 * len(sub_lines) + pad
    foot = 16 if bar is not None else 0  # the colour bar's label under it
    canvas = Image.new("RGB", (total, head + height + foot + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=(0, 0, 0), font=font)
        y += 17
    for line in sub_lines:
        draw.text((pad, y), line, fill=(90, 90, 90), font=small)
        y += 14
    canvas.paste(pic, (pad, head))
    if bar is not None:
        ramp_img, ticks, label = bar
        x = pad + width + pad
        canvas.paste(ramp_img.resize((12, height), Image.Resampling.NEAREST), (x, head))
        draw.rectangle((x - 1, head - 1, x + 12, head + height), outline=(120, 120, 120))
        for at, text in ticks:
            draw.text((x + 16, head + at * (height - 1)), text, fill=(0, 0, 0), font=font,
                      anchor="lt" if at == 0 else "lb" if at == 1 else "lm")
        draw.text((x, head + height + 3), label, fill=(90, 90, 90), font=small)
    return np.asarray(canvas, dtype=np.float64) / 255


# viridis at 9 evenly spaced points: enough for a faithful linear interpolation
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64) / 255


# plotly's "Hot" reversed (white, yellow, red, black), as the app's magnitude-only attribution maps are drawn
_HOT_R = (np.array([0.0, 0.4, 0.7, 1.0]), np.array([[255, 255, 255], [255, 210, 0], [230, 0, 0], [0, 0, 0]]) / 255)


def colorize(values: np.ndarray, vmin: float | None = None, vmax: float | None = None,
             diverging: bool = False, hot: bool = False) -> np.ndarray:
    """A 2-D (or N x 2-D) array -> RGB in [0, 1]: viridis (or white-yellow-red-black when `hot`), or blue-white-red
    around 0 when diverging. The range comes from the finite values; NaN shows as the bottom of the scale (white when
    diverging), +-inf as its ends."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if diverging:
        peak = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
        t = np.nan_to_num(np.clip(v / peak, -1, 1), nan=0.0)[..., None]
        white, red, blue = np.ones(3), np.array([0.70, 0.09, 0.17]), np.array([0.13, 0.40, 0.67])
        return np.where(t >= 0, white + t * (red - white), white - t * (blue - white))
    lo = (float(finite.min()) if finite.size else 0.0) if vmin is None else vmin
    hi = (float(finite.max()) if finite.size else 0.0) if vmax is None else vmax
    t = np.nan_to_num(np.clip((v - lo) / max(hi - lo, 1e-12), 0, 1), nan=0.0)
    if hot:
        stops, colours = _HOT_R
        return np.stack([np.interp(t, stops, colours[:, k]) for k in range(3)], -1)
    t = t * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f


def finite_peak(values: np.ndarray, absolute: bool = True) -> float:
    """The largest (absolute) finite value, 0 if there is none: a colour scale's end that one NaN does not spoil."""
    v = np.asarray(values, dtype=np.float64)
    v = np.abs(v) if absolute else v
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


def crop_to_support(stack: np.ndarray, margin: int = 1, rel: float = 1e-3) -> np.ndarray:
    """Crop (N, C, H, W) to the smallest window holding every value above `rel` x the max |value|,
    plus `margin` pixels: e.g. a deep atom's receptive field instead of the whole image."""
    arr = np.asarray(stack)
    mask = np.abs(arr).max(axis=(0, 1)) > rel * max(float(np.abs(arr).max()), 1e-12)
    if not mask.any():
        return arr
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    r0, r1 = max(0, rows[0] - margin), min(arr.shape[2], rows[-1] + 1 + margin)
    c0, c1 = max(0, cols[0] - margin), min(arr.shape[3], cols[-1] + 1 + margin)
    return arr[:, :, r0:r1, c0:c1]


def stretch(image: np.ndarray) -> np.ndarray:
    """Min-max an image to [0, 1] over all its channels (to see structure in a faint picture)."""
    arr = np.asarray(image, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / max(hi - lo, 1e-12)
