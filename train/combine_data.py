"""SRD stage D3b: merge the cleaned-data shards (reference combine_data.py).

Joins the shards under --clean_data_save by image id into ``merged.json`` there, and fails with
a one-line error when a training image is missing or appears twice, a shard is missing or
unfinished, or the folder mixes shards of different cleaning runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from srd.cli import run_main
from srd.config import parse
from srd.data.records import DataArgs
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.merge import MERGED_FILE, combine_clean_data
from srd.io import setup_logging

log = logging.getLogger("combine_data")


def main(argv: Sequence[str] | None = None) -> str:
    data, srd = parse(argv, DataArgs, SRDArgs, description=__doc__)
    ids = [r.image_id for r in data.split("train")]
    merged = combine_clean_data(srd.clean_data_save, ids)
    setup_logging()  # only now: bad input gives one line of error and nothing else
    out = Path(srd.clean_data_save) / MERGED_FILE
    print(json.dumps({"merged": str(out), "images": len(ids), "rewards": merged["reward_counts"]}))
    return str(out)


if __name__ == "__main__":
    run_main(main)
