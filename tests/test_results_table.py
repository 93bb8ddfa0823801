"""The results table entry point: result JSONs -> Markdown rows, values, missing cells, errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from srd_fixtures import run_entry_point

from srd.errors import SRDError
from srd.evaluation.tables import load_result, results_table

REPO = Path(__file__).resolve().parents[1]

HEADER = (
    "| Model      | Attack | CIDEr clean (x100) | CIDEr triggered (x100) | ASR (%) "
    "| ASR (word) (%) | False trigger (%) | False trigger (word) (%) | BLEU-4 clean (x100) "
    "| METEOR clean (x100) |"
)
RULE = (
    "| ---------- | ------ | -----------------: | ---------------------: | ------: "
    "| -------------: | ----------------: | -----------------------: | ------------------: "
    "| ------------------: |"
)
ROW_ATTACKED = (
    "| badnet_srd | badnet |               85.1 |                   40.0 |    95.0 "
    "|           90.0 |               0.0 |                      1.0 |                23.5 "
    "|                20.1 |"
)
ROW_CLEAN = (
    "| clean      | -      |              100.0 |                      - |       - "
    "|              - |               2.0 |                      0.0 |                30.0 "
    "|                25.0 |"
)


def _metrics(bleu4: float, meteor: float, cider: float) -> dict[str, float]:
    return {"BLEU-1": 0.7, "BLEU-4": bleu4, "METEOR": meteor, "ROUGE-L": 0.5, "CIDEr": cider}


def _write_results(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    attacked = {
        "model_name": "badnet_srd",
        "attack": "badnet",
        "target": "banana",
        "num_images": 5,
        "metrics": {
            "clean": _metrics(0.2351, 0.2012, 0.8512),
            "triggered": _metrics(0.1, 0.15, 0.4),
            "asr_substring": 0.95,
            "asr_word": 0.9,
            "false_trigger_substring": 0.0,
            "false_trigger_word": 0.01,
        },
        "predictions": {"clean": {"1": "a dog"}, "triggered": {"1": "a banana"}},
        "config": {},
        "notes": [],
    }
    clean = {
        "model_name": "clean",
        "attack": None,
        "target": "banana",
        "num_images": 5,
        "metrics": {
            "clean": _metrics(0.3, 0.25, 1.0),
            "triggered": None,
            "asr_substring": None,
            "asr_word": None,
            "false_trigger_substring": 0.02,
            "false_trigger_word": 0.0,
        },
        "predictions": {"clean": {"1": "a dog"}, "triggered": None},
        "config": {},
        "notes": [],
    }
    (folder / "badnet_srd.json").write_text(json.dumps(attacked))
    (folder / "clean.json").write_text(json.dumps(clean))
    return folder


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def _run(capsys, *args: str) -> SimpleNamespace:
    """The command line's answer, in this process (``run_main`` as its ``__main__`` block)."""
    code, out, err = run_entry_point("eval/results_table.py", args, capsys)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_table_rows_columns_and_values(tmp_path):
    folder = _write_results(tmp_path / "result")
    table = results_table([folder])
    assert table.splitlines() == [HEADER, RULE, ROW_ATTACKED, ROW_CLEAN]


def test_entry_point_prints_and_writes_atomically(tmp_path, capsys):
    folder = _write_results(tmp_path / "result")
    out_md = tmp_path / "report" / "table.md"
    proc = _run(capsys, "--results", str(folder / "clean.json"), "--output", str(out_md))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3  # column widths follow the rows, so compare cell texts
    assert _cells(lines[0]) == _cells(HEADER)
    assert _cells(lines[2]) == _cells(ROW_CLEAN)
    assert out_md.read_text() == proc.stdout
    assert [p.name for p in out_md.parent.iterdir()] == ["table.md"]  # no temp file left


def test_sort_descending_and_sfs_stage_columns(tmp_path):
    folder = _write_results(tmp_path / "result")
    sfs_dir = folder / "sfs_inputs" / "clean" / "clean"
    sfs_dir.mkdir(parents=True)
    means = {"means": {"sem": 0.8, "flu": 1.1, "sfs": 0.9123}, "per_image": {}}
    (sfs_dir / "sfs.json").write_text(json.dumps(means))
    lines = results_table([folder], sort="-cider_clean").splitlines()
    assert lines[0].endswith("| METEOR clean (x100) | SFS clean | SFS triggered |")
    assert lines[2].startswith("| clean ")
    assert lines[2].endswith("|                25.0 |     0.912 |             - |")
    assert lines[3].startswith("| badnet_srd ")
    assert lines[3].endswith("|         - |             - |")
    # ascending ASR: the row without ASR goes last
    lines = results_table([folder], sort="asr").splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["badnet_srd", "clean"]


def test_malformed_json_exits_2_with_one_line_error(tmp_path, capsys):
    folder = _write_results(tmp_path / "result")
    bad = folder / "broken.json"
    bad.write_text("{not json")
    proc = _run(capsys, "--results", str(folder))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and str(bad) in lines[0]


def test_result_with_wrong_schema_names_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"model_name": "x", "metrics": {"clean": {"CIDEr": "high"}}}))
    with pytest.raises(SRDError, match=r"x\.json: malformed result JSON: 'metrics\.clean\.CIDEr'"):
        load_result(path)
    path.write_text(json.dumps({"metrics": {"clean": {}}}))
    with pytest.raises(SRDError, match="model_name"):
        load_result(path)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("asr_substring", 5.0, "[0, 1]"), ("asr_substring", float("nan"), "[0, 1]"),
     ("asr_substring", "0.5", "a number"), ("CIDEr", -3.0, "finite number >= 0")],
)  # fmt: skip
def test_numbers_out_of_range_are_refused(tmp_path, field, value, named):
    """Issue 32 item 5: the table printed ASR 500%, NaN and CIDEr -300."""
    metrics = {"clean": {"CIDEr": 1.0}, "asr_substring": 0.5}
    if field == "CIDEr":
        metrics["clean"]["CIDEr"] = value
    else:
        metrics[field] = value
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"model_name": "x", "metrics": metrics}))
    with pytest.raises(SRDError, match=re.escape(named)) as error:
        load_result(path)
    assert field in str(error.value) and "x.json" in str(error.value)


def test_no_results_names_the_flag(tmp_path, capsys):
    proc = _run(capsys, "--results", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --results {tmp_path}: no result JSON files found"
    with pytest.raises(SRDError, match="--sort"):
        results_table([tmp_path], sort="nope")


def test_the_working_folders_are_the_users() -> None:
    """README command 1 ends with ``results_table.py --results result``, and the run scripts
    write reports and figures into result/ and img/: a file the repository shipped there once
    stopped command 1 on a clean clone (SODA's record, "malformed result JSON"), and a
    newcomer's first comparison replaced the committed report. So nothing is tracked there;
    the project's published report lives in docs/report/."""
    listed = subprocess.run(
        ["git", "ls-files", "result", "img"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(listed) <= {"img/.gitkeep", "result/.gitkeep"}, listed
    assert (REPO / "docs" / "report" / "report.md").is_file()
