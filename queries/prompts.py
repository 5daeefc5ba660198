"""Prompts -> vectors: a domain prompt encoded with an index's own model, or its embedding loaded.

``encode_prompt`` (``weights``, ``sample``, the explorer's prompt box), by how the index was built:

* synthetic: the synthetic world's prompt encoder, the world rebuilt from ``manifest.extra``;
* open_clip, datacomp, clip-retrieval: the open_clip model the manifest records (text tower only,
  loaded once per process; ``model`` / ``pretrained`` override it);
* or the prompt's text embedding is given (``prompt_embedding``: a ``.npy`` of shape (d,) or (1, d)
  from the same model, ``load_prompt_embedding``), e.g. written by ``encode-text`` (``encode_text``)
  where the weights are available.

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

import hashlib
import logging
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip_density_index.indexer.errors import BadInput, ClipIndexError, InvalidParameter
from clip_density_index.indexer.pool import as_pool
from clip_density_index.queries.outfile import atomic_write, check_out

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
    texts = [str(t) for t in texts]
    if not texts or any(not t.strip() for t in texts):
        raise InvalidParameter("Give one or more non-empty texts to encode, e.g. \"a photo of food\"")
    if out is not None:
        if Path(out).suffix.lower() != ".npy":
            raise InvalidParameter(f"Output {str(out)!r}: encode-text writes a .npy file")
        check_out(out, force)
    pool = None
    if index is not None:
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


# -- a domain prompt for an index ------------------------------------------------------------
@dataclass
class Prompt:
    """An encoded prompt.

    Attributes:
        label: what is stored in ``weights.prompt``: the prompt text, or ``embedding:<file>``.
        vector: (d,) float64 unit vector.
        encoder: how it was encoded (for messages), e.g. "synthetic world (seed 0)".
    """

    label: str
    vector: np.ndarray
    encoder: str


def load_prompt_embedding(source: str | Path | np.ndarray, dim: int) -> np.ndarray:
    """A prompt embedding from a ``.npy`` file (or an array), checked and normalised.

    Args:
        source: a ``.npy`` path holding shape (d,) or (1, d), or such an array.
        dim: the index's embedding dimension d.

    Returns:
        (d,) float64 unit vector.

    Raises:
        BadInput: the file is missing or unreadable, the shape or dimension is wrong (the message
            names the file and both dimensions), or the vector is zero or not finite.
    """
    name = "the prompt embedding" if isinstance(source, np.ndarray) else f"prompt embedding file {str(source)!r}"
    if isinstance(source, np.ndarray):
        arr = source
    else:
        p = Path(source)
        if not p.is_file():
            raise BadInput(f"{name} does not exist")
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadInput(f"{name} is not a readable .npy array: {e}") from None
        if not isinstance(arr, np.ndarray):  # np.load gives an NpzFile for .npz archives
            arr.close()
            raise BadInput(f"{name} is a .npz archive; give a .npy file holding the one embedding")
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":  # complex parts would be dropped, strings and bools are not vectors
        raise BadInput(f"{name} has dtype {arr.dtype}; expected real numbers (float)")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise BadInput(f"{name} has shape {arr.shape}; expected ({dim},) or (1, {dim})")
    if arr.shape[0] != dim:
        raise BadInput(f"{name} has dimension {arr.shape[0]}, but the index's embeddings have dimension {dim}")
    v = arr.astype(np.float64)
    norm = float(np.linalg.norm(v))
    if not np.all(np.isfinite(v)) or norm == 0.0:
        raise BadInput(f"{name} is zero or not finite")
    return v / norm


def _synthetic_prompt(pool, text: str) -> tuple[np.ndarray, str]:
    from clip_density_index.indexer.synthetic import WORLD_VERSION, SyntheticWorld

    extra = pool.manifest.get("extra") or {}
    try:
        seed, dim, geometry = int(extra["seed"]), int(extra["dim"]), str(extra["geometry"])
    except (KeyError, TypeError, ValueError):
        raise BadInput(
            f"Index {str(pool.root)!r} is synthetic but its manifest lacks the world parameters "
            "(seed, dim, geometry); rebuild it with `cli.py build-index`"
        ) from None
    version = extra.get("world_version")
    if version != WORLD_VERSION:
        raise BadInput(
            f"Index {str(pool.root)!r} was built by synthetic world version {version}, this code has "
            f"version {WORLD_VERSION}: its prompt encoder would not match; rebuild the index"
        )
    world = SyntheticWorld(seed=seed, dim=dim, geometry=geometry)
    return np.asarray(world.encode_prompt(text), dtype=np.float64), f"synthetic world (seed {seed}, dim {dim})"


def _open_clip_prompt(pool, text: str, device: str, model: str | None = None,
                      pretrained: str | None = None) -> tuple[np.ndarray, str]:
    use_model, use_pretrained = choose_model(pool, model, pretrained)
    what = f"the prompt {text!r} for index {str(pool.root)!r}"
    u = encode([text], use_model, use_pretrained, device, what=what)[0]
    if u.shape != (pool.dim,):
        raise BadInput(f"open_clip {use_model} ({use_pretrained}) gives dimension {u.shape[0]}, but index "
                       f"{str(pool.root)!r} has dimension {pool.dim}: it is not the index's model")
    return np.asarray(u, dtype=np.float64), f"open_clip {use_model} ({use_pretrained})"


def encode_prompt(
    index,
    prompt: str | None = None,
    prompt_embedding: str | Path | np.ndarray | None = None,
    device: str = "auto",
    model: str | None = None,
    pretrained: str | None = None,
) -> Prompt:
    """Encode a domain prompt with the index's own model, or load its embedding.

    Args:
        index: index directory or an opened ``PoolIndex``.
        prompt: the prompt text, e.g. "a photo of food". With ``prompt_embedding`` it is only the
            label stored with the weights.
        prompt_embedding: a ``.npy`` file (or array) with the prompt's text embedding, shape (d,)
            or (1, d); required for indexes without a model to run (datacomp, clip-retrieval).
        device: torch device for open_clip models.
        model, pretrained: open_clip model and weights (tag or local checkpoint) to encode the
            prompt with instead of those the manifest records.

    Returns:
        A ``Prompt`` (label, unit vector, encoder description).

    Raises:
        InvalidParameter: neither argument, an empty prompt, a synthetic prompt with no known
            concept, or an index whose model cannot be run (the message says to pass
            ``--prompt-embedding``).
        BadInput: a bad embedding file (missing, wrong shape or dimension, zero).
    """
    pool = as_pool(index)
    if prompt is not None and not str(prompt).strip():
        raise InvalidParameter("The prompt is empty; give a text such as \"a photo of food\"")
    if prompt_embedding is not None:
        v = load_prompt_embedding(prompt_embedding, pool.dim)
        if prompt is not None:
            label = str(prompt)
        elif isinstance(prompt_embedding, np.ndarray):
            label = "embedding:" + hashlib.sha1(v.tobytes()).hexdigest()[:12]
        else:
            label = f"embedding:{prompt_embedding}"
        where = "array" if isinstance(prompt_embedding, np.ndarray) else str(prompt_embedding)
        return Prompt(label, v, f"given embedding ({where})")
    if prompt is None:
        raise InvalidParameter.naming("Give a prompt ({prompt} TEXT) or its embedding ({prompt_embedding} FILE.npy)")
    if pool.synthetic:
        if model is not None or pretrained is not None:
            raise InvalidParameter.naming("Index {root!r} is the synthetic world, which encodes prompts itself; "
                                          "{model} / {pretrained} apply to indexes of real models", root=str(pool.root))
        u, encoder = _synthetic_prompt(pool, prompt)
    else:
        u, encoder = _open_clip_prompt(pool, prompt, device, model, pretrained)
    if u.shape != (pool.dim,):
        raise BadInput(f"The {encoder} gave a prompt embedding of shape {u.shape}; the index has dimension {pool.dim}")
    return Prompt(str(prompt), load_prompt_embedding(u, pool.dim), encoder)
