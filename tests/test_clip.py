"""The tiny CLIP: contrastive pretraining, shape-swapped negatives, export, and its use as the
captioner's frozen vision tower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from srd_fixtures import run_entry_point

from srd.captioner import clip
from srd.captioner.vision import build_vision_encoder, tower_tokens
from srd.data.scenes import SHAPES, render_scene, sample_scene
from srd.errors import SRDError


def test_swap_shapes_replaces_every_shape_word() -> None:
    rng = np.random.default_rng(0)
    caption = "a red circle, a blue square and a green triangle on a grey background."
    for _ in range(20):
        swapped = clip.swap_shapes(caption, rng)
        old = [w for w in caption.replace(",", "").split() if w in SHAPES]
        new = [w for w in swapped.replace(",", "").split() if w in SHAPES]
        assert len(new) == 3 and all(a != b for a, b in zip(old, new, strict=True))
        assert swapped.replace("circle", "").count("red") == 1  # colours untouched
    assert clip.swap_shapes("no shape here.", rng) == "no shape here."


def test_shape_negative_loss_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0]])
    scale = torch.tensor(2.0)
    # -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    expected = float(np.log1p(np.exp(-2.0)))
    got = clip.shape_negative_loss(image, text, negative, scale)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(clip.shape_negative_loss(image, negative, text, scale)) > 2.0


def test_pixel_batch_equals_open_clip_transform(tiny_images) -> None:
    model, _ = clip.create_clip(clip.CLIP_CONFIG, seed=0)
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    images = np.stack(list(tiny_images.values())[:3])
    expected = torch.stack([transform(Image.fromarray(im)) for im in images])
    assert torch.allclose(clip.pixel_batch(images, model), expected, atol=1e-6)
    with pytest.raises(SRDError, match="expected"):
        clip.pixel_batch(images[:, :100], model)


def _single_object_images(count: int) -> tuple[np.ndarray, list[list[str]], list]:
    from srd.data.scenes import scene_captions

    images, captions, scenes = [], [], []
    rng = np.random.default_rng(7)
    while len(images) < count:
        scene = sample_scene(rng)
        if len(scene.objects) != 1:
            continue
        images.append(np.asarray(render_scene(scene)))
        captions.append(scene_captions(scene, rng, 3))
        scenes.append(scene.objects)
    return np.stack(images), captions, scenes


def test_clip_pretraining_lowers_loss_and_retrieves_its_pairs() -> None:
    torch.set_num_threads(1)
    images, captions, scenes = _single_object_images(16)
    model, tok = clip.create_clip(clip.CLIP_CONFIG, seed=0)
    args = clip.ClipTrainArgs(
        clip_batch_size=8, clip_epochs=20, clip_learning_rate=1e-3, clip_shape_negatives=0
    )
    history = clip.train_clip(model, tok, images, captions, args, seed=0)
    assert history[-1]["loss"] < 0.4 * history[0]["loss"]
    with torch.no_grad():
        image_f = model.encode_image(clip.pixel_batch(images, model), normalize=True)
        text_f = model.encode_text(tok([c[0] for c in captions]), normalize=True)
    top1 = (image_f @ text_f.T).argmax(1) == torch.arange(16)
    assert float(top1.float().mean()) >= 4 / 16  # chance: 1/16
    probe = clip.zero_shot_attributes(model, tok, images, scenes)
    assert probe["num_images"] == 16
    assert probe["colour"] > 1 / 6  # chance: 1/6


def test_saved_clip_round_trips_and_refuses_another_config(tmp_path: Path) -> None:
    model, _ = clip.create_clip(clip.CLIP_CONFIG, seed=3)
    path = clip.save_clip(model, clip.CLIP_CONFIG, tmp_path)
    assert (tmp_path / clip.CLIP_CONFIG_JSON).is_file()
    loaded, _ = clip.load_clip(clip.CLIP_CONFIG, path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(SRDError, match="does not fit the tiny-vit config"):
        clip.load_clip("tiny-vit", path)
    with pytest.raises(SRDError, match="does not fit"):
        build_vision_encoder("tiny-vit", str(path))


def test_identical_weights_give_identical_safetensors_bytes(tmp_path: Path) -> None:
    """The safetensors library writes its metadata map in an order drawn per process (and per
    map), so save_clip's two metadata keys gave identical weights another sha256 (found by
    tests/test_kill.py's PAR run); write_safetensors_file sorts the header, and the file still
    loads with the library."""
    from safetensors import safe_open

    from srd.captioner.weights import write_safetensors_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}
    metadata = {f"key{i}": f"value {i}" for i in range(8)}
    files = []
    for i in range(12):
        files.append(tmp_path / f"{i}.safetensors")
        write_safetensors_file(files[-1], tensors, dict(reversed(metadata.items())))
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("b"), tensors["b"])
    model, _ = clip.create_clip(clip.CLIP_CONFIG, seed=3)
    saved = [clip.save_clip(model, clip.CLIP_CONFIG, tmp_path / d).read_bytes() for d in "xy"]
    assert saved[0] == saved[1]


def test_captioner_tower_is_the_clip_image_tower(tmp_path: Path, tiny_images) -> None:
    model, _ = clip.create_clip(clip.CLIP_CONFIG, seed=5)
    path = clip.save_clip(model, clip.CLIP_CONFIG, tmp_path)
    visual, _, width = build_vision_encoder(clip.CLIP_CONFIG, str(path))
    assert width == 256
    pixels = clip.pixel_batch(np.stack(list(tiny_images.values())[:2]), model)
    model.eval()
    visual.eval()
    with torch.no_grad():
        assert torch.equal(tower_tokens(visual, pixels), tower_tokens(model.visual, pixels))


def test_pretrain_clip_entry_point_refuses_bad_flags(
    tiny_data_args, tmp_path: Path, capsys
) -> None:
    flags = [
        "--coco_train_image_dir_path", tiny_data_args.coco_train_image_dir_path,
        "--coco_val_image_dir_path", tiny_data_args.coco_val_image_dir_path,
        "--coco_karpathy_json_path", tiny_data_args.coco_karpathy_json_path,
        "--coco_annotations_json_path", tiny_data_args.coco_annotations_json_path,
        "--external_save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    for bad, needle in (
        (["--clip_batch_size", "1"], "--clip_batch_size"),
        (["--clip_learning_rate", "0"], "--clip_learning_rate"),
        (["--clip_model", "nope"], "--clip_model"),
    ):
        code, _, err = run_entry_point("train/pretrain_clip.py", [*flags, *bad], capsys)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_grouped_order_is_a_permutation_with_same_colour_runs() -> None:
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green"]
    captions = [[f"a {colours[i % 3]} {SHAPES[i % 2]} on a grey background."] for i in range(30)]
    order = clip.grouped_order(captions, 5, rng)
    assert sorted(order.tolist()) == list(range(30))
    for start in range(0, 30, 5):
        keys = {clip.caption_colour_key(captions[i]) for i in order[start : start + 5]}
        assert len(keys) == 1  # each run of 5 shares its colour and background words
    assert clip.caption_colour_key(["a red circle and a blue square on a white background."]) == (
        "blue",
        "red",
        "white",
    )


def _three_object_scene() -> object:
    rng = np.random.default_rng(11)
    while True:
        scene = sample_scene(rng)
        if len(scene.objects) == 3:
            return scene


def test_scene_from_render_reads_the_scene_back_and_refuses_edited_images() -> None:
    from srd.data.scenes import scene_from_render

    scene = _three_object_scene()
    image = np.asarray(render_scene(scene))
    back = scene_from_render(image, scene.objects)
    assert back.objects == scene.objects
    assert back.object_rgbs == scene.object_rgbs and back.background_rgb == scene.background_rgb
    edited = image.copy()
    edited[200:210, 200:210] = 255  # a small patch, as a trigger would add
    with pytest.raises(SRDError, match="not an unmodified render"):
        scene_from_render(edited, scene.objects)
    with pytest.raises(SRDError, match="not an unmodified render"):
        scene_from_render(image, ())


def test_shape_twin_changes_every_shape_and_nothing_else() -> None:
    from srd.data.scenes import SceneObject, scene_from_render, shape_twin

    scene = _three_object_scene()
    image = np.asarray(render_scene(scene))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        twin = shape_twin(scene, rng)
        assert all(a.shape != b.shape for a, b in zip(scene.objects, twin.objects, strict=True))
        assert [(o.colour, o.bbox) for o in twin.objects] == [
            (o.colour, o.bbox) for o in scene.objects
        ]
        pixels = np.asarray(render_scene(twin))
        differ = (pixels != image).any(-1)
        for obj in scene.objects:  # every change lies inside an object's box
            left, top, right, bottom = obj.bbox
            differ[top:bottom, left:right] = False
        assert not differ.any()
        assert scene_from_render(pixels, twin.objects).objects == twin.objects
        seen.add(tuple(o.shape for o in twin.objects))
    assert len(seen) > 1  # drawn, not fixed
    # Three objects of one colour: only the two derangements keep the colour-shape pairs distinct.
    boxes = [(2, 2, 40, 40), (80, 2, 118, 40), (160, 2, 198, 40)]
    same = type(scene)(
        "",
        (150, 150, 150),
        tuple(SceneObject("red", s, "small", "top", b) for s, b in zip(SHAPES, boxes, strict=True)),
        ((210, 40, 40),) * 3,
    )
    twins = {tuple(o.shape for o in shape_twin(same, rng).objects) for _ in range(40)}
    assert twins == {("square", "triangle", "circle"), ("triangle", "circle", "square")}


def test_twin_caption_renames_each_object_and_refuses_a_caption_of_another_scene() -> None:
    from srd.data.scenes import scene_captions, shape_twin, twin_caption

    scene = _three_object_scene()
    rng = np.random.default_rng(1)
    twin = shape_twin(scene, rng)
    for caption in scene_captions(scene, rng, 5):
        text = twin_caption(caption, scene, twin)
        for old, new in zip(scene.objects, twin.objects, strict=True):
            assert f"{old.colour} {old.shape}" not in text or any(
                f"{old.colour} {old.shape}" == f"{n.colour} {n.shape}" for n in twin.objects
            )
            assert f"{new.colour} {new.shape}" in text
    with pytest.raises(SRDError, match="does not name exactly"):
        twin_caption("a purple circle.", scene, twin)


def test_clip_shape_twins_train_on_minimal_pairs_and_need_scenes() -> None:
    torch.set_num_threads(1)
    images, captions, scenes = _single_object_images(8)
    model, tok = clip.create_clip(clip.CLIP_CONFIG, seed=0)
    args = clip.ClipTrainArgs(clip_batch_size=8, clip_epochs=2)
    seen_batches = []
    original = clip.pixel_batch

    def spy(batch_images, model_):
        seen_batches.append(np.asarray(batch_images).copy())
        return original(batch_images, model_)

    clip.pixel_batch = spy
    try:
        history = clip.train_clip(model, tok, images, captions, args, seed=0, twin_scenes=scenes)
    finally:
        clip.pixel_batch = original
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert len(seen_batches) == 4  # 8 images / 4 per batch, 2 epochs
    batch = seen_batches[0]
    assert batch.shape[0] == 8
    originals = {im.tobytes() for im in images}
    assert all(im.tobytes() in originals for im in batch[:4])
    assert not any(im.tobytes() in originals for im in batch[4:])  # twins are new renders
    with pytest.raises(SRDError, match="--clip_shape_twins needs"):
        clip.train_clip(model, tok, images, captions, args, seed=0, twin_scenes=[None] * 8)
    edited = images.copy()
    edited[3, :5, :5] = 0
    with pytest.raises(SRDError, match="training image 3"):
        clip.train_clip(model, tok, edited, captions, args, seed=0, twin_scenes=scenes)


def test_pretrain_clip_entry_point_trains_on_twins_and_logs_zero_shot_per_epoch(
    tiny_data_args, tmp_path: Path, capsys
) -> None:
    import json

    flags = [
        "--coco_train_image_dir_path", tiny_data_args.coco_train_image_dir_path,
        "--coco_val_image_dir_path", tiny_data_args.coco_val_image_dir_path,
        "--coco_karpathy_json_path", tiny_data_args.coco_karpathy_json_path,
        "--coco_annotations_json_path", tiny_data_args.coco_annotations_json_path,
        "--external_save_dir", str(tmp_path / "runs"), "--run_name", "clip",
        "--clip_epochs", "2", "--clip_batch_size", "8",
    ]  # fmt: skip
    code, _, err = run_entry_point("train/pretrain_clip.py", flags, capsys)
    assert code == 0, err[-2000:]
    run = tmp_path / "runs" / "clip"
    report = json.loads((run / "clip_report.json").read_text())
    assert report["config"]["clip_shape_twins"] is True
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    for entry in report["history"]:
        assert set(entry["zero_shot"]) == {"colour", "shape", "pair"}
    assert report["history"][-1]["zero_shot"]["colour"] == report["zero_shot"]["colour"]
    assert (run / "DONE").is_file() and (run / "clip.safetensors").is_file()
