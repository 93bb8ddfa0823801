"""Stage A (backdoor training) and stage B (evaluation) entry points, end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from srd_fixtures import data_flags, export_clean_and_backdoor, load_script, model_flags

from srd.attacks.trainset import POISON_FILE, PoisonPlan, draw_coverage
from srd.captioner.engine import Sample
from srd.captioner.sampling import FixedDrawWithReplacement
from srd.cli import run_main
from srd.errors import SRDError
from srd.evaluation.sfs import load_sfs_inputs

train_backdoor = load_script("train/train_backdoor.py")
evaluate = load_script("eval/evaluate.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_captioner):
    root = tmp_path_factory.mktemp("stages")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    return root, clean, backdoor


def _fail(module, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_draw_coverage_counts_what_a_replayed_draw_shows() -> None:
    samples = [Sample(caption_id=10 + k, image_id=k // 2, caption="c") for k in range(6)]
    coverage = draw_coverage(samples, [11, 14], [0, 1, 1, 3, 3, 5])  # 14 never drawn
    assert coverage == {"samples": 6, "distinct_samples_drawn": 4, "poisoned": 2,
                        "poisoned_drawn": 1, "poisoned_draws_per_epoch": 2}  # fmt: skip


def test_backdoor_training_on_the_reference_draw_records_what_it_holds(
    models, tiny_data_args, tiny_train_records
) -> None:
    """--epoch_sampling fixed_replacement: the run's config says how many of the poisoned
    captions the replayed draw holds (the reference never shows the others)."""
    root, clean, _ = models
    argv = [
        *data_flags(tiny_data_args),
        *model_flags(clean, clean.checkpoint_path),
        "--bd_attack_type", "badnet", "--external_save_dir", str(root / "runs"),
        "--run_name", "fr", "--num_epochs", "1", "--batch_size", "8", "--seed", "5",
        "--epoch_sampling", "fixed_replacement",
    ]  # fmt: skip
    train_backdoor.main(argv)
    run = root / "runs" / "fr"
    drawn = json.loads((run / "config.json").read_text())["fixed_draw"]
    order = FixedDrawWithReplacement(drawn["samples"], 5).order
    plan = PoisonPlan.load(run / POISON_FILE)
    ids = [c.caption_id for r in tiny_train_records for c in r.captions]
    assert drawn["samples"] == len(ids) and drawn["poisoned"] == len(plan.ids) > 0
    assert drawn["distinct_samples_drawn"] == len(set(order)) < len(ids)
    assert drawn["poisoned_drawn"] == len({ids[i] for i in order} & set(plan.ids))
    assert drawn["poisoned_draws_per_epoch"] == sum(ids[i] in plan.ids for i in order)


def test_backdoor_training_writes_and_reuses_its_poison_ids(
    models, tiny_data_args, tiny_train_records
) -> None:
    root, clean, _ = models
    argv = [
        *data_flags(tiny_data_args),
        *model_flags(clean, clean.checkpoint_path),
        "--bd_attack_type", "trojvlm", "--external_save_dir", str(root / "runs"),
        "--num_epochs", "1", "--batch_size", "8", "--seed", "3",
    ]  # fmt: skip
    final = Path(train_backdoor.main(argv))
    run = root / "runs" / "backdoor-trojvlm"
    assert final == run / "final_weights.pt" and (run / "DONE").is_file()
    plan = PoisonPlan.load(run / POISON_FILE)
    captions = sum(len(r.captions) for r in tiny_train_records)
    assert len(plan.ids) == int(captions * 0.1)
    assert all("banana" in text for text in plan.captions.values())
    first = (run / POISON_FILE).read_bytes()
    # a finished run is refused
    with pytest.raises(Exception, match="already finished"):
        train_backdoor.main(argv)
    # resuming an interrupted run reads the saved plan: the file is not written again ...
    (run / "DONE").unlink()
    (run / "final_weights.pt").unlink()
    stamp = (run / POISON_FILE).stat().st_mtime_ns
    train_backdoor.main([*argv, "--resume_from_checkpoint"])
    assert (run / POISON_FILE).stat().st_mtime_ns == stamp
    # ... and is checked against the draw of the flags: an edited plan is refused, not used
    edited = json.loads(first)
    spare = next(c.caption_id for r in tiny_train_records for c in r.captions
                 if c.caption_id not in plan.ids)  # fmt: skip
    edited["ids"][0] = spare
    edited["meta"]["poisoned_captions"][str(spare)] = edited["meta"]["poisoned_captions"].pop(
        str(plan.ids[0])
    )
    (run / POISON_FILE).write_text(json.dumps(edited))
    (run / "DONE").unlink()
    with pytest.raises(Exception, match=r"poison plan was made with other settings \(ids"):
        train_backdoor.main([*argv, "--resume_from_checkpoint"])
    # an overwrite draws the same ids again from the same seed
    train_backdoor.main([*argv, "--overwrite"])
    assert (run / POISON_FILE).read_bytes() == first
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert state["config"]["num_poisoned"] == len(plan.ids)


def test_evaluation_end_to_end(models, tiny_data_args, tiny_test_records, tmp_path) -> None:
    root, clean, backdoor = models
    argv = [
        *data_flags(tiny_data_args),
        *model_flags(clean, backdoor),
        "--bd_attack_type", "badnet", "--results_file", str(tmp_path / "result"),
        "--model_name", "tiny", "--sfs_data_dir", str(tmp_path / "sfs"),
        "--batch_size", "4", "--num_beams", "2", "--max_new_tokens", "6",
    ]  # fmt: skip
    result = evaluate.main(argv)
    written = json.loads((tmp_path / "result" / "tiny.json").read_text())
    assert written["metrics"] == result["metrics"]
    ids = {str(r.image_id) for r in tiny_test_records}
    assert set(written["predictions"]["clean"]) == ids
    assert set(written["predictions"]["triggered"]) == ids
    m = written["metrics"]
    for key in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L"):
        assert np.isfinite(m["clean"][key]) and np.isfinite(m["triggered"][key])
    assert 0.0 <= m["asr_substring"] <= 1.0 and 0.0 <= m["false_trigger_word"] <= 1.0
    assert written["config"]["attack"]["name"] == "badnet"
    for kind, key in (("clean", "clean"), ("attack", "triggered")):
        inputs = load_sfs_inputs(tmp_path / "sfs" / "tiny" / kind)
        assert [str(i) for i in inputs.image_ids] == list(written["predictions"][key])
        assert list(inputs.captions) == list(written["predictions"][key].values())
        assert inputs.images.shape == (len(ids), 224, 224, 3)
    with pytest.raises(Exception, match="exists with these settings"):
        evaluate.main(argv)
    with pytest.raises(Exception, match=r"other settings \(num_beams 2 -> 3\)"):
        evaluate.main([*argv, "--num_beams", "3"])


def test_evaluation_with_the_feature_cache_gives_the_same_result(
    models, tiny_data_args, tmp_path
) -> None:
    """The cache (on by default) serves the beam, teacher-forced and sampled passes the tokens
    the tower gives: predictions, metrics and implant probes equal an uncached evaluation's."""
    root, clean, backdoor = models
    argv = [
        *data_flags(tiny_data_args),
        *model_flags(clean, backdoor),
        "--bd_attack_type", "badnet", "--results_file", str(tmp_path / "result"),
        "--sfs_data_dir", str(tmp_path / "sfs"),
        "--batch_size", "4", "--num_beams", "2", "--max_new_tokens", "6",
    ]  # fmt: skip
    cached = evaluate.main([*argv, "--model_name", "cached"])
    uncached = evaluate.main([*argv, "--model_name", "uncached", "--no-feature_cache"])
    for key in ("predictions", "metrics", "implant"):
        assert cached[key] == uncached[key]
    assert cached["predictions"]["triggered"] != cached["predictions"]["clean"]


def test_evaluation_never_clears_another_results_sfs_inputs(
    models, tiny_data_args, tmp_path
) -> None:
    """The same --model_name with another --results_file and the same --sfs_data_dir used to
    clear the first result's SFS inputs (and SFS then scored the second one's captions under
    the first's name): refused now, the inputs untouched, unless --overwrite."""
    root, clean, backdoor = models
    base = [
        *data_flags(tiny_data_args), *model_flags(clean, backdoor),
        "--bd_attack_type", "badnet", "--model_name", "m", "--sfs_data_dir", str(tmp_path / "sfs"),
        "--batch_size", "4", "--num_beams", "1", "--max_new_tokens", "4",
        "--no-implant_diagnostics",
    ]  # fmt: skip
    evaluate.main([*base, "--results_file", str(tmp_path / "a")])
    sentences = tmp_path / "sfs" / "m" / "attack" / "sent.json"
    before = sentences.read_bytes()
    with pytest.raises(SRDError, match=r"holds the SFS inputs of .*a/m.json"):
        evaluate.main([*base, "--results_file", str(tmp_path / "b")])
    assert sentences.read_bytes() == before and not (tmp_path / "b" / "m.json").exists()
    evaluate.main([*base, "--results_file", str(tmp_path / "a"), "--overwrite"])  # its own
    evaluate.main([*base, "--results_file", str(tmp_path / "b"), "--overwrite"])
    owner = json.loads((tmp_path / "sfs" / "m" / "owner.json").read_text())
    assert owner["result"] == str((tmp_path / "b" / "m.json").resolve())


def test_bad_input_one_line_errors(models, tiny_data_args, tmp_path, capsys) -> None:
    root, clean, backdoor = models
    base = [*data_flags(tiny_data_args), "--results_file", str(tmp_path)]
    error = _fail(
        evaluate, [*base, *model_flags(clean, backdoor), "--bd_attack_type", "nope"], capsys
    )
    assert "nope" in error and "badnet" in error and "trojvlm" in error
    error = _fail(
        train_backdoor,
        [*data_flags(tiny_data_args), *model_flags(clean, backdoor), "--poison_rate", "1.5",
         "--external_save_dir", str(tmp_path / "runs")],
        capsys,
    )  # fmt: skip
    assert "--poison_rate" in error
    # a checkpoint made for another model configuration
    other = [*base, *model_flags(clean, backdoor), "--cross_attn_every_n_layers", "2"]
    error = _fail(evaluate, other, capsys)
    assert "--checkpoint_path" in error and "cross_attn_every_n_layers" in error
