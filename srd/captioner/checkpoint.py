"""Checkpoints: the trainable parts, loading a checkpoint into a model, and export.

Checkpoints (``--checkpoint_path``) are state dicts of the Flamingo model holding at least the
trainable parts (perceiver, gated cross-attention, token embeddings), either raw (official
OpenFlamingo ``checkpoint.pt``) or wrapped as ``{"model_state_dict": ..., "config": ...}`` by our
training engine. Loading refuses keys the model does not have and trainable parts that are
absent; an official checkpoint's embedding is one row short of ours (``<answer>``): loading
appends the missing rows, initialised to the mean of the checkpoint's rows, and records it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from open_flamingo.src.flamingo import Flamingo
from transformers import (
    AutoModelForCausalLM,
)

from srd import captions
from srd.captioner.args import (
    FLAMINGO_CHECKPOINT,
    IDENTITY_KEYS,
    LEGACY_VISION_TOKENS,
    LM_FOLDER,
    TRAINABLE_MODES,
    VISION_WEIGHTS,
    ModelArgs,
    model_signature,
)
from srd.captioner.flamingo import Captioner
from srd.captioner.weights import read_checkpoint_file, write_checkpoint_file
from srd.errors import SRDError

log = logging.getLogger(__name__)


def set_trainable(model: Flamingo, mode: str) -> None:
    """Choose what trains: "paper" = perceiver + gated cross-attention + token embeddings
    (vision tower and LM blocks frozen, as the paper); "lm" = everything but the vision tower
    (the embedded pretrain over a pretrained tiny CLIP tower); "all" = every parameter."""
    if mode not in TRAINABLE_MODES:
        raise SRDError(f"--trainable {mode}: expected one of {TRAINABLE_MODES}")
    if mode == "lm":
        model.requires_grad_(True)
        model.vision_encoder.requires_grad_(False)
        return
    if mode == "all":
        model.requires_grad_(True)
        # Flamingo reads the tower's patch tokens, never its pooled projection (nor, with
        # pre-ln_post tokens, the final LayerNorm); a parameter that gets no gradient makes
        # multi-process (DDP) training fail, so these stay frozen.
        for part in pooled_only_parts(model.vision_encoder):
            part.requires_grad_(False)
        return
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)


def pooled_only_parts(visual: torch.nn.Module) -> list[torch.nn.Module | torch.nn.Parameter]:
    """Parts of the tower that only the pooled embedding uses (never the patch tokens)."""
    parts: list[torch.nn.Module | torch.nn.Parameter] = []
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        parts.append(visual.proj)
    if getattr(visual, "final_ln_after_pool", False) and hasattr(visual, "ln_post"):
        parts.append(visual.ln_post)
    return parts


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, detached on the CPU (one name per tensor)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


_XATTN_KEY = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.attn\.to_q\.weight$")


def describe_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The size facts of a Flamingo state dict: where and how often cross-attention sits, the LM
    width it attends from (OpenFlamingo-3B: every block of MPT-1B, width 2048; 4B: every 2nd
    block of RedPajama-3B, 2560; 9B: every 4th block of MPT-7B, 4096)."""
    found = sorted(
        (m.group(1), int(m.group(2)), tuple(v.shape))
        for k, v in state.items()
        if (m := _XATTN_KEY.match(k))
    )
    if not found:
        return {}
    blocks = sorted({path for path, _, _ in found})
    indices = [i for _, i, _ in found]
    return {
        "blocks": blocks[0] if len(blocks) == 1 else blocks,
        "cross_attn_blocks": len(indices),
        "cross_attn_every_n_layers": indices[0] + 1,
        "lm_width": found[0][2][1],
    }


def _embedding_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names of the LM's token embedding and (possibly tied) output embedding."""
    lm = model.lang_encoder
    ids = {id(lm.get_input_embeddings().weight)}
    out = lm.get_output_embeddings()
    if out is not None:
        ids.add(id(out.weight))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def _append_token_rows(
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    model: torch.nn.Module,
    official_rows: int | None,
    where: str,
) -> list[str]:
    """Grow embedding matrices of an official checkpoint by the rows of our appended tokens.

    The new rows (``<answer>``) are the mean of the checkpoint's rows, in place in ``state``.
    SRDError when the row counts match neither our vocabulary nor the official one.
    """
    grown = []
    for key in sorted(_embedding_keys(model) & set(state)):
        rows, want = state[key].shape[0], own[key].shape[0]
        if rows == want or state[key].dim() != 2 or state[key].shape[1] != own[key].shape[1]:
            continue
        if rows != official_rows:
            raise SRDError(
                f"{where}: its vocabulary ({rows} rows of {key}) does not fit the tokenizer "
                f"({want} tokens{f', {official_rows} without <answer>' if official_rows else ''}); "
                "check --lm_tokenizer_path"
            )
        old = state[key]
        extra = old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(want - rows, -1)
        state[key] = torch.cat([old, extra], dim=0)
        grown.append(key)
    return grown


def load_checkpoint_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    flag: str = "--checkpoint_path",
    expected_signature: dict[str, Any] | None = None,
    official_rows: int | None = None,
) -> dict[str, Any]:
    """Load a Flamingo state dict, strictly for what matters.

    Refuses: keys the model does not have, tensors of the wrong shape, and trainable parameters
    the file lacks (frozen towers may be absent: they come from the pretrained encoders); a
    checkpoint of another OpenFlamingo size is named as such. ``official_rows`` (the official
    vocabulary size, :func:`official_vocab_size`) allows an official checkpoint whose embeddings
    lack our appended ``<answer>`` row: the row is added as the mean of the others and the
    returned metadata records it under ``"appended_token_rows"``.
    Returns the checkpoint's metadata (empty for raw state dicts, apart from that record).
    """
    path = Path(path)
    where = f"{flag} {path}"
    raw = read_checkpoint_file(path, flag)
    meta = dict(raw) if "model_state_dict" in raw else {}
    state = dict(raw.get("model_state_dict", raw))
    meta.pop("model_state_dict", None)
    recorded = meta.get("config", {}).get("model_signature") if meta else None
    if recorded:
        recorded = {"vision_tokens": LEGACY_VISION_TOKENS, **recorded}
    if expected_signature and recorded:
        diff = {
            k: (recorded.get(k), v)
            for k, v in expected_signature.items()
            if recorded.get(k) != v and not (k in IDENTITY_KEYS and k not in recorded)
        }
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {a!r} vs flags {b!r}" for k, (a, b) in diff.items()
            )
            hint = (
                " (--lm_path / --vision_encoder_pretrained name other weights than it was trained "
                "over)"
                if set(diff) & set(IDENTITY_KEYS)
                else ""
            )
            raise SRDError(f"{where}: made for another model configuration ({detail}){hint}")
    own = model.state_dict()
    theirs, ours = describe_layout(state), describe_layout(own)
    if theirs and theirs != ours:
        raise SRDError(
            f"{where}: a checkpoint of another OpenFlamingo size (checkpoint: {_layout(theirs)}; "
            f"model: {_layout(ours)}; check --lm_path and --cross_attn_every_n_layers)"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise SRDError(
            f"{where}: does not fit the model ({len(unexpected)} unexpected keys, "
            f"e.g. {unexpected[0]})"
        )
    grown = _append_token_rows(state, own, model, official_rows, where)
    wrong = [k for k in state if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise SRDError(
            f"{where}: does not fit the model ({k} has shape {tuple(state[k].shape)}, "
            f"model expects {tuple(own[k].shape)})"
        )
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            aliases.setdefault(id(p), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in state for n in names)]
    if missing:
        raise SRDError(
            f"{where}: does not fit the model ({len(missing)} trainable tensors missing, "
            f"e.g. {missing[0]})"
        )
    model.load_state_dict(state, strict=False)
    if grown:
        rows = own[grown[0]].shape[0] - raw.get("model_state_dict", raw)[grown[0]].shape[0]
        meta["appended_token_rows"] = {
            "keys": grown,
            "rows": rows,
            "tokens": [captions.ANSWER_TOKEN],
            "init": "mean of the checkpoint's rows",
        }
        log.info("%s: appended %d token row(s) to %s (mean init)", path, rows, ", ".join(grown))
    return meta


def _layout(facts: dict[str, Any]) -> str:
    if not facts:
        return "no cross-attention"
    return (
        f"{facts['cross_attn_blocks']} cross-attention blocks in {facts['blocks']} every "
        f"{facts['cross_attn_every_n_layers']}, LM width {facts['lm_width']}"
    )


def export_captioner(cap: Captioner, out_dir: str | os.PathLike) -> ModelArgs:
    """Save a trained captioner as pretrained parts plus an OpenFlamingo checkpoint.

    Writes ``vision.safetensors`` (the visual tower), ``lm/`` (an ordinary HF model folder with
    the tokenizer: the LM blocks without the cross-attention) and ``checkpoint.pt`` (the
    paper-trainable parts), and returns the ModelArgs that load them back. This is how the
    embedded default's clean captioner looks exactly like a real pretrained OpenFlamingo.
    """
    from safetensors.torch import save_file

    from srd.io import atomic_path, ensure_dir

    out = ensure_dir(out_dir)
    model = cap.model
    with atomic_path(out / VISION_WEIGHTS) as tmp:
        state = {
            k: v.detach().cpu().contiguous() for k, v in model.vision_encoder.state_dict().items()
        }
        save_file(state, str(tmp))

    lm = model.lang_encoder
    attr = lm.decoder_layers_attr_name
    base_state = {}
    for key, value in lm.state_dict().items():
        if key.startswith("old_decoder_blocks."):
            base_state[f"{attr}." + key[len("old_decoder_blocks.") :]] = value
        elif key.startswith(f"{attr}.") or key.startswith("gated_cross_attn_layers."):
            continue  # Flamingo wrappers and cross-attention: not part of the base LM
        else:
            base_state[key] = value
    fresh = AutoModelForCausalLM.from_config(lm.config)
    fresh.load_state_dict(base_state, strict=True)
    lm_dir = out / LM_FOLDER
    fresh.save_pretrained(lm_dir)
    cap.tokenizer.save_pretrained(lm_dir)

    paper = {}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model, "paper")
    paper = trainable_state_dict(model)
    for n, p in model.named_parameters():
        p.requires_grad_(was[n])
    args = dataclasses.replace(
        cap.args,
        vision_encoder_pretrained=str(out / VISION_WEIGHTS),
        lm_path=str(lm_dir),
        lm_tokenizer_path=None,
        checkpoint_path=str(out / FLAMINGO_CHECKPOINT),
    )
    write_checkpoint_file(
        out / FLAMINGO_CHECKPOINT,
        {"model_state_dict": paper, "config": {"model_signature": model_signature(args)}},
    )
    return args
