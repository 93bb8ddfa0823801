"""SRD's registry entry (``--defense srd``), stage D4: the refine-tune on the agent's squares.

The squares come from the merged cleaning manifest of stages D1-D3b (``run/run_SRD.sh``), one
per image, painted on each image's version (``--image_version``); captions are kept, poisoned
ones too (the defender does not know which they are). The refine-tune itself is the registry's
(:class:`~srd.defenses.refine.RefineDefense`, trained by ``train/defend.py``), with the same
engine and budget as every other refine-tune defense.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srd.config import arg
from srd.defenses.refine import RefineDefense
from srd.defenses.registry import DefenderData, SquareArgs, register_defense
from srd.defenses.srd.merge import (
    MERGED_FILE,
    check_cleaning_run,
    masked_training_actions,
    read_merged,
)
from srd.defenses.srd.variants import variant_tags
from srd.errors import SRDError


@dataclass
class SRDDefenseArgs(SquareArgs):
    """srd: the cleaning run whose squares it paints (and the image version and colour)."""

    clean_data_save: str = arg(
        "", help="folder of the merged cleaning manifest (stage D3b's merged.json)"
    )


@register_defense("srd")
class SRD(RefineDefense):
    """SRD: the agent's kept square per image (merged manifest of D3b) on each version."""

    changes_images = True
    paints_squares = True
    Args = SRDDefenseArgs
    in_comparison = False  # needs its cleaning run: run/run_defenses.sh adds it when there is one

    @functools.cached_property
    def _manifest(self) -> dict[str, Any]:
        """The merged cleaning manifest, read once (checked, then used for the squares)."""
        if not self.args.clean_data_save:
            raise SRDError(
                "--clean_data_save: srd needs the cleaning manifest of stages D1-D3b "
                "(run run/run_SRD.sh first)"
            )
        return read_merged(self.args.clean_data_save)

    def check_inputs(self, checkpoint: str, poison_ids_path: str, benign_control: bool) -> None:
        source = f"--clean_data_save {self.args.clean_data_save}"
        check_cleaning_run(self._manifest, checkpoint, poison_ids_path, benign_control, source)

    def read_paths(self) -> dict[str, str]:
        return {"clean_data_save": str(Path(self.args.clean_data_save) / MERGED_FILE)}

    def mask_actions(self, data: DefenderData) -> dict[int, int]:
        return masked_training_actions(
            data.records, self._manifest, source=f"--clean_data_save {self.args.clean_data_save}"
        )

    chain = (
        "D1 train/srd_pool.py (--pool_source surrogate|data)",
        "D2 train/srd_train.py (DQN)",
        "D3 train/srd_clean_data.py (--policy dqn|random)",
        "D3b train/combine_data.py (merged.json)",
        "D4 train/defend.py --defense srd (--image_version triggered|first_occurrence)",
    )
    """The stages behind this entry: run/run_SRD.sh runs D1-D3b (and D4 with triggered)."""

    def variants(self) -> list[str]:
        """Its tags, "independent reference" when the cleaning run's reward reference was
        a captioner of its own (D1-D3 ``--reference_model_dir``), not the defended model's
        starting point, the agent's variant, and "reference agent schedule" when D2 trained
        with the reference's schedule (``train/srd_train.py --reference_schedule``)."""
        tags = super().variants()
        if self.args.clean_data_save and self.reference_model_dir():
            tags.append("independent reference")
        if self.args.clean_data_save:
            tags += variant_tags(self._clean_config().get("agent_variant", {}))
            schedule = self._clean_config().get("agent_schedule", "ours")
            tags += [] if schedule == "ours" else [f"{schedule} agent schedule"]
        return tags

    def _clean_config(self) -> dict[str, Any]:
        return self._manifest.get("clean_config", {}).get("config", {})

    def reference_model_dir(self) -> str | None:
        """The cleaning run's ``--reference_model_dir`` (None: the reward reference was
        ``--reference_checkpoint_path`` with the defended model's LM and tower, or BLIP)."""
        return self._clean_config().get("reference_model_dir")

    def describe(self) -> dict[str, Any]:
        record = {
            **super().describe(),
            "clean_data_save": self.args.clean_data_save,
            "chain": list(self.chain),
        }
        if self.args.clean_data_save and self.reference_model_dir():
            record["reference_model_dir"] = self.reference_model_dir()
        return record
