"""The embedded default's pretrained models as release files (srd/captioner/release.py).

    python train/release.py --action install   # command 1: release/embedded -> checkpoints_remote
    python train/release.py --action make      # after RETRAIN=1: the build -> release/embedded

``install`` checks every file against the manifest and the benchmark data against the data the
models were trained on, and leaves a folder that already holds the release alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.captioner import release
from srd.cli import run_main
from srd.config import arg, parse


@dataclass
class ReleaseArgs:
    """What to do, and where."""

    action: str = arg(help="install the release, or make it from a finished build",
                      choices=["install", "make"])  # fmt: skip
    release_dir: str = arg(str(release.RELEASE_DIR), help="the release folder")
    install_dir: str = arg(
        str(release.INSTALL_DIR), help="where the models live (clip/, pretrain/, clean/)"
    )
    data_dir: str = arg("data/synthetic", help="the benchmark folder (train/prepare_data.py)")
    overwrite: bool = arg(False, help="replace other weights (install) or the release (make)")


def main(argv: Sequence[str] | None = None) -> dict:
    (args,) = parse(argv, ReleaseArgs, description=__doc__)
    where, out, data = Path(args.release_dir), Path(args.install_dir), Path(args.data_dir)
    if args.action == "make":
        manifest = release.make(out, data, where, args.overwrite)
        print(f"release made in {where}: {len(manifest['files'])} files")
    else:
        manifest, copied = release.install(where, out, data, args.overwrite)
        state = "installed into" if copied else "already in"
        print(f"released models {state} {out} (made at {manifest['made_by']['commit'][:12]})")
    print(json.dumps(manifest["metrics"], indent=1))
    return manifest


if __name__ == "__main__":
    run_main(main)
