"""Stage C: Semantic Fidelity Score of a model's captions against clean reference captions.

Reads ``<data_dir_path>/<name>/<type>/{images.npz,img_id.json,sent.json}`` (written by the
evaluation stage), captions the clean images with a reference captioner (the clean captioner
given by the model flags, or BLIP with ``--blip_model``), and writes per-image S_sem, S_flu,
SFS (and CLIP score with ``--clip_model``) keyed by image id, with means over the whole set.

Example: ``python eval/evaluate_sfs.py --name badnet --type attack --data_dir_path
result/sfs_inputs --annotations_path data/synthetic/annotations/captions_train2014.json``
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.errors import SRDError
from srd.evaluation.captioning import SFS_KINDS
from srd.evaluation.scorers import BlipCaptioner, ReferenceCaptioner
from srd.evaluation.sfs import (
    SFSModelArgs,
    evaluate_sfs,
    load_scorer,
    load_sfs_inputs,
    resolve_device,
)
from srd.flags import COUNT, SEED
from srd.io import setup_logging, write_json
from srd.runs import check_writable

log = logging.getLogger("evaluate_sfs")


@dataclasses.dataclass
class SFSEvalArgs:
    """SFS evaluation: inputs, scoring models and output."""

    name: str = arg(help="model/attack folder under --data_dir_path (e.g. badnet)")
    type: str = arg(
        help="sub-folder under --name: attack (captions of triggered images) or clean",
        choices=list(SFS_KINDS),
    )
    data_dir_path: str = arg("result/sfs_inputs", help="root of the evaluation stage's SFS inputs")
    clip_model: str | None = arg(
        None, help="HF CLIP folder or hub id for the CLIP score (optional)"
    )
    batch_size: int = arg(32, help="images per batch", check=COUNT)
    device: str = arg("auto", help="torch device (auto: cuda when available)")
    seed: int = arg(0, help="torch seed (BLIP samples its reference captions)", check=SEED)
    output: str | None = arg(None, help="output JSON (default: <input folder>/sfs.json)")
    overwrite: bool = arg(False, help="replace an existing output JSON")


def main(
    argv: Sequence[str] | None = None, reference_captioner: ReferenceCaptioner | None = None
) -> dict[str, Any]:
    """Run stage C; ``reference_captioner`` overrides the model flags (used by tests)."""
    from srd.captioner.args import ModelArgs
    from srd.captioner.factory import load_captioner

    cfg, models, model_args = parse(
        argv, SFSEvalArgs, SFSModelArgs, ModelArgs, description=__doc__.splitlines()[0]
    )
    input_dir = Path(cfg.data_dir_path) / cfg.name / cfg.type
    output = Path(cfg.output) if cfg.output else input_dir / "sfs.json"
    if output.is_dir():
        raise SRDError(f"--output {output}: is a folder, expected a JSON file path")
    if output.exists() and not cfg.overwrite:
        raise SRDError(f"--output {output}: already exists (pass --overwrite to replace it)")
    if cfg.batch_size < 1:
        raise SRDError(f"--batch_size {cfg.batch_size}: must be >= 1")
    inputs = load_sfs_inputs(input_dir)  # cheap checks first, before any model loads
    check_writable(output.parent, "--output")
    setup_logging()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    scorer = load_scorer(
        models, device, cfg.batch_size, model_args.trust_remote_code, clip_model=cfg.clip_model
    )
    if reference_captioner is not None:
        source = "injected"
    elif models.blip_model:
        reference_captioner = BlipCaptioner.from_pretrained(
            models.blip_model, device, cfg.batch_size
        )
        source = f"blip:{models.blip_model}"
    else:
        captioner = load_captioner(model_args, device=device)
        reference_captioner = functools.partial(captioner.caption, batch_size=cfg.batch_size)
        source = f"captioner:{model_args.checkpoint_path}"
    scorer.reference_captioner = reference_captioner
    # The log file is opened only now, so bad input leaves no file behind.
    setup_logging(output.parent / f"{output.stem}.log")
    log.info("scoring %d captions in %s (reference: %s)", len(inputs.captions), input_dir, source)

    record = evaluate_sfs(inputs, scorer, batch_size=cfg.batch_size)
    config = to_dict(cfg, models, model_args)
    config.update(input_dir=str(input_dir), output=str(output), device=device, reference=source)
    record = {"config": config, **record}
    write_json(output, record)
    log.info("wrote %s", output)
    print(json.dumps({"output": str(output), **record["means"]}))
    return record


if __name__ == "__main__":
    run_main(main)
