"""Prompt text -> text embeddings with the open_clip model an index was built from (text tower only).

Which model: ``model_of(pool)`` reads the manifest. A DataComp index records the open_clip model
and tag that produced its arrays (``extra.open_clip_model`` / ``extra.open_clip_pretrained``,
e.g. ``ViT-L-14`` / ``openai`` for ``--arch l14``); an open_clip index records ``model`` and
``pretrained`` (a tag or the absolute path of a local checkpoint); a clip-retrieval index records
them when they were given. ``model`` / ``pretrained`` arguments override the manifest, e.g. a
local checkpoint of the same model on a machine that cannot download the tag.

Loading: ``text_encoder`` loads a model once per process and keeps it (``_ENCODERS``, keyed by
model, weights and device); the image tower is dropped right after loading, so a cached encoder
holds only the text transformer. When the weights cannot be loaded (no network access to the model
hub, an unknown tag, a bad checkpoint) the error names the model and says how to give the prompt's
embedding instead (``encode-text`` on a machine that has the weights, then ``--prompt-embedding``).
"""

from __future__ import annotations

import logging
import shlex
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip_density_index.indexer.errors import BadInput, ClipIndexError, InvalidParameter

log = logging.getLogger(__name__)

#: Loaded text encoders of this process: (model, pretrained, device) -> ModelBundle (image tower dropped).
_ENCODERS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()


def model_of(pool) -> tuple[str | None, str | None]:
    """``(open_clip model, pretrained)`` that produced the index's embeddings, from its manifest;
    None where it is not recorded, and ``pretrained`` None for randomly initialised weights."""
    manifest = pool.manifest
    extra = manifest.get("extra") or {}
    if extra.get("open_clip_model"):
        model, pretrained = extra.get("open_clip_model"), extra.get("open_clip_pretrained")
    else:
        model, pretrained = manifest.get("model"), manifest.get("pretrained")
    if pretrained is not None and str(pretrained).startswith("random"):
        pretrained = None
    return (str(model) if model else None), (str(pretrained) if pretrained else None)


def _drop_image_tower(model) -> None:
    """Free the image tower of an open_clip model: only ``encode_text`` is used here."""
    if getattr(model, "visual", None) is not None:
        model.visual = None


def text_encoder(model: str, pretrained: str, device: str = "auto"):
    """The open_clip ``ModelBundle`` of ``model`` with ``pretrained`` weights, text tower only,
    loaded once per process (later calls with the same arguments return the same object).

    Raises:
        ClipIndexError: from ``indexer.embed.load_model`` (unknown model or tag, bad checkpoint,
            weights that cannot be downloaded).
    """
    from clip_density_index.indexer.device import resolve_device
    from clip_density_index.indexer.embed import load_model

    dev = str(resolve_device(device))
    key = (str(model), str(pretrained), dev)
    with _LOCK:
        if key not in _ENCODERS:
            bundle = load_model(model, pretrained, device=dev)
            _drop_image_tower(getattr(bundle, "model", None))
            _ENCODERS[key] = bundle
        return _ENCODERS[key]


def clear_cache() -> None:
    """Forget the loaded text encoders (frees their memory)."""
    with _LOCK:
        _ENCODERS.clear()


def choose_model(pool, model: str | None, pretrained: str | None) -> tuple[str | None, str | None]:
    """The model and weights to encode with: the arguments, else the manifest's. A recorded tag or
    checkpoint belongs to the recorded model only.

    Raises:
        InvalidParameter: ``model`` differs from the recorded one and ``pretrained`` is not given.
    """
    rec_model, rec_pretrained = model_of(pool) if pool is not None else (None, None)
    use_model = model or rec_model
    if model and model != rec_model and not pretrained:
        raise InvalidParameter(f"--model {model} needs --pretrained TAG_OR_CHECKPOINT"
                               + (f" (the recorded weights belong to {rec_model})" if rec_model else ""))
    return use_model, pretrained or rec_pretrained


def _encode_command(texts: Sequence[str], model: str, pretrained: str) -> str:
    first = texts[0] if texts else "a photo of food"
    return (f"clip-density-index encode-text {shlex.quote(str(first))} --model {shlex.quote(model)} "
            f"--pretrained {shlex.quote(pretrained)} --out prompt.npy")


def encode(texts: Sequence[str], model: str | None, pretrained: str | None, device: str = "auto",
           *, what: str = "the prompt") -> np.ndarray:
    """Raw (unnormalised) text embeddings of ``texts`` from open_clip ``model`` / ``pretrained``.

    Args:
        texts: the strings to encode (at least one).
        model: open_clip model name, e.g. ``ViT-L-14``.
        pretrained: a pretrained tag (``openai``) or a local checkpoint file.
        device: torch device.
        what: how the messages name the caller (e.g. "index 'dc' for the prompt 'a dog'").

    Returns:
        ``(len(texts), d)`` float32 array.

    Raises:
        InvalidParameter: no model or no weights known (random weights cannot encode a prompt
            to match an index).
        BadInput: the weights cannot be loaded; the message says how to pass ``--prompt-embedding``.
    """
    from clip_density_index.indexer.embed import encode_texts

    texts = [str(t) for t in texts]
    if not texts:
        raise InvalidParameter("Give at least one text to encode")
    if not model:
        raise InvalidParameter(
            f"No open_clip model is recorded for {what}; give --model NAME --pretrained TAG_OR_CHECKPOINT, "
            "or pass the prompt's embedding with --prompt-embedding FILE.npy")
    if not pretrained:
        raise InvalidParameter(
            f"{what[0].upper() + what[1:]}: {model} was recorded without pretrained weights (random "
            "initialisation), so it cannot encode a matching prompt; "
            "give --pretrained TAG_OR_CHECKPOINT, or pass the prompt's embedding with --prompt-embedding FILE.npy")
    try:
        bundle = text_encoder(model, pretrained, device)
    except ClipIndexError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(
            f"Cannot load open_clip {model} ({pretrained}) to encode {what}: {detail}. Either give "
            "weights that load here (--pretrained /path/to/checkpoint.pt, or --model / --pretrained for "
            f"another copy of the same model), or encode the text where the weights are available "
            f"(`{_encode_command(texts, model, pretrained)}`) and pass --prompt-embedding prompt.npy"
        ) from None
    return np.asarray(encode_texts(bundle, texts), dtype=np.float32)


def encode_text(index=None, texts: Sequence[str] = (), *, model: str | None = None,
                pretrained: str | None = None, out: str | Path | None = None, force: bool = False,
                normalize: bool = True, device: str = "auto") -> np.ndarray:
    """Text embeddings for reuse as ``--prompt-embedding`` (the ``encode-text`` command).

    Args:
        index: an index directory or ``PoolIndex`` whose manifest names the model (optional when
            ``model`` and ``pretrained`` are given); its dimension is checked.
        texts: the texts.
        model, pretrained: override (or, without an index, name) the open_clip model and weights.
        out: write the array to this ``.npy`` file: shape ``(d,)`` for one text, ``(n, d)`` for more.
        force: overwrite an existing ``out``.
        normalize: unit vectors (default; the index compares directions only).
        device: torch device.

    Returns:
        ``(len(texts), d)`` float32 array.

    Raises:
        InvalidParameter: no texts, no model, a bad ``out`` suffix, ``out`` exists without ``force``.
        BadInput: the weights cannot be loaded, or the embeddings' dimension is not the index's.
    """
    from clip_density_index.queries.sqlrun import atomic_write, check_out

    texts = [str(t) for t in texts]
    if not texts or any(not t.strip() for t in texts):
        raise InvalidParameter("Give one or more non-empty texts to encode, e.g. \"a photo of food\"")
    if out is not None:
        if Path(out).suffix.lower() != ".npy":
            raise InvalidParameter(f"Output {str(out)!r}: encode-text writes a .npy file")
        check_out(out, force)
    pool = None
    if index is not None:
        from clip_density_index.indexer.pool import as_pool

        pool = as_pool(index)
        if pool.synthetic:
            raise InvalidParameter(
                f"Index {str(pool.root)!r} is the synthetic world: it encodes prompts itself (weights / "
                "sample --prompt); encode-text runs open_clip models")
    use_model, use_pretrained = choose_model(pool, model, pretrained)
    where = f"index {str(pool.root)!r}" if pool is not None else "encode-text"
    emb = encode(texts, use_model, use_pretrained, device, what=f"the text {texts[0]!r} ({where})")
    if pool is not None and emb.shape[1] != pool.dim:
        raise BadInput(f"open_clip {use_model} ({use_pretrained}) gives dimension {emb.shape[1]}, but index "
                       f"{str(pool.root)!r} has dimension {pool.dim}: it is not the index's model")
    if normalize:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    arr = emb[0] if len(texts) == 1 else emb
    if out is not None:
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, arr)

        atomic_write(Path(out), write)
    return emb
