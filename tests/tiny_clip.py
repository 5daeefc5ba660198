"""A tiny randomly initialised open_clip model: a registered architecture and a local checkpoint of
its random weights, so that open_clip code runs without downloading any weights (the embedding,
prompt and explorer tests, and ``bench/encode.py``)."""

from __future__ import annotations

import json
from pathlib import Path

TINY = "cdi-tiny-test"
TINY_BIASED = "cdi-tiny-biased-test"  # open_clip picks a T5 tokenizer for names with "siglip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def save_tiny_model(root: Path, name: str, cfg: dict = TINY_CFG) -> Path:
    """Register ``cfg`` with open_clip as ``name`` (its JSON under ``root/configs``) and save the
    random weights of ``torch.manual_seed(0)`` to ``root/NAME.pt``; return that checkpoint."""
    import open_clip
    import torch

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    ckpt = root / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), ckpt)
    return ckpt
