"""The one way to make a captioner: build it from :class:`~srd.captioner.args.ModelArgs`, load its
checkpoint.

A captioner is an OpenFlamingo model (open_clip vision tower -> perceiver resampler -> gated
cross-attention inside a Hugging Face causal LM) plus its tokenizer and image transform. The same
code builds the paper's ViT-L-14 + MPT-1B model and the embedded tiny model: only the flags differ.
"""

from __future__ import annotations

from typing import Any

import torch
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance, getattr_recursive
from transformers import (
    PreTrainedTokenizerBase,
)

from srd import captions
from srd.captioner.args import ModelArgs, model_signature, none_if_unset
from srd.captioner.checkpoint import load_checkpoint_into, set_trainable
from srd.captioner.flamingo import Captioner, SRDFlamingo, check_mixed_precision
from srd.captioner.lm import (
    decoder_layers_attr,
    ensure_embedding_accessors,
    load_lm,
    load_tokenizer,
    official_vocab_size,
)
from srd.captioner.vision import build_vision_encoder, clip_like
from srd.errors import SRDError


def build_flamingo(args: ModelArgs) -> Captioner:
    """Build the OpenFlamingo model from the flags (no checkpoint loaded)."""
    visual, transform, vis_dim = build_vision_encoder(
        args.vision_encoder_path, args.vision_encoder_pretrained, args.vision_tokens
    )
    tok = load_tokenizer(args.lm_tokenizer_path or args.lm_path, args.trust_remote_code)
    return assemble_flamingo(args, (visual, transform, vis_dim), tok, load_lm(args))


def assemble_flamingo(
    args: ModelArgs,
    vision: tuple[torch.nn.Module, Any, int],
    tok: PreTrainedTokenizerBase,
    lm: torch.nn.Module,
) -> Captioner:
    """Put a vision tower (tower, transform, width), a tokenizer and a causal LM together:
    cross-attention into the LM's decoder blocks, embeddings sized to the tokenizer."""
    visual, transform, vis_dim = vision
    ensure_embedding_accessors(lm)
    attr = decoder_layers_attr(lm, args.decoder_layers_attr_name)
    num_blocks = len(getattr_recursive(lm, attr))
    if not 1 <= args.cross_attn_every_n_layers <= num_blocks:
        raise SRDError(
            f"--cross_attn_every_n_layers {args.cross_attn_every_n_layers}: the LM has "
            f"{num_blocks} decoder blocks"
        )
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(attr)
    if lm.get_input_embeddings().num_embeddings != len(tok):
        lm.resize_token_embeddings(len(tok), mean_resizing=lm.device.type != "meta")
    model = SRDFlamingo(
        clip_like(visual),
        lm,
        eoc_token_id=tok.convert_tokens_to_ids(captions.END_OF_CHUNK),
        media_token_id=tok.convert_tokens_to_ids(captions.IMAGE_TOKEN),
        vis_dim=vis_dim,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        perceiver={
            "depth": args.perceiver_depth,
            "num_latents": args.perceiver_num_latents,
            "heads": args.perceiver_heads,
            "dim_head": args.perceiver_dim_head,
        },
    )
    set_trainable(model, "paper")
    return Captioner(model=model, tokenizer=tok, image_transform=transform, args=args)


def load_captioner(args: ModelArgs, device: str | torch.device = "cpu") -> Captioner:
    """Build the captioner and load ``args.checkpoint_path`` when given; ready for inference."""
    cap = build_flamingo(args)
    ckpt = none_if_unset(args.checkpoint_path)
    if ckpt:
        meta = load_checkpoint_into(
            cap.model,
            ckpt,
            expected_signature=model_signature(args),
            official_rows=official_vocab_size(cap.tokenizer),
        )
        cap.checkpoint_notes = {k: meta[k] for k in ("appended_token_rows", "epoch") if k in meta}
    device = torch.device(device)
    check_mixed_precision(args.mixed_precision, device)
    cap.model.to(device=device)
    cap.model.eval()
    return cap
