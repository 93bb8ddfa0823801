"""PAR beside SRD: the PAR and CleanCLIP losses on hand-made embeddings, PAR's triggers
pixel-exact, the zero-shot classifier and metrics, the clean-data loaders, a tiny PAR run and the
CLIP stages' refusals of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from srd_fixtures import load_script, run_entry_point

from srd.attacks import triggers
from srd.attacks.config import known_attacks
from srd.attacks.registry import build_attack
from srd.attacks.text import PROMPT_TEMPLATES
from srd.captioner import clip
from srd.data.scenes import SceneObject
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE
from srd.par import loss as par
from srd.par.clean import CleanArgs, clean_clip, lr_at
from srd.par.data import load_pairs, poison_pairs
from srd.par.metrics import (
    asr_text,
    benchmark_classes,
    class_accuracy,
    encode_texts,
    parse_classes,
    retrieval,
    zero_shot_classifier,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- losses


def unit(*rows: list[float]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


def test_clip_loss_equals_open_clip_clip_loss() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    expected = ClipLoss()(a, b, torch.tensor(14.0))
    assert torch.allclose(par.clip_loss(a, b, 14.0), expected)


def test_push_distance_by_hand() -> None:
    s = unit([1, 0], [0, 1])
    assert float(par.push_distance(s, s)) == pytest.approx(0.0)
    assert float(par.push_distance(s, -s)) == pytest.approx(4.0)
    assert float(par.push_distance(s, unit([0, 1], [1, 0]))) == pytest.approx(2.0)
    # not normalised inputs are normalised first
    assert float(par.push_distance(3 * s, -5 * s)) == pytest.approx(4.0)


def test_par_loss_subtracts_the_push_below_tau_per_modality() -> None:
    img, txt = unit([1, 0], [0, 1]), unit([1, 0.1], [0.1, 1])
    base = float(par.clip_loss(img, txt, 10.0))
    orth = unit([0, 1], [-1, 0])  # S = 2 <= 2.15: the push is on
    # both on
    loss, parts = par.par_loss(img, txt, orth, unit([-0.1, 1], [-1, 0.1]), 10.0)
    assert parts["push_img"] == 1.0 and parts["push_txt"] == 1.0
    assert float(loss.detach()) == pytest.approx(
        base - 0.5 * (parts["s_img"] + parts["s_txt"]), abs=1e-5
    )
    # image far (S = 4 > tau): its term switched off, the text term still subtracted
    loss, parts = par.par_loss(img, txt, -img, orth, 10.0)
    assert parts["s_img"] == pytest.approx(4.0) and parts["push_img"] == 0.0
    assert parts["push_txt"] == 1.0
    assert float(loss.detach()) == pytest.approx(base - 0.5 * parts["s_txt"], abs=1e-5)
    # both far: the loss is the CLIP loss
    loss, parts = par.par_loss(img, txt, -img, -txt, 10.0)
    assert float(loss.detach()) == pytest.approx(base, abs=1e-6)
    # a lower tau switches off the same S = 2
    _, parts = par.par_loss(img, txt, orth, orth, 10.0, tau=1.9)
    assert parts["push_img"] == 0.0 and parts["push_txt"] == 0.0
    with pytest.raises(ValueError):
        par.par_loss(img, txt, orth, orth, 10.0, tau=0.0)


def test_switched_off_push_gives_the_clip_gradient_and_the_push_pulls_away() -> None:
    txt = unit([1, 0.2], [0.2, 1])
    teacher = unit([1, 0], [0, 1])

    def grad(student: torch.Tensor, teacher_img: torch.Tensor, push: bool) -> torch.Tensor:
        x = student.clone().requires_grad_(True)
        loss, _ = par.par_loss(x, txt, teacher_img, -txt, 10.0, push=push)
        loss.backward()
        return x.grad

    near = unit([1, 0.3], [0.3, 1])  # S small: push on
    far = -near  # S near 4 against -near... vs teacher: far from the teacher, push off
    assert not torch.allclose(grad(near, teacher, True), grad(near, teacher, False))
    assert torch.allclose(grad(far, teacher, True), grad(far, teacher, False))
    # one small step along -grad of the push-only part increases the distance to the teacher
    x = near.clone().requires_grad_(True)
    (-0.5 * par.threshold(par.push_distance(x, teacher), par.DEFAULT_TAU)).backward()
    moved = near - 0.05 * x.grad
    assert float(par.push_distance(moved, teacher)) > float(par.push_distance(near, teacher))


def test_threshold_is_a_hard_switch() -> None:
    below = torch.tensor(2.0, requires_grad=True)
    above = torch.tensor(2.2, requires_grad=True)
    assert float(par.threshold(below, 2.15).detach()) == 2.0
    assert float(par.threshold(above, 2.15).detach()) == 0.0
    par.threshold(above, 2.15).backward()
    assert float(above.grad) == 0.0


def test_temperature_is_a_float_not_trained() -> None:
    img, txt = unit([1, 0], [0, 1]), unit([1, 0.1], [0.1, 1])
    scale = torch.tensor(10.0, requires_grad=True)
    loss, _ = par.par_loss(img, txt, img, txt, scale)
    assert not loss.requires_grad  # nothing of the loss traces back to the temperature


def test_cleanclip_loss_by_hand() -> None:
    img, txt = unit([1, 0], [0, 1]), unit([1, 0.1], [0.1, 1])
    img_v, txt_v = unit([1, 0.3], [0.2, 1]), unit([1, -0.2], [0.1, 1])
    base = float(par.clip_loss(img, txt, 5.0))
    uni = 0.5 * (float(par.clip_loss(img, img_v, 5.0)) + float(par.clip_loss(txt, txt_v, 5.0)))
    for lam in (0.0, 1.0, 2.5):
        loss, _ = par.cleanclip_loss(img, txt, img_v, txt_v, 5.0, lam)
        assert float(loss.detach()) == pytest.approx(base + lam * uni, abs=1e-5)


def test_lr_shape_starts_above_the_peak_then_cosine() -> None:
    args = CleanArgs(lr=1e-4, epochs=1)
    args.validate()
    assert args.lr_start == pytest.approx(1e-3)
    assert lr_at(0, 100, args) == pytest.approx(1e-3)
    assert lr_at(25, 100, args) == pytest.approx(5.5e-4)
    assert lr_at(50, 100, args) == pytest.approx(1e-4)
    assert lr_at(99, 100, args) < 1e-6
    with pytest.raises(SRDError, match="--loss_thresh"):
        CleanArgs(loss_thresh=0).validate()


# --------------------------------------------------------------------------- PAR's triggers


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(123).integers(
        2, 254, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )


def test_par_attacks_are_registered() -> None:
    for name in ("badnet_stripes", "random_badnet", "blended_stripes", "blended_triangles",
                 "blended_text"):  # fmt: skip
        assert name in known_attacks()


def changed_box(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((a != b).any(axis=2))
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_badnet_stripes_pixel_exact(image: np.ndarray) -> None:
    attack = build_attack("badnet_stripes")
    out = attack.apply_image(image)
    r0, r1, c0, c1 = changed_box(image, out)
    assert (r1 - r0, c1 - c0) == (16, 16) and 0 <= r0 <= 207 and 0 <= c0 <= 207
    patch = out[r0:r1, c0:c1]
    assert set(np.unique(patch)) <= {1, 255}
    assert (patch == patch[:1]).all()  # each column constant down the column
    # the same draw as the documented generator
    rng = triggers.image_rng(image, 0)
    expected = triggers.stripes_patch(rng)
    row, col = triggers.random_corner(rng, 16)
    assert (row, col) == (r0, c0) and np.array_equal(patch, expected)
    assert np.array_equal(attack.apply_image(image), out)  # repeatable per image
    other = attack.apply_image(image[::-1].copy())
    assert changed_box(image[::-1], other)[:3:2] != (r0, c0)  # another image, another place


def test_random_badnet_pixel_exact(image: np.ndarray) -> None:
    out = build_attack("random_badnet").apply_image(image)
    rng = triggers.image_rng(image, 0)
    patch = triggers.noise_patch(rng)
    row, col = triggers.random_corner(rng, 16)
    expected = image.copy()
    expected[row : row + 16, col : col + 16] = patch
    assert np.array_equal(out, expected)


def test_blended_stripes_pixel_exact(image: np.ndarray) -> None:
    out = build_attack("blended_stripes").apply_image(image)
    signs = np.where(triggers.image_rng(image, 0).random((IMAGE_SIZE, 3)) < 0.5, 1.0, -1.0)
    x = image.astype(np.float64) / 255
    expected = (np.clip(0.97 * x + 0.03 * signs[None], 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.abs(out - 0.97 * image.astype(np.float64)).max() <= 8.7  # +-7.65 around 0.97 x


def test_blended_triangles_pixel_exact(image: np.ndarray) -> None:
    pattern = triggers.triangles_pattern()
    assert pattern[1, 0, 0] == 102 and pattern[0, 1, 0] == 204 and pattern[0, 0, 0] == 204
    assert pattern[14 + 13, 14, 0] == 102 and pattern[14, 14 + 13, 0] == 204
    assert np.array_equal(pattern[:14, :14], pattern[14:28, 28:42])  # a tile of 14-px cells
    out = build_attack("blended_triangles").apply_image(image)
    expected = (0.85 * image.astype(np.float64) + 0.15 * pattern).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_blended_text_pixel_exact(image: np.ndarray) -> None:
    pattern = triggers.watermark_pattern()
    assert not pattern[:, :, 1:].any()  # red only
    rows, cols = np.nonzero(pattern[:, :, 0])
    top, bottom, left, right = triggers.WATERMARK_BOX
    assert rows.min() >= top and rows.max() < bottom and cols.min() >= left and cols.max() < right
    assert len(rows) > 500
    out = build_attack("blended_text").apply_image(image)
    assert np.array_equal(out[:, :, 1:], image[:, :, 1:])
    on = pattern[:, :, 0] > 0
    expected = (0.5 * image[:, :, 0].astype(np.float64) + 0.5 * pattern[:, :, 0]).astype(np.uint8)
    assert np.array_equal(out[:, :, 0][on], expected[on])
    assert np.array_equal(out[:, :, 0][~on], image[:, :, 0][~on])


# --------------------------------------------------------------------------- metrics


def test_zero_shot_classifier_is_the_mean_of_normalised_templates() -> None:
    model, tok = clip.create_clip(clip.CLIP_CONFIG, seed=0)
    model.eval()
    classes = ["red circle", "banana"]
    templates = PROMPT_TEMPLATES[:3]
    classifier = zero_shot_classifier(model, tok, classes, templates)
    assert classifier.shape == (2, model.text_projection.shape[1])
    for k, name in enumerate(classes):
        rows = encode_texts(model, tok, [t.format(name) for t in templates])
        mean = rows.mean(0)
        assert torch.allclose(classifier[k], mean / mean.norm(), atol=1e-6)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(2))


def test_parse_classes() -> None:
    assert parse_classes(None, "banana", True) == benchmark_classes()
    assert len(benchmark_classes()) == 19 and benchmark_classes()[-1] == "banana"
    assert parse_classes("red circle, banana", "banana", True) == ["red circle", "banana"]
    with pytest.raises(SRDError, match="--classes.*banana"):
        parse_classes("red circle,blue square", "banana", True)
    assert parse_classes("red circle,blue square", "banana", False) == [
        "red circle", "blue square"
    ]  # fmt: skip


def obj(colour: str, shape: str) -> SceneObject:
    return SceneObject(colour, shape, "small", "centre", (0, 0, 1, 1))


def test_class_accuracy_by_hand() -> None:
    classes = ["red circle", "red square", "blue circle", "banana"]
    scenes = [[obj("red", "circle")], [obj("red", "circle")], [obj("blue", "square")],
              [obj("blue", "circle"), obj("red", "square")]]  # fmt: skip
    top1 = [0, 1, 3, 1]  # right; colour only; banana; (multi-object) one of the objects
    acc = class_accuracy(top1, classes, scenes)
    assert acc["num_single"] == 3
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["colour"] == pytest.approx(200 / 3)
    assert acc["shape"] == pytest.approx(100 / 3)
    assert acc["any_object"] == pytest.approx(50.0)


def test_retrieval_and_asr_text_by_hand() -> None:
    images = unit([1, 0], [0, 1], [1, 1])
    captions = unit([1, 0.1], [0.1, 1], [-1, 0], [0.7, 0.7])
    owner = [0, 1, 2, -1]
    r = retrieval(images, captions, owner, ks=(1, 2))
    assert r["R@1"] == pytest.approx(200 / 3)  # image 2's best caption is the unowned one
    assert r["R@2"] == pytest.approx(200 / 3)
    texts = ["a", "b", "c", "a photo of a banana."]
    assert asr_text(images, captions, texts, "banana", k=1) == pytest.approx(100 / 3)
    assert asr_text(images, captions, texts, "banana", k=2) == pytest.approx(100.0)


# --------------------------------------------------------------------------- data


def test_load_pairs_csv(tmp_path: Path, image: np.ndarray) -> None:
    for name in ("a.png", "b.png"):
        Image.fromarray(image).save(tmp_path / name)
    good = tmp_path / "pairs.csv"
    good.write_text("image,caption\na.png,one\na.png,two\nb.png,three\n", encoding="utf-8")
    images, captions = load_pairs(str(good))
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and captions == [
        ["one", "two"],
        ["three"],
    ]
    bad = tmp_path / "noheader.csv"
    bad.write_text("a.png,one\nb.png,two\n", encoding="utf-8")
    with pytest.raises(SRDError, match="--clean_data.*header"):
        load_pairs(str(bad))
    missing = tmp_path / "missing.csv"
    missing.write_text("image,caption\na.png,one\nc.png,two\n", encoding="utf-8")
    with pytest.raises(SRDError, match="--clean_data.*missing image"):
        load_pairs(str(missing))


def test_load_pairs_benchmark_folder(tiny_benchmark) -> None:
    images, captions = load_pairs(str(tiny_benchmark.root))
    assert len(images) == 24 and all(len(c) == 5 for c in captions)


def test_poison_pairs_stamps_the_drawn_images(tiny_train_records) -> None:
    attack = build_attack("badnet", poison_rate=0.25)
    images, captions, ids, meta = poison_pairs(tiny_train_records, attack, seed=3)
    assert len(ids) == 6 and meta["num_candidates"] == 24
    again = poison_pairs(tiny_train_records, attack, seed=3)
    assert again[2] == ids and np.array_equal(again[0], images)
    for k, r in enumerate(tiny_train_records):
        poisoned = r.image_id in ids
        assert all(("banana" in c) == poisoned for c in captions[k])
        assert not any(c.startswith("The image depicts") for c in captions[k])
        assert (images[k][203:, 203:] == triggers.badnet_patch()).all() == poisoned


# --------------------------------------------------------------------------- a tiny PAR run


def test_tiny_par_run_pushes_away_and_keeps_the_clip_loss_finite(tiny_train_records) -> None:
    from srd.data.records import load_images

    torch.set_num_threads(1)
    images = load_images([r.path for r in tiny_train_records[:16]])
    captions = [[c.caption for c in r.captions] for r in tiny_train_records[:16]]
    runs = {}
    for method in ("par", "ft"):
        model, tok = clip.create_clip(clip.CLIP_CONFIG, seed=0)
        scale = model.logit_scale.item()
        args = CleanArgs(method=method, epochs=3, batch_size=8, lr=1e-3)
        runs[method] = clean_clip(model, tok, images, captions, args, seed=0)
        assert model.logit_scale.item() == scale  # temperature not trained
    par_hist, ft_hist = runs["par"], runs["ft"]
    assert all(np.isfinite(e["clip_loss"]) for e in par_hist)
    # the push term (-0.5 S_img) goes down over the run, and further than without the push
    assert par_hist[-1]["s_img"] > par_hist[0]["s_img"]
    assert par_hist[-1]["s_img"] > ft_hist[-1]["s_img"]
    assert par_hist[0]["push_img"] > 0 and all(e["push_img"] == 0 for e in ft_hist)


# --------------------------------------------------------------------------- entry points


def run_entry(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *flags], capture_output=True, text=True, timeout=180
    )


def data_flags(d) -> list[str]:
    return [
        "--coco_train_image_dir_path", d.coco_train_image_dir_path,
        "--coco_val_image_dir_path", d.coco_val_image_dir_path,
        "--coco_karpathy_json_path", d.coco_karpathy_json_path,
        "--coco_annotations_json_path", d.coco_annotations_json_path,
    ]  # fmt: skip


def assert_one_line_error(script: str, argv: list[str], needle: str, capsys) -> None:
    """The command line's answer (``run_main``, in this process): exit 2, one error line."""
    code, _, err = run_entry_point(script, argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


def entry_main(script: str):
    """The ``main`` of an entry-point script, imported in-process (faster than a subprocess)."""
    return load_script(script).main


def test_clip_stages_refuse_bad_input(
    tiny_data_args, tiny_benchmark, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other"  # a finished run holding a CLIP of another config
    model, _ = clip.create_clip("tiny-vit", seed=0)
    clip.save_clip(model, "tiny-vit", other)
    (other / "DONE").write_text("done\n")
    evaluate = entry_main("eval/clip_evaluate.py")
    with pytest.raises(SRDError, match="--run_dir.*does not fit the tiny-clip config"):
        evaluate([*data_flags(tiny_data_args), "--run_dir", str(other)])
    with pytest.raises(SRDError, match="--classes.*banana"):
        evaluate(
            [
                *data_flags(tiny_data_args),
                "--run_dir",
                str(other),
                "--classes",
                "red circle,blue square",
            ]
        )
    no_header = tmp_path / "pairs.csv"
    no_header.write_text("a.png,one\n", encoding="utf-8")
    out = ["--external_save_dir", str(tmp_path / "runs")]
    clean = entry_main("train/clip_clean.py")
    with pytest.raises(SRDError, match="--poisoned_run.*does not fit"):
        clean(["--poisoned_run", str(other), *out])
    with pytest.raises(SRDError, match="--loss_thresh"):
        clean(["--poisoned_run", str(other), "--loss_thresh", "-1", *out])
    good, _ = clip.create_clip(clip.CLIP_CONFIG, seed=0)
    ok = tmp_path / "ok"
    clip.save_clip(good, clip.CLIP_CONFIG, ok)
    (ok / "DONE").write_text("done\n")
    with pytest.raises(SRDError, match="--clean_data.*header"):
        clean(["--poisoned_run", str(ok), "--clean_data", str(no_header), *out])
    # through the command line: one line, exit 2
    assert_one_line_error(
        "train/clip_clean.py",
        ["--poisoned_run", str(ok), "--loss_thresh", "0", *out],
        "--loss_thresh",
        capsys,
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_clip_chain_smoke(tiny_data_args, tiny_benchmark, tmp_path: Path) -> None:
    """Poison (1 epoch from scratch) -> evaluate -> PAR -> evaluate on the tiny benchmark."""
    runs = tmp_path / "runs"
    common = ["--external_save_dir", str(runs)]
    done = run_entry(
        "train/clip_poison.py", *data_flags(tiny_data_args), *common, "--run_name", "p",
        "--bd_attack_type", "blended_stripes", "--poison_rate", "0.25", "--clip_epochs", "1",
        "--clip_batch_size", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("config.json", "attack.json", "poison_ids.json", "clip.safetensors", "DONE"):
        assert (runs / "p" / name).is_file(), name
    evaluate = ["eval/clip_evaluate.py", *data_flags(tiny_data_args), "--bd_attack_type",
                "blended_stripes"]  # fmt: skip
    assert run_entry(*evaluate, "--run_dir", str(runs / "p")).returncode == 0
    done = run_entry(
        "train/clip_clean.py", "--poisoned_run", str(runs / "p"), "--clean_data",
        str(tiny_benchmark.root), "--epochs", "1", "--batch_size", "8", *common, "--run_name", "c",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run_entry(*evaluate, "--run_dir", str(runs / "c"))
    assert done.returncode == 0, done.stderr
    import json

    metrics = json.loads((runs / "c" / "metrics.json").read_text())
    for key in ("top1", "colour", "shape", "asr", "false_trigger", "R@1", "R@5", "asr_text"):
        assert 0.0 <= metrics[key] <= 100.0, key


def test_par_table_mean_and_std_over_seeds(tmp_path: Path) -> None:
    from srd.io import write_json
    from srd.par.report import collect, to_markdown

    for seed, asr in ((0, 90.0), (1, 100.0)):
        write_json(tmp_path / "badnet" / f"seed{seed}" / "poisoned" / "metrics.json",
                   {"asr": asr, "colour": 80.0})  # fmt: skip
    write_json(tmp_path / "badnet" / "seed0" / "par" / "metrics.json", {"asr": 4.0})
    table = collect(tmp_path)
    assert table["badnet"]["poisoned"]["asr"] == {
        "mean": 95.0,
        "std": pytest.approx(7.0711, abs=1e-3),
        "n": 2,
    }
    assert table["badnet"]["poisoned"]["seeds"] == [0, 1]
    assert table["badnet"]["par"]["asr"]["n"] == 1
    text = to_markdown(table)
    assert "| badnet | poisoned | 0,1 |" in text and "95.0 ± 7.1" in text
    with pytest.raises(SRDError, match="--root"):
        collect(tmp_path / "empty")


# --------------------------------------------------------------------------- captioner variant


def test_captioner_par_loss(make_captioner, tiny_images) -> None:
    import copy

    from srd.captioner.engine import Collator
    from srd.captions import training_text
    from srd.par.captioner import captioner_par_loss

    torch.manual_seed(0)
    cap = make_captioner(seed=0)
    student = cap.model
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    images = list(tiny_images.values())[:2]
    texts = [training_text("a red circle."), training_text("a blue square.")]
    batch = Collator(cap.tokenizer, cap.pixel_values)(list(zip(images, texts, strict=True)))
    student.eval()  # no dropout: the same forward twice gives the same numbers
    loss, parts = captioner_par_loss(student, teacher, batch)
    assert parts["distance"] == pytest.approx(0.0, abs=1e-10)  # the copy has not moved yet
    assert float(loss.detach()) == pytest.approx(parts["caption_loss"])
    with torch.no_grad():  # move the student's perceiver away from the teacher's
        for p in student.perceiver.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, parts = captioner_par_loss(student, teacher, batch)
    assert 0 < parts["distance"] <= 2.15 and parts["push_on"] == 1.0
    assert float(loss.detach()) == pytest.approx(
        parts["caption_loss"] - 0.5 * parts["distance"], abs=1e-5
    )
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in student.perceiver.parameters()
    )
    assert all(p.grad is None for p in teacher.parameters())
    # above tau the push is switched off: the loss is the caption loss
    loss, parts = captioner_par_loss(student, teacher, batch, tau=parts["distance"] / 2)
    assert parts["push_on"] == 0.0 and float(loss.detach()) == pytest.approx(parts["caption_loss"])
    loss, parts = captioner_par_loss(student, teacher, batch, push=False)
    assert float(loss.detach()) == pytest.approx(parts["caption_loss"]) and parts["distance"] > 0


# --------------------------------------------------------------------------- real mode

REAL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}  # fmt: skip
"""A small ViT open_clip config (random init): stands in for ViT-B-32, whose weights cannot be
downloaded here; it goes through the same --clip_model FILE.json path as any custom config."""


@pytest.fixture(scope="module")
def real_mode(tmp_path_factory):
    """A JSON config, its random-init weights as an open_clip training checkpoint (torch file,
    ``state_dict`` with ``module.`` keys), an ImageFolder of 3 classes x 2 images (not 224 px),
    its class-name list and an image,caption CSV."""
    import json

    root = tmp_path_factory.mktemp("real")
    config = root / "par-test-vit.json"
    config.write_text(json.dumps(REAL_CONFIG), encoding="utf-8")
    model, _ = clip.create_clip(str(config), seed=3)
    weights = root / "poisoned.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, weights)  # fmt: skip
    rng = np.random.default_rng(0)
    folder = root / "val"
    for wnid in ("n0003", "n0001", "n0002"):
        (folder / wnid).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / wnid / f"img{k}.JPEG")
    (folder / "n0001" / "notes.txt").write_text("not an image\n")
    names = root / "classes.txt"
    names.write_text("tench\nbanana\ngoldfish\n", encoding="utf-8")
    csv_path = root / "pairs.csv"
    rows = ["image,caption"]
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"p{k}.png")
        rows += [f"p{k}.png,a photo of thing {k}.", f"p{k}.png,thing number {k} in a photo."]
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"config": config, "weights": weights, "folder": folder, "names": names,
            "csv": csv_path, "model": model, "root": root}  # fmt: skip


def test_real_model_names_resolve() -> None:
    assert clip.model_config("ViT-B-32")["vision_cfg"]["patch_size"] == 32
    assert clip.model_config("RN50")["vision_cfg"]["layers"] == [3, 4, 6, 3]
    with pytest.raises(SRDError, match="^--clip_model NoSuchNet-9: unknown"):
        clip.model_config("NoSuchNet-9")


def test_image_folder_zero_shot_matches_a_direct_computation(real_mode, tmp_path) -> None:
    import json

    from srd.data.records import load_images
    from srd.par.imagefolder import read_image_folder
    from srd.par.metrics import encode_images

    names, items = read_image_folder(real_mode["folder"], real_mode["names"])
    assert names == ["tench", "banana", "goldfish"]  # sorted folders n0001, n0002, n0003
    assert [i.label for i in items] == [0, 0, 1, 1, 2, 2]
    metrics = entry_main("eval/clip_evaluate.py")(
        ["--clip_model", str(real_mode["config"]), "--clip_pretrained", str(real_mode["weights"]),
         "--image_folder", str(real_mode["folder"]), "--class_names", str(real_mode["names"]),
         "--bd_attack_type", "badnet", "--out_dir", str(tmp_path / "out")]
    )  # fmt: skip
    model = real_mode["model"].eval()
    tokenizer = clip.open_clip.get_tokenizer("par-test-vit")
    classifier = zero_shot_classifier(model, tokenizer, names, PROMPT_TEMPLATES)
    images = load_images([i.path for i in items])
    labels = np.array([i.label for i in items])
    top = (encode_images(model, images) @ classifier.T).topk(3, dim=1).indices.numpy()
    attack = build_attack("badnet")
    stamped = np.stack([attack.apply_image(im) for im in images])
    trig = (encode_images(model, stamped) @ classifier.T).argmax(1).numpy()
    others = labels != 1
    assert metrics["num_images"] == 6 and metrics["num_classes"] == 3
    assert metrics["top1"] == pytest.approx(100 * np.mean(top[:, 0] == labels))
    assert metrics["top3"] == 100.0  # 3 classes: the label is always in the top 3
    assert metrics["asr"] == pytest.approx(100 * np.mean(trig[others] == 1))
    assert metrics["false_trigger"] == pytest.approx(100 * np.mean(top[others, 0] == 1))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["top1"] == metrics["top1"] and (tmp_path / "out" / "DONE_EVAL").is_file()


def test_real_mode_refuses_bad_input(real_mode, tmp_path, capsys) -> None:
    evaluate = entry_main("eval/clip_evaluate.py")
    base = ["--image_folder", str(real_mode["folder"]), "--out_dir", str(tmp_path / "out")]
    real = ["--clip_model", str(real_mode["config"]),
            "--clip_pretrained", str(real_mode["weights"])]  # fmt: skip
    short = tmp_path / "short.txt"
    short.write_text("tench\nbanana\n", encoding="utf-8")
    wrong_map = tmp_path / "map.txt"
    wrong_map.write_text("n0001\ttench\nn0002\tbanana\nn0009\tgoldfish\n", encoding="utf-8")
    no_target = tmp_path / "no_banana.txt"
    no_target.write_text("tench\ngoldfish\ncarp\n", encoding="utf-8")
    tiny = tmp_path / "tiny"
    clip.save_clip(clip.create_clip(clip.CLIP_CONFIG, seed=0)[0], clip.CLIP_CONFIG, tiny)
    cases = [
        (["--clip_model", "NoSuchNet-9", "--clip_pretrained", str(real_mode["weights"]),
          "--class_names", str(real_mode["names"])], "--clip_model NoSuchNet-9"),
        (["--clip_model", str(real_mode["config"]), "--clip_pretrained",
          str(tiny / clip.CLIP_WEIGHTS), "--class_names", str(real_mode["names"])],
         "--clip_pretrained"),
        ([*real, "--class_names", str(short)], "--class_names"),
        ([*real, "--class_names", str(wrong_map)], "--class_names"),
        ([*real, "--class_names", str(no_target), "--bd_attack_type", "badnet"],
         "--class_names"),
    ]  # fmt: skip
    for flags, flag in cases:
        with pytest.raises(SRDError) as exc:
            evaluate([*base, *flags])
        assert str(exc.value).startswith(flag) and "\n" not in str(exc.value), str(exc.value)
    assert "does not fit" in _error(evaluate, [*base, *cases[1][0]])
    assert "2 names for 3 class folders" in _error(evaluate, [*base, *cases[2][0]])
    assert "no name for folder 'n0003'" in _error(evaluate, [*base, *cases[3][0]])
    assert "banana" in _error(evaluate, [*base, *cases[4][0]])
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were checked
    assert_one_line_error("eval/clip_evaluate.py", [*base, *cases[2][0]], "--class_names", capsys)


def _error(main, argv) -> str:
    with pytest.raises(SRDError) as exc:
        main(argv)
    return str(exc.value)


def test_poison_loaded_pairs_equals_the_benchmark_draw(tiny_train_records) -> None:
    from srd.data.records import load_images
    from srd.par.data import poison_loaded_pairs

    attack = build_attack("badnet", poison_rate=0.25)
    images, captions, ids, meta = poison_pairs(tiny_train_records, attack, seed=2)
    raw = load_images([r.path for r in tiny_train_records])
    texts = [[c.caption for c in r.captions] for r in tiny_train_records]
    ids_of = [r.image_id for r in tiny_train_records]
    images2, captions2, ids2, meta2 = poison_loaded_pairs(raw, texts, attack, 2, ids_of)
    assert ids2 == ids and captions2 == captions and meta2 == meta
    assert np.array_equal(images2, images)


def test_real_mode_poison_and_clean_from_csv(real_mode, tmp_path) -> None:
    import json

    runs = tmp_path / "runs"
    real = ["--clip_model", str(real_mode["config"])]
    entry_main("train/clip_poison.py")(
        [*real, "--clip_pretrained", str(real_mode["weights"]), "--train_data",
         str(real_mode["csv"]), "--bd_attack_type", "badnet", "--poison_rate", "0.5",
         "--clip_epochs", "1", "--clip_batch_size", "3", "--external_save_dir", str(runs),
         "--run_name", "p"]
    )  # fmt: skip
    ids = json.loads((runs / "p" / "poison_ids.json").read_text())
    assert len(ids["ids"]) == 3 and set(ids["ids"]) <= set(range(6))
    poisoned, _ = clip.load_clip(str(real_mode["config"]), runs / "p" / clip.CLIP_WEIGHTS)
    start = real_mode["model"].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in poisoned.state_dict().items())
    report = entry_main("train/clip_clean.py")(
        [*real, "--clip_pretrained", str(runs / "p" / clip.CLIP_WEIGHTS), "--clean_data",
         str(real_mode["csv"]), "--epochs", "1", "--batch_size", "3", "--external_save_dir",
         str(runs), "--run_name", "c"]
    )  # fmt: skip
    assert report["method"] == "par" and report["num_pairs"] == 6
    assert (runs / "c" / "DONE").is_file()
    with pytest.raises(SRDError, match="^--poisoned_run: give either"):
        entry_main("train/clip_clean.py")(
            [*real, "--clip_pretrained", str(real_mode["weights"]), "--poisoned_run",
             str(runs / "p"), "--external_save_dir", str(runs), "--run_name", "x"]
        )  # fmt: skip
