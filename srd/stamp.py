"""Run a pipeline stage once: skip it when its output was made by the same command from the
same inputs, and refuse an output made otherwise (never reuse a stale one).

The run/*.sh scripts wrap each stage (shell function ``once`` in run/common.sh)::

    python -m srd.stamp OUTPUT [--input FILE]... -- COMMAND...

OUTPUT is the stage's "finished" signal (a run's ``DONE``, a result JSON). After COMMAND
succeeds and OUTPUT exists, ``OUTPUT.stamp`` records

* the command from its Python script on (``train/defend.py --num_epochs 2 ...``): the launcher
  before it (python, accelerate launch, torchrun) may change between runs, the flags may not;
* the sha256 of every argument that names an existing file (checkpoints, poison plans, data
  JSONs; not the ``.py`` scripts: editing the code does not invalidate results), of every
  folder given to a flag of ``FOLDER_INPUTS`` (image folders, the LM folder, SODA's data: all
  their files, ``srd.io.tree_digest``), of the built-in attack config behind an attack given
  by name (``NAMED_INPUTS``), and of every ``--input`` file or folder (inputs named by their
  folder, e.g. a pool's ``pool.json``), read before the command starts;
* OUTPUT's size and modification time, so an output replaced afterwards is not taken for the
  stamped one.

When OUTPUT exists, a matching stamp skips the stage ("up to date"); a stamp that differs, or no
stamp at all, is refused with one line naming what differs and exit code 2: remove the stage's
output (its run folder) to redo it, or pass the stage's own ``--overwrite``, which always runs
it. Inputs are compared where both stamps have them: a file that did not exist when the stage
ran (e.g. a policy that a later stage writes under a shared flag) was not one of its inputs.

``--adopt`` stamps an existing unstamped output as made by this command (outputs made before
stamps existed; whoever passes it vouches for them), after comparing the command's flags with
what the output's own record says it was made with (a run folder's ``config.json`` beside a
``DONE``, a result JSON's ``config``): a flag recorded with another value is refused, so
adopting never certifies a run made with other settings. Nothing is ever deleted here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srd.cli import EXIT_BAD_INPUT, light_main
from srd.errors import SRDError
from srd.io import path_digest, read_json, write_json
from srd.runs import describe_difference, differing_keys

SUFFIX = ".stamp"
FORMAT = "srd-stamp/1"


FOLDER_INPUTS = (
    "--coco_train_image_dir_path",
    "--coco_val_image_dir_path",
    "--lm_path",
    "--lm_tokenizer_path",
    "--data_dir",
    "--reference_model_dir",
)
"""Flags whose folder is read as an input (its files are digested); other folder flags
(``--external_save_dir``, ``--results_file``, ...) are where a stage writes."""

NAMED_INPUTS = {"--bd_attack_type": Path(__file__).resolve().parent / "attacks" / "configs"}
"""Flags whose value may be a name standing for ``<folder>/<name>.yaml`` (srd.attacks' built-in
configs, ``srd.attacks.config.CONFIG_DIR``): that file is an input too."""


def stamp_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}{SUFFIX}")


def command_key(command: Sequence[str]) -> list[str]:
    """The part of ``command`` that says what it computes: from the first ``.py`` on (all of
    it when there is none)."""
    for i, token in enumerate(command):
        if token.endswith(".py"):
            return list(command[i:])
    return list(command)


def _file_tokens(command: Sequence[str]) -> list[str]:
    """Arguments (or ``--flag=value`` values) naming existing regular files, scripts excluded."""
    found = []
    for token in command:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if value and not value.endswith(".py") and Path(value).is_file():
            found.append(value)
    return found


def _flag_values(command: Sequence[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of every ``--flag value`` and ``--flag=value`` in ``command``."""
    pairs = []
    for i, token in enumerate(command):
        flag, eq, value = token.partition("=")
        if flag.startswith("--") and eq:
            pairs.append((flag, value))
        elif token.startswith("--") and i + 1 < len(command):
            pairs.append((token, command[i + 1]))
    return pairs


def _other_inputs(command: Sequence[str]) -> list[str]:
    """The folders of ``FOLDER_INPUTS`` flags and the config files of ``NAMED_INPUTS`` flags."""
    found = []
    for flag, value in _flag_values(command):
        if flag in FOLDER_INPUTS and Path(value).is_dir():
            found.append(value)
        elif flag in NAMED_INPUTS and not Path(value).exists():
            config = NAMED_INPUTS[flag] / f"{value}.yaml"
            if config.is_file():
                found.append(str(config))
    return found


def _flags(command: Sequence[str]) -> dict[str, Any]:
    """``{'script': 'train/x.py', '--a': '1', '--b': ['2', '3'], '--c': True}`` for naming
    differences flag by flag; a repeated flag maps to the list of its occurrences
    (``--input a --input b --input c`` -> ``['a', 'b', 'c']``)."""
    seen: dict[str, list[Any]] = {}
    key = "script"
    values: list[str] = []

    def close() -> None:
        seen.setdefault(key, []).append(values[0] if len(values) == 1 else (values[:] or True))

    for token in command:
        if token.startswith("--"):
            close()
            key, _, value = token.partition("=")
            values = [value] if value else []
        else:
            values.append(token)
    close()
    return {k: v[0] if len(v) == 1 else v for k, v in seen.items()}


def fingerprint(output: str, command: Sequence[str], inputs: Sequence[str]) -> dict[str, Any]:
    """What makes OUTPUT: the command (from its script on) and its input files' digests."""
    key = command_key(command)
    for path in inputs:
        if not Path(path).exists():
            raise SRDError(f"--input {path}: not found (run the stage that makes it first)")
    out = os.path.normpath(output)
    paths = [*_file_tokens(key), *_other_inputs(key), *inputs]
    paths = [p for p in paths if os.path.normpath(p) != out]
    return {
        "format": FORMAT,
        "command": key,
        "inputs": {os.path.normpath(p): path_digest(p) for p in dict.fromkeys(paths)},
    }


def _output_state(output: str) -> dict[str, int]:
    info = Path(output).stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def describe(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The flags and input files that differ, e.g. ``--num_epochs 2 -> 3, input X changed``."""
    parts = []
    old, new = _flags(saved.get("command") or []), _flags(current["command"])
    keys = differing_keys(old, new)
    if keys:
        parts.append(describe_difference(old, new, keys))
    changed = changed_inputs(saved.get("inputs") or {}, current["inputs"])
    parts += [f"input {p} changed" for p in changed[:3]]
    if len(changed) > 3:
        parts.append(f"{len(changed) - 3} more inputs changed")
    return ", ".join(parts) or "a different stamp"


def changed_inputs(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Input files whose digest differs between two stamps (files on one side only are not
    compared: they were not inputs when the stage ran, or are gone and cannot have changed)."""
    return [p for p in after if p in before and before[p] != after[p]]


def recorded_config(output: str) -> dict[str, Any] | None:
    """The flags OUTPUT was made with, as its own record says (None: no record): the run
    folder's ``config.json`` beside a ``DONE``, or a result JSON's ``config``."""
    out = Path(output)
    if out.name == "DONE":
        config = out.parent / "config.json"
        data = read_json(config) if config.is_file() else None
        return data if isinstance(data, dict) else None
    if out.suffix == ".json":
        data = read_json(out)
        config = data.get("config") if isinstance(data, dict) else None
        return config if isinstance(config, dict) else None
    return None


def _same_value(given: Any, recorded: Any) -> bool:
    """Whether a flag's value as :func:`_flags` reads it (a string, a list of strings, True for
    a flag without a value) means the recorded value: numbers by value, paths normalised."""
    if isinstance(recorded, bool):
        return given in (True, "true", "True") if recorded else given in ("false", "False")
    if isinstance(recorded, list):
        given = given if isinstance(given, list) else [given]
        return len(given) == len(recorded) and all(
            _same_value(g, r) for g, r in zip(given, recorded, strict=True)
        )
    if not isinstance(given, str):
        return False
    if recorded is None:
        return given.lower() in ("none", "null", "")
    if isinstance(recorded, int | float):
        try:
            return float(given) == float(recorded)
        except ValueError:
            return False
    return os.path.normpath(given) == os.path.normpath(str(recorded)) or given == str(recorded)


def config_mismatch(command: Sequence[str], config: dict[str, Any]) -> str | None:
    """The first flag of ``command`` recorded in ``config`` with another value, as
    ``--flag VALUE (recorded: X)``; None when every recorded flag agrees. ``--no-flag`` is the
    flag given as false."""
    for flag, given in _flags(command_key(command)).items():
        if not flag.startswith("--"):  # the script
            continue
        name = flag[2:]
        if name.startswith("no-") and name[3:] in config and given is True:
            name, given = name[3:], "false"
        if name in config and not _same_value(given, config[name]):
            shown = " ".join(given) if isinstance(given, list) else "" if given is True else given
            return f"--{name} {shown} (recorded: {json.dumps(config[name])})"
    return None


def check(output: str, current: dict[str, Any], adopt: bool) -> str | None:
    """Why the stage is skipped, as its progress line ("up to date", or "adopted" under
    ``adopt``: an unstamped OUTPUT now stamped as made by ``current``); None when OUTPUT does
    not exist (run it); SRDError when OUTPUT exists but was made otherwise."""
    if not Path(output).exists():
        return None
    path = stamp_path(output)
    if not path.is_file():
        if adopt:
            config = recorded_config(output)
            mismatch = config_mismatch(current["command"], config) if config else None
            if mismatch:
                raise SRDError(
                    f"{output}: not adopted: its record says it was made otherwise ({mismatch}); "
                    "remove it to redo the stage"
                )
            write_json(path, {**current, "output": _output_state(output), "adopted": True})
            return f"adopted: {output} (stamped as made by this command)"
        raise SRDError(
            f"{output}: exists but has no stamp ({path.name}), so nothing says which command "
            "and inputs made it; remove it to redo the stage, or set SRD_ADOPT=1 to vouch "
            "that this command made it"
        )
    saved = read_json(path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise SRDError(f"{path}: not a stamp ({FORMAT})")
    if saved.get("output") != _output_state(output):
        raise SRDError(
            f"{output}: changed after its stamp was written; remove it to redo the stage"
        )
    same = saved.get("command") == current["command"] and not changed_inputs(
        saved.get("inputs") or {}, current["inputs"]
    )
    if not same:
        raise SRDError(
            f"{output}: made by another command or from other inputs "
            f"({describe(saved, current)}); remove it (its run folder) to redo the stage, "
            "or change the run's name"
        )
    return f"up to date: {output} (same command and inputs)"


def run_once(output: str, command: Sequence[str], inputs: Sequence[str], adopt: bool) -> int:
    """Skip, refuse or run the stage; returns the exit code."""
    if not command:
        raise SRDError("no command after --")
    current = fingerprint(output, command, inputs)
    skipped = None if "--overwrite" in current["command"] else check(output, current, adopt)
    if skipped:
        print(f"=== {skipped}", flush=True)
        return 0
    code = subprocess.call(list(command))
    if code != 0:
        return code
    if not Path(output).exists():
        raise SRDError(f"{output}: the stage finished without writing it")
    write_json(stamp_path(output), {**current, "output": _output_state(output)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("error: usage: python -m srd.stamp OUTPUT [--input FILE]... -- COMMAND...",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m srd.stamp", description=__doc__)
    parser.add_argument("output")
    parser.add_argument("--input", action="append", default=[])
    parser.add_argument("--adopt", action="store_true")
    args = parser.parse_args(argv[:cut])
    return light_main(lambda: run_once(args.output, argv[cut + 1 :], args.input, args.adopt))


if __name__ == "__main__":
    sys.exit(main())
