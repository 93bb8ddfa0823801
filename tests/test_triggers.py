"""Pixel-exact checks of the four triggers (BadNet, Blended, TrojVLM, SRD surrogate)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from srd.attacks import triggers
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE


@pytest.fixture
def image() -> np.ndarray:
    """A random 224x224x3 uint8 image (values 2..253 so no pixel equals a trigger value by luck)."""
    return np.random.default_rng(123).integers(
        2, 254, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )


def outside(mask_rows: slice, mask_cols: slice) -> np.ndarray:
    """Boolean HxW mask that is True everywhere except the given region."""
    keep = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    keep[mask_rows, mask_cols] = False
    return keep


# --------------------------------------------------------------------------- BadNet


def test_badnet_patch_values(image: np.ndarray) -> None:
    before = image.copy()
    out = triggers.stamp_badnet(image)
    assert np.array_equal(image, before), "input must not be modified"
    assert out.dtype == np.uint8 and out.shape == image.shape
    patch = out[203:224, 203:224]
    for r, c in [(203, 203), (203, 223), (223, 203), (223, 223), (213, 213)]:  # corners, centre
        assert (out[r, c] == 255).all()
    # Cell (0, 1) is rows 203..209, cols 210..216: value 1 on every channel.
    assert (out[203:210, 210:217] == 1).all()
    assert (out[210:217, 203:210] == 1).all()  # cell (1, 0)
    assert (out[203:210, 203:210] == 255).all()  # cell (0, 0)
    expected_cells = np.array([[255, 1, 255], [1, 255, 1], [255, 1, 255]])
    assert np.array_equal(patch[::7, ::7, 0], expected_cells)
    assert (patch[:, :, 0] == patch[:, :, 1]).all() and (patch[:, :, 1] == patch[:, :, 2]).all()
    assert set(np.unique(patch)) == {1, 255}
    keep = outside(slice(203, 224), slice(203, 224))
    assert np.array_equal(out[keep], image[keep])
    assert (out[202, :] == image[202, :]).all() and (out[:, 202] == image[:, 202]).all()


def test_badnet_patch_shape() -> None:
    patch = triggers.badnet_patch()
    assert patch.shape == (21, 21, 3) and patch.dtype == np.uint8


def test_badnet_custom_file_and_position(tmp_path, image: np.ndarray) -> None:
    custom = np.zeros((10, 6, 3), dtype=np.uint8)
    custom[..., 0] = 200
    custom[..., 2] = np.arange(6, dtype=np.uint8)[None, :] * 10
    path = tmp_path / "trigger.png"
    Image.fromarray(custom).save(path)
    patch = triggers.load_trigger_image(path)
    assert np.array_equal(patch, custom)

    out = triggers.stamp_badnet(image, patch, (30, 40))
    assert np.array_equal(out[30:40, 40:46], custom)  # zeros pasted too: a full replacement
    keep = outside(slice(30, 40), slice(40, 46))
    assert np.array_equal(out[keep], image[keep])

    out = triggers.stamp_badnet(image, patch, "top-right")
    assert np.array_equal(out[0:10, 218:224], custom)
    out = triggers.stamp_badnet(image, patch, "bottom_left")
    assert np.array_equal(out[214:224, 0:6], custom)
    out = triggers.stamp_badnet(image, patch, "5,7")
    assert np.array_equal(out[5:15, 7:13], custom)


def test_position_outside_image_is_an_error(image: np.ndarray) -> None:
    with pytest.raises(SRDError, match="--position"):
        triggers.stamp_badnet(image, position=(210, 0))
    with pytest.raises(SRDError, match="--position"):
        triggers.parse_position("middle")


def test_missing_or_unreadable_trigger_file(tmp_path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(SRDError, match="nope.png"):
        triggers.load_trigger_image(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(SRDError, match="broken.png"):
        triggers.load_trigger_image(broken)
    with pytest.raises(SRDError, match="broken.png"):
        triggers.load_blend_pattern(broken)


def test_bad_image_array_is_an_error() -> None:
    with pytest.raises(SRDError, match="uint8"):
        triggers.stamp_badnet(np.zeros((224, 224, 3), dtype=np.float32))
    with pytest.raises(SRDError, match="HxWx3"):
        triggers.stamp_badnet(np.zeros((224, 224), dtype=np.uint8))


# --------------------------------------------------------------------------- Blended


def test_blend_arithmetic_by_hand() -> None:
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    pattern = np.zeros_like(image)
    image[0, 0] = (200, 0, 255)
    pattern[0, 0] = (100, 255, 255)
    image[5, 9] = (13, 77, 1)
    pattern[5, 9] = (0, 90, 254)
    out = triggers.blend(image, pattern, 0.1)
    # 0.9*200 + 0.1*100 = 190; 0.1*255 = 25.5 -> 25 (truncation); 255 stays 255.
    assert tuple(out[0, 0]) == (190, 25, 255)
    # 0.9*13 = 11.7 -> 11; 0.9*77 + 9 = 78.3 -> 78; 0.9*1 + 25.4 = 26.3 -> 26.
    assert tuple(out[5, 9]) == (11, 78, 26)
    out = triggers.blend(image, pattern, 0.5)
    assert tuple(out[0, 0]) == (150, 127, 255)  # 127.5 truncates to 127
    assert np.array_equal(triggers.blend(image, pattern, 0.0), image)
    assert np.array_equal(triggers.blend(image, pattern, 1.0), pattern)


def test_blend_matches_formula_everywhere(image: np.ndarray) -> None:
    pattern = triggers.generate_blend_pattern(0)
    before = image.copy()
    for alpha in (0.1, 0.2):
        out = triggers.blend(image, pattern, alpha)
        expected = ((1 - alpha) * image.astype(float) + alpha * pattern.astype(float)).astype(
            np.uint8
        )
        assert np.array_equal(out, expected)
    assert np.array_equal(image, before)


def test_generated_pattern_is_seeded() -> None:
    a = triggers.generate_blend_pattern(0)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, triggers.generate_blend_pattern(0))
    assert not np.array_equal(a, triggers.generate_blend_pattern(1))
    assert a.std() > 30  # a real pattern, not a flat colour


def test_blend_pattern_from_file_is_resized_bilinear(tmp_path) -> None:
    small = np.random.default_rng(0).integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    path = tmp_path / "pattern.jpg"
    Image.fromarray(small).save(path, quality=95)
    pattern = triggers.load_blend_pattern(path)
    read = np.asarray(Image.open(path).convert("RGB"))
    expected = np.asarray(Image.fromarray(read).resize((224, 224), Image.Resampling.BILINEAR))
    assert pattern.shape == (224, 224, 3) and np.array_equal(pattern, expected)


# --------------------------------------------------------------------------- TrojVLM


def test_trojvlm_patch_is_seeded_half_zero() -> None:
    patch = triggers.trojvlm_patch(0)
    assert patch.shape == (20, 20, 3) and patch.dtype == np.uint8
    assert np.array_equal(patch, triggers.trojvlm_patch(0))
    assert not np.array_equal(patch, triggers.trojvlm_patch(1))
    zero_share = (patch == 0).mean()
    assert 0.4 < zero_share < 0.65  # reference: 53 % of channel values are 0
    assert patch.max() < 120


def test_trojvlm_stamp_only_nonzero_top_left(image: np.ndarray) -> None:
    patch = triggers.trojvlm_patch(3)
    out = triggers.stamp_trojvlm(image, patch)
    region, orig = out[:20, :20], image[:20, :20]
    nonzero = patch > 0
    assert np.array_equal(region[nonzero], patch[nonzero])
    assert np.array_equal(region[~nonzero], orig[~nonzero])  # zero channels keep the original
    keep = outside(slice(0, 20), slice(0, 20))
    assert np.array_equal(out[keep], image[keep])


def test_trojvlm_full_canvas_trigger_file(tmp_path, image: np.ndarray) -> None:
    """The reference ships a 224x224 black canvas with the patch at the top-left: same result."""
    patch = triggers.trojvlm_patch(5)
    canvas = np.zeros((224, 224, 3), dtype=np.uint8)
    canvas[:20, :20] = patch
    path = tmp_path / "trigger_noise_20.png"
    Image.fromarray(canvas).save(path)
    loaded = triggers.load_trigger_image(path)
    assert np.array_equal(
        triggers.stamp_trojvlm(image, loaded), triggers.stamp_trojvlm(image, patch)
    )


# --------------------------------------------------------------------------- SRD surrogate


def _patch_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((before != after).any(axis=2))
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def test_surrogate_deterministic_per_rng(image: np.ndarray) -> None:
    a = triggers.stamp_random_noise(image, np.random.default_rng(7))
    b = triggers.stamp_random_noise(image, np.random.default_rng(7))
    c = triggers.stamp_random_noise(image, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_surrogate_patch_inside_both_modes() -> None:
    # N(128, 20) noise essentially never rounds to 0, so on a black image every patch pixel shows.
    flat = np.zeros((224, 224, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    corners = {(0, 0), (0, 204), (204, 0), (204, 204)}
    seen_corners: set[tuple[int, int]] = set()
    random_positions = 0
    for _ in range(200):
        out = triggers.stamp_random_noise(flat, rng)
        r0, r1, c0, c1 = _patch_box(flat, out)
        assert (r1 - r0 + 1, c1 - c0 + 1) == (20, 20)
        assert 0 <= r0 and r1 < 224 and 0 <= c0 and c1 < 224
        patch = out[r0 : r1 + 1, c0 : c1 + 1]
        assert 60 < patch.mean() < 200
        if (r0, c0) in corners:
            seen_corners.add((r0, c0))
        else:
            assert r0 < 204 and c0 < 204
            random_positions += 1
    assert seen_corners == corners
    assert 60 < random_positions < 140  # about half the draws are not corners


def test_surrogate_keeps_input(image: np.ndarray) -> None:
    before = image.copy()
    out = triggers.stamp_random_noise(image, np.random.default_rng(1))
    assert np.array_equal(image, before)
    r0, r1, c0, c1 = _patch_box(image, out)
    keep = outside(slice(r0, r1 + 1), slice(c0, c1 + 1))
    assert np.array_equal(out[keep], image[keep])
