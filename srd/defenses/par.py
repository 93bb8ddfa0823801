"""PAR (Perturb and Recover) on the captioner: a refine-tune whose loss is the caption loss minus
a thresholded push of the student's perceiver outputs (or cross-attention states) away from a
frozen copy of the backdoored captioner (:mod:`srd.par.captioner`).

The data and budget are those of a refine-tune baseline, so the baseline is PAR's push-free
control (PAR's ``ft``):

* ``--par_data clean`` (default): the ``clean_finetune`` data (clean captions, clean images), as
  PAR assumes clean pairs; the control is ``clean_finetune``;
* ``--par_data as_left``: the ``no_mask`` data (the defender's data as the attack left it,
  poisoned captions and triggered images included); the control is ``no_mask``.

The push distance and the switch are logged per step in the run's ``step_log.jsonl``; the
defense record gets their summary (:meth:`srd.par.captioner.CaptionerPush.summary`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from srd.captioner.engine import Sample, TrainArgs
from srd.config import arg
from srd.defenses.refine import CleanFinetune, NoMask
from srd.defenses.registry import DefenderData, Defense, VersionArgs, register_defense
from srd.errors import SRDError
from srd.flags import at_least, positive
from srd.par.captioner import FEATURES, CaptionerPush

PAR_DATA = {"clean": CleanFinetune, "as_left": NoMask}
"""``--par_data`` -> the baseline whose data (and so push-free control) PAR shares."""


@dataclass
class PARArgs(VersionArgs):
    """par: its data, the states it pushes and the push's threshold and weight."""

    par_data: str = arg(
        "clean",
        help="clean (the clean_finetune data, PAR's clean pairs) or as_left (the no_mask data, "
        "poisoned samples included; then --image_version applies)",
        choices=list(PAR_DATA),
    )
    par_feature: str = arg(
        "perceiver",
        help="states pushed from the frozen copy: perceiver outputs or gated cross-attention "
        "outputs",
        choices=list(FEATURES),
    )
    loss_thresh: float = arg(
        2.15, help="tau: the push is off while the distance exceeds it", check=positive()
    )
    push_weight: float = arg(0.5, help="weight of the push term (PAR: 0.5)", check=at_least(0))


@register_defense("par")
class PAR(Defense):
    """Caption loss minus the thresholded push away from the frozen backdoored model."""

    kind = "refine"
    Args = PARArgs

    def __init__(self, args: Any = None):
        super().__init__(args)
        if self.args.image_version != "triggered" and not self.uses_image_version():
            raise SRDError(
                f"--image_version {self.args.image_version}: applies to --par_data as_left only "
                "(the clean data hold no triggered image)"
            )

    def uses_image_version(self) -> bool:
        return self.args.par_data == "as_left"

    def training_set(self, data: DefenderData) -> tuple[list[Sample], Any]:
        return PAR_DATA[self.args.par_data](self.args).training_set(data)

    def training_loss(self, captioner: Any, train_args: TrainArgs) -> CaptionerPush:
        if self.args.par_feature == "perceiver" and train_args.trainable == "all":
            raise SRDError(
                "--trainable all: par --par_feature perceiver needs the frozen vision tower "
                "(use --trainable paper or lm, or --par_feature cross_attention)"
            )
        a = self.args
        return CaptionerPush(captioner.model, a.loss_thresh, a.push_weight, a.par_feature)

    def describe(self) -> dict[str, Any]:
        a = self.args
        variant = [v for v in (a.par_data, a.par_feature) if v not in ("clean", "perceiver")]
        record = {
            **super().describe(),
            "par_data": a.par_data,
            "control": PAR_DATA[a.par_data].name,
            "par_feature": a.par_feature,
            "loss_thresh": a.loss_thresh,
            "push_weight": a.push_weight,
        }
        if a.par_data == "as_left":  # the clean data has no triggered image version to pick
            record["image_version"] = a.image_version
        if variant:
            record["variant"] = ", ".join(variant)
        return record
