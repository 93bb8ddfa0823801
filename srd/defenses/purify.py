"""Test-time pixel purification: transform every test image before captioning.

The recipes of the pixel-based baselines in CleanSight's comparison:

* ``blur``: Gaussian blur of radius ``factor * share * min(H, W)`` (0.7 * 0.06 * min(H, W)),
  blended with the original at ``alpha`` (0.7 blurred + 0.3 original);
* ``spatial``: left-right flip, shrink by ``scale`` and pad back to the size (centred, edge
  colour 0), rotation by ``angle`` degrees (bilinear, black corners).

The shrink scale and the rotation angle are flags (defaults 0.9 and 10 degrees, our choice).
No refine-tune: the backdoored checkpoint is used as it is; ``eval/evaluate.py --defense NAME``
applies the transform to clean and triggered test images alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from srd.config import arg
from srd.defenses.registry import Defense, Transform, register_defense
from srd.flags import SHARE, between, positive


def blur_radius(height: int, width: int, share: float, factor: float) -> float:
    return factor * share * min(height, width)


def blur_image(image: np.ndarray, radius: float, alpha: float) -> np.ndarray:
    """``alpha * GaussianBlur(image, radius) + (1 - alpha) * image``, uint8."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    blurred = pil.filter(ImageFilter.GaussianBlur(radius=radius))
    return np.asarray(Image.blend(pil, blurred, alpha), np.uint8)


def spatial_image(image: np.ndarray, flip: bool, scale: float, angle: float) -> np.ndarray:
    """Flip, shrink-and-pad (centred, black) and rotate; same size, uint8."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    w, h = pil.size
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scale != 1.0:
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (w, h))
        canvas.paste(
            pil.resize((sw, sh), Image.Resampling.BILINEAR), ((w - sw) // 2, (h - sh) // 2)
        )
        pil = canvas
    if angle:
        pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.asarray(pil, np.uint8)


@dataclass
class BlurArgs:
    """blur: the Gaussian radius and the blend."""

    blur_radius_share: float = arg(
        0.06,
        help="Gaussian radius as a share of min(H, W), before the factor",
        check=between(0, 1, low_open=True),
    )
    blur_radius_factor: float = arg(
        0.7, help="factor on the radius (CleanSight: 0.7)", check=positive()
    )
    blur_alpha: float = arg(0.7, help="weight of the blurred image in the blend", check=SHARE)


@dataclass
class SpatialArgs:
    """spatial: the flip, the shrink and the rotation."""

    spatial_scale: float = arg(
        0.9, help="shrink factor before padding back to size", check=between(0, 1, low_open=True)
    )
    spatial_angle: float = arg(10.0, help="rotation in degrees", check=between(-180, 180))
    spatial_flip: bool = arg(True, help="mirror the image left-right")


class TestTimeDefense(Defense):
    kind = "test_time"
    changes_images = True


@register_defense("blur")
class Blur(TestTimeDefense):
    """Gaussian blur purification of the test images."""

    Args = BlurArgs

    def transform(self) -> Transform:
        a = self.args

        def apply(image: np.ndarray) -> np.ndarray:
            r = blur_radius(
                image.shape[0], image.shape[1], a.blur_radius_share, a.blur_radius_factor
            )
            return blur_image(image, r, a.blur_alpha)

        return apply

    def describe(self) -> dict[str, Any]:
        a = self.args
        return {
            **super().describe(),
            "radius_share": a.blur_radius_share,
            "radius_factor": a.blur_radius_factor,
            "alpha": a.blur_alpha,
        }


@register_defense("spatial")
class Spatial(TestTimeDefense):
    """Spatial-transform purification (flip + shrink-and-pad + rotation) of the test images."""

    Args = SpatialArgs

    def transform(self) -> Transform:
        a = self.args
        return lambda image: spatial_image(image, a.spatial_flip, a.spatial_scale, a.spatial_angle)

    def describe(self) -> dict[str, Any]:
        a = self.args
        return {
            **super().describe(),
            "flip": a.spatial_flip,
            "scale": a.spatial_scale,
            "angle": a.spatial_angle,
        }
