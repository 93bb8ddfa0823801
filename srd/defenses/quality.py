"""Image quality of a processed image against its original: PSNR and SSIM (uint8 RGB)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter


def psnr(original: np.ndarray, processed: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all channels (inf for identical images)."""
    diff = original.astype(np.float64) - processed.astype(np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ssim(original: np.ndarray, processed: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01,
    K2 0.03), computed per channel and averaged."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(original.shape[-1]):
        x = original[..., ch].astype(np.float64)
        y = processed[..., ch].astype(np.float64)
        mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
        vx = gaussian_filter(x * x, sigma) - mx * mx
        vy = gaussian_filter(y * y, sigma) - my * my
        cxy = gaussian_filter(x * y, sigma) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


def image_quality(
    ids: Sequence[int],
    original: Callable[[int], np.ndarray],
    processed: Callable[[int], np.ndarray],
) -> dict[str, float | int | None]:
    """Mean/std SSIM and mean PSNR (finite values; identical images count as SSIM 1) over ids."""
    s, p, identical = [], [], 0
    for i in ids:
        a, b = original(i), processed(i)
        s.append(ssim(a, b))
        value = psnr(a, b)
        if np.isfinite(value):
            p.append(value)
        else:
            identical += 1
    return {
        "num_images": len(s),
        "ssim_mean": float(np.mean(s)) if s else None,
        "ssim_std": float(np.std(s)) if s else None,
        "psnr_mean": float(np.mean(p)) if p else None,
        "num_identical": identical,
    }
