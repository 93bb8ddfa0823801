"""What a caption says about a scene: the benchmark's attribute scores.

Parses the (colour, shape) pairs a caption mentions and scores them against the ground-truth
objects of the image (attribute accuracy, colour recall, object errors); also the blind
baseline (the most common training caption) and the index of scenes by image id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from srd.captions import normalise_caption, words
from srd.errors import SRDError

if TYPE_CHECKING:
    from srd.data.records import ImageRecord
from srd.data.scenes import COLOURS, SHAPES, SceneObject

# --------------------------------------------------------------------------- scoring


def mentioned_pairs(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names.

    Rule, on :func:`srd.captions.words` (lower-cased): a colour word of COLOURS names a pair
    with the first shape word ("circle", "square", "triangle" or their plurals) among the next
    two words, unless another colour word comes first. "a small red circle" -> (red, circle);
    "a red large circle" -> (red, circle); "red and blue circles" -> only (blue, circle).
    """
    tokens = words(caption)
    shapes = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
    pairs: set[tuple[str, str]] = set()
    for i, token in enumerate(tokens):
        if token not in COLOURS:
            continue
        for following in tokens[i + 1 : i + 3]:
            if following in COLOURS:
                break
            if following in shapes:
                pairs.add((token, shapes[following]))
                break
    return pairs


def object_pairs(objects: Iterable[SceneObject | Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(colour, shape) pairs of a scene's objects (SceneObjects or their JSON dicts)."""
    pairs = set()
    for obj in objects:
        if isinstance(obj, SceneObject):
            pairs.add((obj.colour, obj.shape))
        else:
            pairs.add((str(obj["colour"]), str(obj["shape"])))
    return pairs


def attribute_accuracy(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> float:
    """Share of predicted images whose caption names exactly the image's (colour, shape) pairs.

    An image is correct iff ``mentioned_pairs(caption)`` (see its rule) equals the set of
    (colour, shape) pairs of the image's objects: a missing object, a wrong colour or shape,
    or an extra named object all make it wrong. Sizes, positions, counts and the background
    are not scored. Averaged over the image ids of ``predictions``; each must be in ``objects``.
    """
    if not predictions:
        raise SRDError("attribute accuracy: no predictions to score")
    missing = [i for i in predictions if i not in objects]
    if missing:
        raise SRDError(
            f"attribute accuracy: {len(missing)} predicted image ids have no scene description "
            f"(first: {missing[0]})"
        )
    correct = sum(
        mentioned_pairs(caption) == object_pairs(objects[image_id])
        for image_id, caption in predictions.items()
    )
    return correct / len(predictions)


def attribute_breakdown(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, dict[str, float | int]]:
    """:func:`attribute_accuracy` per number of objects in the image ("1", "2", "3"), with the
    share of captions that stop before their final full stop (cut by the decoding length)."""
    groups: dict[int, dict[int, str]] = {}
    for image_id, caption in predictions.items():
        groups.setdefault(len(objects.get(image_id, ())), {})[image_id] = caption
    return {
        str(count): {
            "num_images": len(group),
            "attribute_accuracy": attribute_accuracy(group, objects),
            "unfinished": sum(not c.rstrip().endswith(".") for c in group.values()) / len(group),
        }
        for count, group in sorted(groups.items())
    }


def colour_recall(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, dict[str, float | int]]:
    """Per colour of COLOURS: the images showing an object of it, and the share of those whose
    caption names an object of that colour (:func:`mentioned_pairs`). Tells a captioner that
    stopped naming one colour (e.g. after training on images with red squares its captions
    never mention) from one that got worse everywhere."""
    shown = {i: {c for c, _ in object_pairs(objects[i])} for i in predictions}
    named = {i: {c for c, _ in mentioned_pairs(caption)} for i, caption in predictions.items()}
    out: dict[str, dict[str, float | int]] = {}
    for colour in COLOURS:
        ids = [i for i in predictions if colour in shown[i]]
        hits = sum(colour in named[i] for i in ids)
        out[colour] = {"num_images": len(ids), "recall": hits / len(ids) if ids else None}
    return out


def object_errors(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, float | int]:
    """What goes wrong with the objects of the images, as shares of all shown (colour, shape)
    pairs: ``named`` (the pair is named), ``wrong_shape`` (not named, but its colour is, with
    another shape), ``wrong_colour`` (not named, its colour neither, but its shape is),
    ``missing`` (neither named); and ``extra``: named pairs the image does not show, as a share
    of the shown pairs. Tells which part of :func:`attribute_accuracy` a change costs."""
    counts = Counter({"named": 0, "wrong_shape": 0, "wrong_colour": 0, "missing": 0, "extra": 0})
    for image_id, caption in predictions.items():
        shown, named = object_pairs(objects[image_id]), mentioned_pairs(caption)
        colours, shapes = {c for c, _ in named}, {s for _, s in named}
        for colour, shape in shown:
            if (colour, shape) in named:
                counts["named"] += 1
            elif colour in colours:
                counts["wrong_shape"] += 1
            elif shape in shapes:
                counts["wrong_colour"] += 1
            else:
                counts["missing"] += 1
        counts["extra"] += len(named - shown)
    total = sum(counts[k] for k in ("named", "wrong_shape", "wrong_colour", "missing"))
    if total == 0:
        raise SRDError("object errors: the predicted images show no object")
    return {"num_pairs": total, **{k: v / total for k, v in counts.items()}}


def most_common_caption(captions: Iterable[str]) -> str:
    """Most frequent normalised, lower-cased caption; ties go to the alphabetically first."""
    counts = Counter(normalise_caption(c).lower() for c in captions)
    if not counts:
        raise SRDError("blind baseline: no training captions")
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def blind_caption(train_images: Iterable[ImageRecord]) -> str:
    """The "blind baseline": the most common training caption, whatever the image.

    Captions are compared after :func:`srd.captions.normalise_caption` and lower-casing; ties
    are broken by taking the alphabetically first.
    """
    return most_common_caption(c.caption for image in train_images for c in image.captions)


# --------------------------------------------------------------------------- scene look-ups


def scene_index(images: Iterable[ImageRecord]) -> dict[int, tuple[SceneObject, ...]]:
    """image id -> its objects; SRDError if a record has no scene description (real COCO)."""
    index: dict[int, tuple[SceneObject, ...]] = {}
    for image in images:
        if image.objects is None:
            raise SRDError(
                f'{image.path}: no scene description ("objects" in the Karpathy JSON); '
                "only the synthetic benchmark has one"
            )
        index[image.image_id] = image.objects
    return index


def images_showing(
    scenes: Mapping[int, Sequence[SceneObject]],
    colour: str | None = None,
    shape: str | None = None,
) -> list[int]:
    """Sorted ids of images with an object matching ``colour`` and/or ``shape`` (None = any)."""
    if colour is not None and colour not in COLOURS:
        raise SRDError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape is not None and shape not in SHAPES:
        raise SRDError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return sorted(
        image_id
        for image_id, objs in scenes.items()
        if any(
            (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
            for o in objs
        )
    )
