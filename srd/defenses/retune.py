"""The re-tuning attack's results beside the defenses' (``train/retune.py``, run/run_retune.sh).

A defense's evaluation ``<results>/<run>.json`` has, once re-tuned, a sibling
``<results>/retune-<run>.json``: the same evaluation of the defended model after the attacker
fine-tuned it on a few of its poisons. The report shows that ASR beside the defense's.
"""

from __future__ import annotations

from pathlib import Path

from srd.errors import SRDError
from srd.evaluation.tables import check_number
from srd.io import read_json

RETUNE_PREFIX = "retune-"


def retune_result_path(result: str | Path) -> Path:
    """Where the re-tuned evaluation of the defense result ``result`` is written."""
    result = Path(result)
    return result.with_name(RETUNE_PREFIX + result.name)


def retuned_asr(result: str | Path) -> float | None:
    """ASR of the re-tuned model of the defense result ``result`` (None: not re-tuned)."""
    path = retune_result_path(result)
    if not path.is_file():
        return None
    data = read_json(path)
    asr = (data.get("metrics") or {}).get("asr_substring") if isinstance(data, dict) else None
    if asr is None:
        raise SRDError(f"{path}: not an evaluation result with an ASR (re-tune of {result})")
    return check_number(asr, f"{path}: malformed result JSON: 'metrics.asr_substring'")
