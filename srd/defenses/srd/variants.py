"""Our variants of SRD's agent (issue 30; none is the reference's, each off by default).

- **Area cost** (``--area_cost C``): the learning reward of stage D2 is the reference table's
  reward minus ``C`` times the share of the 224 canvas the square paints (the clipped square),
  so covering everything stops paying: the 200-px square (80% of the canvas) costs ``0.8 C``,
  a 20-px one ``0.008 C``. D3 keeps the reference's table and keep-best rule.
- **No 200-px square** (``--max_square_side 80``): the agent's action space keeps the squares up
  to that side (400 of the 500 actions; the same numbers), in D2 and D3 (its exploration too).
- **Occlusion map** (``--occlusion_grid N``): a fourth observation channel saying where the
  backdoored captioner's own caption reacts: the image is cut into an N x N grid, each cell is
  painted red in turn (as a mask would), the occluded image is captioned, and the cell's value
  is the word-set distance between that caption and the caption of the unoccluded image
  (:func:`caption_change`: 0 when the caption does not change, 1 when no word is shared). It
  never uses the target word, the trigger or the reference caption: only the defender's own
  model on the defender's own image. It costs N x N extra captions per image, in D2 (each pool
  image once) and in D3 (each cleaned image once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from srd.captions import words
from srd.errors import SRDError
from srd.geometry import GRID, IMAGE_SIZE, MASK_SIZES, RED, decode_action

OCCLUSION_GRIDS = range(2, 8)
"""Grid sides an occlusion map may have (cells of 112 down to 32 px); 0 turns the map off."""

CaptionFn = Callable[[list[np.ndarray]], list[str]]


def check_occlusion_grid(grid: int) -> int:
    """``grid`` if it is 0 (off) or in :data:`OCCLUSION_GRIDS`, else a one-line SRDError."""
    if grid != 0 and grid not in OCCLUSION_GRIDS:
        raise SRDError(
            f"--occlusion_grid {grid}: expected 0 (off) or a grid side from "
            f"{OCCLUSION_GRIDS.start} to {OCCLUSION_GRIDS.stop - 1}"
        )
    return int(grid)


def square_share(action: int) -> float:
    """Share of the 224x224 canvas the (clipped) square of ``action`` paints."""
    sq = decode_action(action)
    return (sq.bottom - sq.top) * (sq.right - sq.left) / float(IMAGE_SIZE * IMAGE_SIZE)


def area_costs(actions: Sequence[int], area_cost: float) -> np.ndarray:
    """What the area cost takes off each action's reward (N,) float64."""
    return np.array([area_cost * square_share(a) for a in actions], dtype=np.float64)


def action_count(max_square_side: int) -> int:
    """Actions of the squares up to ``max_square_side`` (the geometry numbers actions by side
    first, so they are its first ``100 x k`` actions: no renumbering)."""
    if max_square_side not in MASK_SIZES:
        sides = ", ".join(map(str, MASK_SIZES))
        raise SRDError(f"--max_square_side {max_square_side}: expected one of {sides}")
    return GRID * GRID * (MASK_SIZES.index(max_square_side) + 1)


def cell_edges(grid: int) -> list[int]:
    """Pixel edges of the grid's rows (and columns): grid + 1 values from 0 to 224."""
    return [round(k * IMAGE_SIZE / grid) for k in range(grid + 1)]


def occlude(image: np.ndarray, grid: int, cell: int) -> np.ndarray:
    """A copy of ``image`` with cell ``cell`` (row-major) of the ``grid`` x ``grid`` grid red."""
    edges = cell_edges(grid)
    row, col = divmod(int(cell), grid)
    out = np.array(image, dtype=np.uint8, copy=True)
    out[edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = RED
    return out


def caption_change(caption: str, base: str) -> float:
    """1 - |A & B| / |A | B| over the two captions' word sets (0 when both have no word)."""
    a, b = set(words(caption)), set(words(base))
    union = a | b
    return 0.0 if not union else 1.0 - len(a & b) / len(union)


def occlusion_maps(
    images: Sequence[np.ndarray],
    caption_fn: CaptionFn,
    grid: int,
    base_captions: Sequence[str] | None = None,
) -> np.ndarray:
    """(N, grid, grid) float32 maps of :func:`caption_change` per occluded cell, in [0, 1].

    One ``caption_fn`` call for all ``N * grid**2`` occluded images (and the N unoccluded ones
    unless ``base_captions`` gives their captions); callers chunk the images.
    """
    if check_occlusion_grid(grid) == 0:
        raise SRDError("occlusion_maps: the grid is 0 (off)")
    cells = grid * grid
    occluded = [occlude(im, grid, c) for im in images for c in range(cells)]
    if base_captions is None:
        captions = list(caption_fn(list(images) + occluded))
        base, rest = captions[: len(images)], captions[len(images) :]
    else:
        base, rest = list(base_captions), list(caption_fn(occluded))
    if len(base) != len(images) or len(rest) != len(occluded):
        raise ValueError(f"caption_fn gave {len(base) + len(rest)} captions for the maps")
    change = [caption_change(c, base[k // cells]) for k, c in enumerate(rest)]
    return np.asarray(change, dtype=np.float32).reshape(len(images), grid, grid)


def map_channel(cell_map: np.ndarray, obs_size: int) -> np.ndarray:
    """The map as one uint8 (obs_size, obs_size) image: 255 x value, constant over each cell."""
    values = np.clip(np.rint(np.asarray(cell_map, dtype=np.float64) * 255), 0, 255)
    small = Image.fromarray(values.astype(np.uint8))
    return np.asarray(small.resize((obs_size, obs_size), Image.Resampling.NEAREST), np.uint8)


def with_map(observation: np.ndarray, cell_map: np.ndarray | None) -> np.ndarray:
    """The RGB observation (S, S, 3) with the map as a fourth channel, or as is without one."""
    if cell_map is None:
        return observation
    channel = map_channel(cell_map, observation.shape[0])
    return np.concatenate([observation, channel[..., None]], axis=-1)


def pool_occlusion_maps(pool: Any, caption_fn: CaptionFn, grid: int, chunk: int = 16) -> np.ndarray:
    """(len(pool), grid, grid) maps of every pool image (``pool[i].image``), in chunks of
    ``chunk`` images (one caption call each), with a progress bar."""
    maps = []
    for start in tqdm(range(0, len(pool), chunk), desc="occlusion maps", leave=False):
        images = [pool[i].image for i in range(start, min(start + chunk, len(pool)))]
        maps.append(occlusion_maps(images, caption_fn, grid))
    return np.concatenate(maps)


def agent_variant(pool_source: str, env_cfg: Any) -> dict[str, Any]:
    """How stage D2's agent departs from the reference's: the pool's source when it is the
    defender's data, the area cost and the occlusion grid when on (empty: the reference's)."""
    variant: dict[str, Any] = {}
    if pool_source != "surrogate":
        variant["pool_source"] = pool_source
    if env_cfg.area_cost:
        variant["area_cost"] = float(env_cfg.area_cost)
    if env_cfg.occlusion_grid:
        variant["occlusion_grid"] = int(env_cfg.occlusion_grid)
    if env_cfg.max_square_side != MASK_SIZES[-1]:
        variant["max_square_side"] = int(env_cfg.max_square_side)
    return variant


def variant_tags(variant: Mapping[str, Any]) -> list[str]:
    """Report tags of an agent variant (:func:`agent_variant`), e.g. ["data pool"]."""
    tags = []
    if variant.get("pool_source"):
        tags.append(f"{variant['pool_source']} pool")
    if variant.get("area_cost"):
        tags.append(f"area cost {variant['area_cost']:g}")
    if variant.get("max_square_side"):
        tags.append(f"squares up to {variant['max_square_side']} px")
    if variant.get("occlusion_grid"):
        grid = variant["occlusion_grid"]
        tags.append(f"occlusion map {grid}x{grid}")
    return tags
