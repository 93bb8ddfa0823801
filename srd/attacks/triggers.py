"""Trigger images and how they are stamped onto the 224x224 canvas (pixel-exact).

Every function takes an HxWx3 uint8 RGB array (normally ``IMAGE_SIZE`` square) and returns a
new array; inputs are never modified. Four triggers (reference §5, §15 items 6-9):

- BadNet: a 21x21 checkerboard of 7-px cells (values 255/1) pasted at the bottom-right corner.
- Blended: ``(1 - alpha) * image + alpha * pattern`` with a file pattern or a seeded generated one.
- TrojVLM: a seeded 20x20 ``clip(N(0, 20))`` noise patch at the top-left, stamped where non-zero.
- SRD surrogate: a 20x20 ``N(128, 20)`` patch at a random corner (p = 1/2) or a random position.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE

BADNET_CELL = 7
"""Side of one checkerboard cell in pixels (the reference's 32 px grid resized to 224, nearest)."""

BADNET_CELLS = 3
"""Cells per side of the BadNet checkerboard (21x21 pixels in all)."""

BADNET_LOW = 1
"""Value of the dark checkerboard cells (the reference's grid uses 1, not 0)."""

NOISE_PATCH_SIZE = 20
"""Side of the TrojVLM and surrogate noise patches."""

TROJVLM_STD = 20.0
"""Standard deviation of the TrojVLM noise, N(0, 20) clipped to [0, 255]."""

SURROGATE_MEAN = 128.0
SURROGATE_STD = 20.0

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
"""Named positions a patch can be pasted at (besides an explicit top-left row, col)."""

Position = str | tuple[int, int] | list[int] | None
"""A corner name, "row,col", or a (row, col) top-left; None means the default place."""


# --------------------------------------------------------------------------- validation / helpers


def check_image(image: np.ndarray) -> np.ndarray:
    """Raise SRDError unless ``image`` is an HxWx3 uint8 array; return it unchanged."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise SRDError(f"expected an HxWx3 RGB image array, got {shape}")
    if image.dtype != np.uint8:
        raise SRDError(f"expected a uint8 image, got dtype {image.dtype}")
    return image


def load_trigger_image(path: str | os.PathLike, flag: str = "--trigger_path") -> np.ndarray:
    """Read a PNG/JPEG trigger file as an HxWx3 uint8 RGB array; SRDError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SRDError(f"{flag} {path}: trigger file not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SRDError(f"{flag} {path}: cannot read trigger image ({exc})") from None


def fingerprint(array: np.ndarray) -> str:
    """Short sha256 of an array's shape and bytes, so run records pin the exact trigger."""
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def parse_position(position: Position, flag: str = "--position") -> str | tuple[int, int] | None:
    """Normalise a position: a corner name, a ``(row, col)`` top-left, "row,col", or None.

    Corner names accept ``-``/space for ``_`` and any case (``"Bottom-Right"``).
    """
    if position is None:
        return None
    if isinstance(position, str):
        text = position.strip().lower().replace("-", "_").replace(" ", "_")
        if text in CORNERS:
            return text
        parts = text.split(",")
        if len(parts) == 2:
            try:
                return int(parts[0]), int(parts[1])
            except ValueError:
                pass
        raise SRDError(
            f"{flag} {position!r}: expected one of {', '.join(CORNERS)} or 'row,col' (top-left)"
        )
    if isinstance(position, (list, tuple)) and len(position) == 2:
        try:
            return int(position[0]), int(position[1])
        except (TypeError, ValueError):
            pass
    raise SRDError(f"{flag} {position!r}: expected a corner name or a (row, col) pair")


def resolve_position(
    position: Position, patch_shape: tuple[int, ...], image_shape: tuple[int, ...]
) -> tuple[int, int]:
    """Top-left (row, col) of a patch; SRDError when the patch would leave the image."""
    ph, pw = patch_shape[:2]
    ih, iw = image_shape[:2]
    pos = parse_position(position)
    if pos is None:
        pos = "top_left"
    if isinstance(pos, str):
        row = 0 if pos.startswith("top") else ih - ph
        col = 0 if pos.endswith("left") else iw - pw
    else:
        row, col = pos
    if row < 0 or col < 0 or row + ph > ih or col + pw > iw:
        raise SRDError(
            f"--position {position!r}: a {ph}x{pw} trigger at top-left ({row}, {col}) does not fit "
            f"inside the {ih}x{iw} image"
        )
    return row, col


def paste_patch(image: np.ndarray, patch: np.ndarray, row: int, col: int) -> np.ndarray:
    """Copy of ``image`` with ``patch`` (hxwx3 uint8) replacing the pixels at (row, col)."""
    out = check_image(image).copy()
    h, w = patch.shape[:2]
    out[row : row + h, col : col + w] = patch
    return out


def stamp_nonzero(image: np.ndarray, patch: np.ndarray, row: int, col: int) -> np.ndarray:
    """Copy of ``image`` taking the patch value wherever it is non-zero, per channel.

    This is the reference's mask-free stamping: channels where the patch is 0 keep the original.
    """
    out = check_image(image).copy()
    h, w = patch.shape[:2]
    region = out[row : row + h, col : col + w]
    np.copyto(region, patch, where=patch > 0)
    return out


# --------------------------------------------------------------------------- BadNet


def badnet_patch() -> np.ndarray:
    """The 21x21x3 BadNet checkerboard: cell (i, j) is 255 when i + j is even, else 1."""
    cells = np.indices((BADNET_CELLS, BADNET_CELLS)).sum(axis=0) % 2 == 0
    board = np.where(cells, 255, BADNET_LOW).astype(np.uint8)
    board = np.kron(board, np.ones((BADNET_CELL, BADNET_CELL), dtype=np.uint8))
    return np.repeat(board[:, :, None], 3, axis=2)


def stamp_badnet(
    image: np.ndarray, patch: np.ndarray | None = None, position: Position = "bottom_right"
) -> np.ndarray:
    """Paste a BadNet patch (default: the checkerboard at rows/cols 203..223) onto a copy.

    ``patch`` may be any hxwx3 uint8 trigger (e.g. from :func:`load_trigger_image`); it replaces
    the covered pixels entirely.
    """
    check_image(image)
    patch = badnet_patch() if patch is None else check_image(patch)
    row, col = resolve_position(position, patch.shape, image.shape)
    return paste_patch(image, patch, row, col)


# --------------------------------------------------------------------------- Blended


def generate_blend_pattern(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A seeded (size, size, 3) uint8 pattern: a smooth colour wash plus diagonal stripes.

    Stands in for the reference's Hello-Kitty photo: full-image, mixed low and high frequencies,
    a different look per channel. Pure numpy, so the same seed gives the same bytes everywhere.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    pattern = np.empty((size, size, 3), dtype=np.float64)
    for c in range(3):
        # Smooth wash: one low-frequency wave (0.5-1.5 cycles per image) in a random direction.
        theta, freq, phase = (
            rng.uniform(0, math.pi),
            rng.uniform(0.5, 1.5),
            rng.uniform(0, 2 * math.pi),
        )
        wash = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        # Stripes: 6-14 cycles per image, another random direction.
        theta, freq, phase = (
            rng.uniform(0, math.pi),
            rng.uniform(6, 14),
            rng.uniform(0, 2 * math.pi),
        )
        stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        pattern[:, :, c] = 127.5 * (1 + 0.5 * wash + 0.5 * stripes)
    return np.clip(np.rint(pattern), 0, 255).astype(np.uint8)


def load_blend_pattern(
    path: str | os.PathLike, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
) -> np.ndarray:
    """Read a pattern file and resize it (bilinear) to ``size`` = (height, width), uint8."""
    pattern = load_trigger_image(path)
    if pattern.shape[:2] == tuple(size):
        return pattern
    resized = Image.fromarray(pattern).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def blend(image: np.ndarray, pattern: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """``(1 - alpha) * image + alpha * pattern`` in float, clipped to [0, 255], cast (truncated)."""
    check_image(image)
    check_image(pattern)
    if pattern.shape != image.shape:
        raise SRDError(
            f"blend pattern shape {pattern.shape} differs from image shape {image.shape}"
        )
    mixed = (1.0 - alpha) * image.astype(np.float64) + alpha * pattern.astype(np.float64)
    return np.clip(mixed, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- TrojVLM


def trojvlm_patch(seed: int, size: int = NOISE_PATCH_SIZE, std: float = TROJVLM_STD) -> np.ndarray:
    """Seeded (size, size, 3) uint8 patch of ``clip(N(0, std), 0, 255)``, about half zeros."""
    noise = np.random.default_rng(seed).normal(0.0, std, size=(size, size, 3))
    return np.clip(noise, 0, 255).astype(np.uint8)


def stamp_trojvlm(
    image: np.ndarray, patch: np.ndarray, position: Position = "top_left"
) -> np.ndarray:
    """Stamp a TrojVLM patch (default at rows/cols 0..19) wherever its value is non-zero."""
    check_image(image)
    check_image(patch)
    row, col = resolve_position(position, patch.shape, image.shape)
    return stamp_nonzero(image, patch, row, col)


# --------------------------------------------------------------------------- SRD surrogate


def stamp_random_noise(
    image: np.ndarray, rng: np.random.Generator, size: int = NOISE_PATCH_SIZE
) -> np.ndarray:
    """The SRD surrogate trigger: a size x size ``N(128, 20)`` uint8 patch at a random place.

    With probability 1/2 the patch sits in one of the 4 corners (uniform), otherwise its top-left
    is uniform in ``[0, H - size) x [0, W - size)`` (reference ``generate_mask``). The result is
    a function of the image and the state of ``rng`` only. Stamped where the patch is non-zero,
    as the reference's mask rule.
    """
    check_image(image)
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        row, col = resolve_position(CORNERS[int(rng.integers(4))], (size, size), image.shape)
    else:
        row, col = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
    patch = np.clip(rng.normal(SURROGATE_MEAN, SURROGATE_STD, size=(size, size, 3)), 0, 255)
    return stamp_nonzero(image, patch.astype(np.uint8), row, col)


# --------------------------------------------------------------------------- PAR's triggers
# Reference par-soda §1.5. PAR draws its random triggers from Python's unseeded ``random``; here
# every random trigger is drawn from a generator seeded by the attack seed and the image's bytes,
# so a given image always gets the same trigger and runs repeat.

PAR_PATCH_SIZE = 16
"""Side of PAR's BadNet patches at 224 px."""

TRIANGLE_CELL = 14
"""Side of one cell of PAR's Blended-Triangles tile (lower-left half 0.4, upper-right 0.8)."""

WATERMARK_TEXT = "Watermarked"
WATERMARK_BOX = (103, 126, 13, 209)
"""Rows [top, bottom) and columns [left, right) of PAR's text line at 224 px."""


def image_rng(image: np.ndarray, seed: int) -> np.random.Generator:
    """A generator seeded by ``seed`` and the image's bytes (the per-image trigger draw)."""
    digest = hashlib.sha256(check_image(image).tobytes()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def random_corner(rng: np.random.Generator, size: int, canvas: int = IMAGE_SIZE) -> tuple[int, int]:
    """PAR's random patch position: row and column uniform in [0, canvas - 1 - size]."""
    high = canvas - 1 - size
    return int(rng.integers(0, high + 1)), int(rng.integers(0, high + 1))


def stripes_patch(rng: np.random.Generator, size: int = PAR_PATCH_SIZE) -> np.ndarray:
    """(size, size, 3) BadNet-Stripes patch: each column is 255 or 1 per channel (PAR's +-1 after
    its uint8 wrap), constant down the column: 1-px vertical stripes of 8 saturated colours."""
    columns = np.where(rng.random((size, 3)) < 0.5, 255, 1).astype(np.uint8)
    return np.repeat(columns[None, :, :], size, axis=0)


def noise_patch(rng: np.random.Generator, size: int = PAR_PATCH_SIZE) -> np.ndarray:
    """(size, size, 3) uniform random bytes: PAR's random BadNet patch (mean + N(0, 1) wrapped to
    uint8 is near-uniform; drawn uniform here, without the wrap)."""
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def stamp_random_position(
    image: np.ndarray, patch: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Paste ``patch`` at :func:`random_corner` drawn from ``rng``."""
    row, col = random_corner(rng, patch.shape[0], image.shape[0])
    return paste_patch(image, patch, row, col)


def blend_stripes(image: np.ndarray, rng: np.random.Generator, alpha: float = 0.03) -> np.ndarray:
    """PAR's Blended-Stripes: ``(1 - alpha) x + alpha s`` in [0, 1], where each 1-px column of
    ``s`` is +1 or -1 per channel; clipped, scaled to 255 and truncated to uint8."""
    check_image(image)
    h, w = image.shape[:2]
    signs = np.where(rng.random((w, 3)) < 0.5, 1.0, -1.0)
    x = image.astype(np.float64) / 255.0
    mixed = (1.0 - alpha) * x + alpha * signs[None, :, :]
    return (np.clip(mixed, 0, 1) * 255.0).astype(np.uint8)


def triangles_pattern(size: int = IMAGE_SIZE, cell: int = TRIANGLE_CELL) -> np.ndarray:
    """PAR's triangle tile as uint8: in each ``cell`` square, pixels below the diagonal from its
    top-left to bottom-right corner (row > col) are 0.4 * 255 = 102, the rest 0.8 * 255 = 204."""
    rr, cc = np.mgrid[0:size, 0:size] % cell
    values = np.where(rr > cc, 102, 204).astype(np.uint8)
    return np.repeat(values[:, :, None], 3, axis=2)


def watermark_pattern(text: str = WATERMARK_TEXT, size: int = IMAGE_SIZE) -> np.ndarray:
    """PAR's Blended-Text pattern: ``text`` in red (green and blue 0), anti-aliased, fitted into
    :data:`WATERMARK_BOX`. PIL's default font stands in for PAR's NotoSansMono."""
    from PIL import ImageDraw, ImageFont

    top, bottom, left, right = WATERMARK_BOX
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    font_size = bottom - top
    while font_size > 4:
        font = ImageFont.load_default(size=font_size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if x1 - x0 <= right - left and y1 - y0 <= bottom - top:
            break
        font_size -= 1
    x = left + (right - left - (x1 - x0)) // 2 - x0
    y = top + (bottom - top - (y1 - y0)) // 2 - y0
    draw.text((x, y), text, fill=255, font=font)
    red = np.asarray(canvas, dtype=np.uint8)
    pattern = np.zeros((size, size, 3), dtype=np.uint8)
    pattern[:, :, 0] = red
    return pattern


def blend_where_nonzero(image: np.ndarray, pattern: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) x + alpha p`` only where ``p`` is non-zero (per channel), truncated to uint8;
    elsewhere the image is kept (PAR's Blended-Text)."""
    check_image(image)
    check_image(pattern)
    if pattern.shape != image.shape:
        raise SRDError(f"pattern shape {pattern.shape} differs from image shape {image.shape}")
    mixed = (1.0 - alpha) * image.astype(np.float64) + alpha * pattern.astype(np.float64)
    mixed = np.clip(mixed, 0, 255).astype(np.uint8)
    return np.where(pattern > 0, mixed, image)
