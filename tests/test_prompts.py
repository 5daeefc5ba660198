"""Prompts for precomputed pools (queries/prompts.py): the manifest's open_clip model, text tower
only, cached per process; --model / --pretrained; the error that points to --prompt-embedding;
`encode-text`. A tiny randomly initialised open_clip config (tests/tiny_clip.py, the ``models``
fixture) stands in for real weights."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from clip_density_index import cli  # noqa: E402
import clip_density_index.indexer.embed as embed  # noqa: E402
import clip_density_index.indexer.reader as reader  # noqa: E402
from clip_density_index.indexer.build import build_index  # noqa: E402
from clip_density_index.indexer.errors import BadInput, InvalidParameter  # noqa: E402
from clip_density_index.indexer.reader import DataCompSource  # noqa: E402
from clip_density_index.queries import prompts  # noqa: E402
from clip_density_index.queries.weighting import compute_weights, sample  # noqa: E402
from tiny_clip import TINY  # noqa: E402

DIM = 32  # the tiny model's embed_dim
N = 60
PROMPT = "a photo of a dog"


@pytest.fixture(autouse=True)
def fresh_cache():
    prompts.clear_cache()
    yield
    prompts.clear_cache()


def make_datacomp(root, dim=DIM, n=N, seed=0):
    """One DataComp shard (parquet + npz) with b32 arrays of dimension ``dim``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    uids = [bytes(b).hex() for b in rng.integers(0, 256, (n, 16), dtype=np.uint8)]
    pq.write_table(pa.table({"uid": uids, "text": [f"caption {i}" for i in range(n)],
                             "url": [f"http://example.com/{i}.jpg" for i in range(n)]}),
                   root / f"{0:032x}.parquet")
    arrays = {}
    for key in ("b32_img", "b32_txt", "l14_img", "l14_txt"):
        x = rng.standard_normal((n, dim))
        arrays[key] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    np.savez(root / f"{0:032x}.npz", **arrays)
    return arrays


def stored_images(idx):
    """The index's stored (normalised, float16) image embeddings."""
    from clip_density_index.indexer.pool import open_index

    pool = open_index(idx)
    try:
        return np.asarray(pool.embeddings("image"), dtype=np.float64)
    finally:
        pool.close()


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def direct(models, texts):
    """The tiny model's text embeddings, computed here without queries.prompts."""
    return embed.encode_texts(embed.load_model(TINY, str(models[TINY]), device="cpu"), texts)


@pytest.fixture
def tiny_index(tmp_path, models, monkeypatch):
    """A DataComp index whose manifest records the tiny model and its checkpoint."""
    monkeypatch.setitem(reader.DATACOMP_ARCHS, "b32", (TINY, str(models[TINY])))
    arrays = make_datacomp(tmp_path / "dc")
    build_index(DataCompSource(tmp_path / "dc", arch="b32"), tmp_path / "idx")
    return tmp_path / "idx", arrays


@pytest.fixture
def openai_index(tmp_path):
    """A DataComp index as DataComp ships it: the manifest records ViT-B-32 / openai."""
    arrays = make_datacomp(tmp_path / "dc")
    build_index(DataCompSource(tmp_path / "dc", arch="b32"), tmp_path / "idx")
    return tmp_path / "idx", arrays


def no_download(monkeypatch):
    """What a machine without access to the model hub sees when a tag's weights are fetched."""
    from pathlib import Path

    real = open_clip.create_model_from_pretrained

    def offline(name, pretrained=None, **k):
        if pretrained is not None and Path(pretrained).is_file():
            return real(name, pretrained, **k)  # local checkpoints still load
        raise OSError("[Errno -2] Name or service not known (huggingface.co)")

    monkeypatch.setattr(open_clip, "create_model_from_pretrained", offline)


def test_datacomp_prompt_is_encoded_with_the_recorded_model(tiny_index, models):
    idx, arrays = tiny_index
    w = compute_weights(idx, prompt=PROMPT, logit_scale=10)
    v = unit(direct(models, [PROMPT])[0])
    img = stored_images(idx)
    np.testing.assert_allclose(w.log_weight, 10 * img @ v, rtol=1e-6, atol=1e-6)
    assert w.encoder == f"open_clip {TINY} ({models[TINY]})"
    top = sample(idx, prompt=PROMPT, n=5, mode="top")
    assert top.column("vec_id").to_pylist() == np.argsort(-(img @ v), kind="stable")[:5].tolist()
    r = CliRunner().invoke(cli.cli, ["weights", str(idx), "--prompt", PROMPT])
    assert r.exit_code == 0, r.output
    assert f"open_clip {TINY}" in r.output and "ESS" in r.output


def test_the_text_tower_is_loaded_once_per_process(tiny_index, monkeypatch):
    idx, _ = tiny_index
    calls = []
    real = embed.load_model
    monkeypatch.setattr(embed, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = compute_weights(idx, prompt=PROMPT)
    second = compute_weights(idx, prompt="a photo of a cat")
    assert len(calls) == 1
    assert not np.allclose(first.log_weight, second.log_weight)
    (bundle,) = prompts._ENCODERS.values()
    assert bundle.model.visual is None  # the image tower is dropped
    prompts.clear_cache()
    compute_weights(idx, prompt=PROMPT)
    assert len(calls) == 2


def test_weights_that_cannot_be_loaded_say_how_to_pass_an_embedding(openai_index, models, monkeypatch):
    idx, arrays = openai_index
    no_download(monkeypatch)
    with pytest.raises(BadInput) as e:
        compute_weights(idx, prompt=PROMPT)
    msg = str(e.value)
    assert "Cannot load open_clip ViT-B-32 (openai)" in msg and "Name or service not known" in msg
    assert "--prompt-embedding" in msg and "encode-text" in msg and "\n" not in msg
    r = CliRunner().invoke(cli.cli, ["sample", str(idx), "--prompt", PROMPT, "-n", "3"])
    assert r.exit_code == 1 and "--prompt-embedding" in r.output and "Traceback" not in r.output
    # --model / --pretrained override the manifest: a local copy of weights loads
    w = compute_weights(idx, prompt=PROMPT, model=TINY, pretrained=str(models[TINY]))
    img = stored_images(idx)
    np.testing.assert_allclose(w.log_weight, 10 * img @ unit(direct(models, [PROMPT])[0]), rtol=1e-6, atol=1e-6)
    # a recorded tag belongs to the recorded model: another model without --pretrained is refused
    with pytest.raises(InvalidParameter, match=f"--model {TINY} needs --pretrained .* belong to ViT-B-32"):
        compute_weights(idx, prompt=PROMPT, model=TINY)


def test_a_model_of_another_dimension_is_refused(tmp_path, models, monkeypatch):
    monkeypatch.setitem(reader.DATACOMP_ARCHS, "b32", (TINY, str(models[TINY])))
    make_datacomp(tmp_path / "dc", dim=16)
    build_index(DataCompSource(tmp_path / "dc", arch="b32"), tmp_path / "idx")
    with pytest.raises(BadInput, match="gives dimension 32, but index .* has dimension 16"):
        compute_weights(tmp_path / "idx", prompt=PROMPT)


def test_encode_text_writes_reusable_embeddings(tiny_index, models, tmp_path):
    idx, _ = tiny_index
    runner = CliRunner()
    out = tmp_path / "dog.npy"
    r = runner.invoke(cli.cli, ["encode-text", PROMPT, "--index", str(idx), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"shape ({DIM},)" in r.output
    v = np.load(out)
    assert v.shape == (DIM,) and v.dtype == np.float32
    np.testing.assert_allclose(v, unit(direct(models, [PROMPT])[0]), rtol=1e-5, atol=1e-6)
    # the file gives the same weights as the prompt itself
    by_text = compute_weights(idx, prompt=PROMPT)
    by_file = compute_weights(idx, prompt_embedding=out)
    np.testing.assert_allclose(by_file.log_weight, by_text.log_weight, rtol=1e-5, atol=1e-5)
    # several texts, no index, raw vectors
    many = tmp_path / "many.npy"
    r = runner.invoke(cli.cli, ["encode-text", PROMPT, "a photo of a cat", "--model", TINY, "--pretrained",
                                str(models[TINY]), "--raw", "--out", str(many)])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(many), direct(models, [PROMPT, "a photo of a cat"]), rtol=1e-5, atol=1e-5)
    # refusals
    r = runner.invoke(cli.cli, ["encode-text", PROMPT, "--index", str(idx), "--out", str(out)])
    assert r.exit_code == 1 and "exists" in r.output
    r = runner.invoke(cli.cli, ["encode-text", PROMPT, "--out", str(tmp_path / "x.npy")])
    assert r.exit_code == 2 and "--index" in r.output
    r = runner.invoke(cli.cli, ["encode-text", PROMPT, "--index", str(idx), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and ".npy" in r.output
