"""Importance weights and domain-weighted sampling (queries/weighting.py, `weights`, `sample`)."""

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy import stats

from clip_density_index import cli
from clip_density_index import queries
from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries.sqlrun import run_query, run_sql
from clip_density_index.queries.weighting import compute_weights, encode_prompt, gumbel_top_k, sample, weights
from arrays_pool import N, unit


@pytest.fixture(scope="module")
def prompt_vec():
    return np.random.default_rng(11).standard_normal(16)


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    from clip_density_index.indexer.synthetic import SyntheticSource

    out = tmp_path_factory.mktemp("syn") / "idx"
    build_index(SyntheticSource(n=3000, dim=64, seed=0), out)
    return out


def expected_log_w(image_raw, v, a):
    return a * (unit(image_raw) @ (v / np.linalg.norm(v)))


def test_weights_equal_exp_a_cos(arrays_index, prompt_vec, tmp_path):
    idx, image, _, _, uids, _ = arrays_index
    path = tmp_path / "p.npy"
    np.save(path, prompt_vec[None, :])  # (1, d) is accepted
    w = weights(idx, prompt="dogs", prompt_embedding=path, logit_scale=7.5)
    lw = expected_log_w(image, prompt_vec, 7.5)
    np.testing.assert_allclose(w.weight, np.exp(lw), rtol=1e-6)
    np.testing.assert_allclose(w.normalized_weight, np.exp(lw) / np.exp(lw).mean(), rtol=1e-6)
    assert w.ess == pytest.approx(np.exp(lw).sum() ** 2 / (np.exp(lw) ** 2).sum(), rel=1e-6)  # float32 storage
    assert w.normalized_weight.mean() == pytest.approx(1.0)
    rows = run_sql(idx, "SELECT * FROM weights WHERE prompt = 'dogs' ORDER BY vec_id").to_pylist()
    assert len(rows) == N and [r["uid"] for r in rows] == uids
    np.testing.assert_allclose([r["weight"] for r in rows], np.exp(lw), rtol=1e-6)
    assert {r["logit_scale"] for r in rows} == {7.5}


def test_weights_replace_rows_of_the_same_prompt(arrays_index, prompt_vec):
    idx, image, *_ = arrays_index
    weights(idx, prompt="cats", prompt_embedding=prompt_vec)
    weights(idx, prompt="cats", prompt_embedding=-prompt_vec, logit_scale=3)
    weights(idx, prompt="other", prompt_embedding=prompt_vec)
    counts = {r["prompt"]: r["count_star()"] for r in
              run_sql(idx, "SELECT prompt, count(*) FROM weights GROUP BY ALL").to_pylist()}
    assert counts["cats"] == N and counts["other"] == N
    got = run_sql(idx, "SELECT weight FROM weights WHERE prompt = 'cats' ORDER BY vec_id").column(0).to_numpy()
    np.testing.assert_allclose(got, np.exp(expected_log_w(image, -prompt_vec, 3)), rtol=1e-6)
    s = run_query(idx, "weights_summary", prompt="cats").to_pylist()
    assert len(s) == 1
    w = compute_weights(idx, prompt="cats", prompt_embedding=-prompt_vec, logit_scale=3)
    py = w.summary()
    for key in ("n", "logit_scale", "ess", "ess_fraction", "min", "median", "max", "top1_share"):
        assert s[0][key] == pytest.approx(py[key], rel=1e-9), key


def test_large_logit_scale_stays_finite_in_log_space(arrays_index, prompt_vec):
    idx, image, *_ = arrays_index
    w = compute_weights(idx, prompt_embedding=prompt_vec, logit_scale=5000)
    lw = expected_log_w(image, prompt_vec, 5000)
    assert np.all(np.isfinite(w.normalized_weight)) and np.isfinite(w.ess) and 1 <= w.ess < 2
    expect = lw - (lw.max() + np.log(np.exp(lw - lw.max()).mean()))  # log(w / mean w)
    ok = w.normalized_weight > 1e-300  # below that, subnormal floats lose digits
    assert ok.sum() >= 5
    np.testing.assert_allclose(np.log(w.normalized_weight[ok]), expect[ok], atol=0.01)


def test_weights_cli_and_export(arrays_index, prompt_vec, tmp_path):
    idx, image, _, _, uids, _ = arrays_index
    path = tmp_path / "p.npy"
    np.save(path, prompt_vec)
    out = tmp_path / "w" / "weights.parquet"
    runner = CliRunner()
    args = ["weights", str(idx), "--prompt-embedding", str(path), "--out", str(out)]
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 0, r.output
    lw = expected_log_w(image, prompt_vec, 10.0)
    ess = np.exp(lw).sum() ** 2 / (np.exp(lw) ** 2).sum()
    assert f"ESS {ess:,.1f}" in r.output and "top 1% of samples hold" in r.output
    t = pq.read_table(out)
    assert t.column_names == ["uid", "weight", "normalized_weight"] and t.column("uid").to_pylist() == uids
    np.testing.assert_allclose(t.column("weight").to_numpy(), np.exp(lw), rtol=1e-6)
    label = f"embedding:{path}"
    assert run_sql(idx, "SELECT count(*) FROM weights WHERE prompt = $p", {"p": label}).column(0)[0].as_py() == N
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(cli.cli, args + ["--force"])
    assert r.exit_code == 0, r.output


def test_prompt_errors(arrays_index, prompt_vec, tmp_path):
    idx, *_ = arrays_index
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones(5))
    with pytest.raises(BadInput, match=r"bad.npy' has dimension 5, but the index's embeddings have dimension 16"):
        weights(idx, prompt_embedding=bad)
    np.save(bad, np.ones((2, 16)))
    with pytest.raises(BadInput, match=r"shape \(2, 16\)"):
        weights(idx, prompt_embedding=bad)
    np.save(bad, np.zeros(16))
    with pytest.raises(BadInput, match="zero"):
        weights(idx, prompt_embedding=bad)
    np.save(bad, np.ones(16) + 1j)
    with pytest.raises(BadInput, match="dtype complex128; expected real numbers"):
        weights(idx, prompt_embedding=bad)
    np.save(bad, np.ones(16, dtype=bool))
    with pytest.raises(BadInput, match="dtype bool"):
        weights(idx, prompt_embedding=bad)
    np.savez(tmp_path / "p.npz", v=np.ones(16))
    with pytest.raises(BadInput, match=r"p.npz' is a .npz archive"):
        weights(idx, prompt_embedding=tmp_path / "p.npz")
    with pytest.raises(BadInput, match="does not exist"):
        weights(idx, prompt_embedding=tmp_path / "missing.npy")
    with pytest.raises(InvalidParameter, match="empty"):
        weights(idx, prompt="   ")
    with pytest.raises(InvalidParameter, match="--prompt-embedding"):
        weights(idx, prompt="a photo of food")  # arrays index: no model to run
    with pytest.raises(InvalidParameter, match="positive"):
        weights(idx, prompt_embedding=prompt_vec, logit_scale=0)
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["weights", str(idx)])
    assert r.exit_code == 2 and "--prompt" in r.output
    r = runner.invoke(cli.cli, ["weights", str(idx), "--prompt", "a photo of food"])
    assert r.exit_code == 1 and "--prompt-embedding" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli.cli, ["weights", str(idx), "--prompt-embedding", str(bad)])
    assert r.exit_code == 1 and "bad.npy" in r.output


def test_synthetic_prompt_uses_the_world_encoder(synthetic_index):
    from clip_density_index.indexer.pool import open_index
    from clip_density_index.indexer.synthetic import SyntheticWorld

    pool = open_index(synthetic_index)
    world = SyntheticWorld(seed=0, dim=64)
    u = world.encode_prompt("a photo of food").astype(np.float64)
    w = weights(synthetic_index, prompt="a photo of food")
    img = np.asarray(pool.embeddings("image"), dtype=np.float64)
    np.testing.assert_allclose(w.log_weight, 10 * img @ (u / np.linalg.norm(u)), rtol=1e-9, atol=1e-9)
    assert w.prompt == "a photo of food" and "synthetic" in w.encoder
    with pytest.raises(InvalidParameter, match="no concept"):
        weights(synthetic_index, prompt="qwertyuiop")
    # the highest weights go to food captions far more often than the pool's base rate
    food = {c for c, k in zip(world.concepts, world.categories) if k == "food"}

    def share(caps):
        return np.mean([bool(food & set(world.concepts_in(c))) for c in caps])

    top = sample(synthetic_index, prompt="a photo of food", n=20, mode="top")
    base = share(run_sql(synthetic_index, "SELECT caption FROM samples").column(0).to_pylist())
    assert share(top.column("caption").to_pylist()) >= max(0.5, 2 * base)


def test_open_clip_prompt_dispatch(tmp_path, monkeypatch):
    import clip_density_index.indexer.embed as embed

    image, text = clustered_pairs(100, 16, seed=5)
    out = tmp_path / "oc"
    build_index(ArraySource(image, text, name="open_clip", model="ViT-B-32"), out)
    with pytest.raises(InvalidParameter, match="without pretrained weights"):
        encode_prompt(out, "a dog")
    con = duckdb.connect(str(out / "catalog.duckdb"))
    con.execute("UPDATE manifest SET pretrained = 'some_tag'")
    con.close()
    calls = []
    monkeypatch.setattr(embed, "load_model", lambda m, p, device="auto": calls.append((m, p)) or "bundle")
    monkeypatch.setattr(embed, "encode_texts", lambda b, texts: np.full((len(texts), 16), 2.0, np.float32))
    p = encode_prompt(out, "a dog")
    assert calls == [("ViT-B-32", "some_tag")]
    np.testing.assert_allclose(p.vector, np.full(16, 0.25))


def test_top_equals_numpy_argsort_flat(arrays_index, prompt_vec):
    idx, image, _, _, uids, _ = arrays_index
    t = sample(idx, prompt_embedding=prompt_vec, n=25, mode="top")
    cos = unit(image) @ (prompt_vec / np.linalg.norm(prompt_vec))
    order = np.argsort(-cos, kind="stable")[:25]
    assert t.column("vec_id").to_pylist() == order.tolist()
    assert t.column("uid").to_pylist() == [uids[i] for i in order]
    np.testing.assert_allclose(t.column("cosine").to_numpy(), cos[order], rtol=1e-6)
    np.testing.assert_allclose(t.column("weight").to_numpy(), np.exp(10 * cos[order]), rtol=1e-5)
    assert "normalized_weight" not in t.column_names


def test_top_with_ivf_probes_a_quarter_of_the_lists_or_all_with_exact(tmp_path, monkeypatch):
    from clip_density_index.indexer import faiss_index

    image, text = clustered_pairs(3000, 16, seed=8)
    out = tmp_path / "ivf"
    build_index(ArraySource(image, text), out, index_key="IVF32,Flat", nprobe=1)
    v = np.random.default_rng(3).standard_normal(16)
    cos = unit(image) @ (v / np.linalg.norm(v))
    t = sample(out, prompt_embedding=v, n=200, mode="top", exact=True)
    assert t.column("vec_id").to_pylist() == np.argsort(-cos, kind="stable")[:200].tolist()
    probes = []
    real = faiss_index.search
    monkeypatch.setattr(faiss_index, "search", lambda *a, **k: probes.append(k.get("nprobe")) or real(*a, **k))
    default = sample(out, prompt_embedding=v, n=200, mode="top")
    assert probes == [8]  # ceil(32 / 4), not the index's stored nprobe of 1
    got = default.column("vec_id").to_numpy()
    assert len(set(got) & set(np.argsort(-cos)[:200])) / 200 > 0.5
    with pytest.raises(InvalidParameter, match="not both"):
        sample(out, prompt_embedding=v, n=5, mode="top", nprobe=3, exact=True)
    with pytest.raises(InvalidParameter, match="only apply to --mode top"):
        sample(out, prompt_embedding=v, n=5, mode="draw", exact=True)
    # fewer probes: a subset of the pool's true ranking, still exactly rescored and sorted
    few = sample(out, prompt_embedding=v, n=200, mode="top", nprobe=2)
    ids = few.column("vec_id").to_numpy()
    np.testing.assert_allclose(few.column("cosine").to_numpy(), cos[ids], rtol=1e-6)  # float32 storage
    assert np.all(np.diff(few.column("cosine").to_numpy()) <= 0)
    recall = len(set(ids) & set(np.argsort(-cos)[:200])) / 200
    assert 0 < recall < 1  # 2 of 32 lists cannot find them all on this data
    with pytest.raises(InvalidParameter, match="nprobe"):
        sample(out, prompt_embedding=v, n=5, mode="top", nprobe=0)
    # more than the probed lists hold (3000 / 32 ~ 94 per list): probes double until n are found
    probes.clear()
    many = sample(out, prompt_embedding=v, n=1000, mode="top", nprobe=1)
    assert many.num_rows == 1000 and probes[0] == 1 and len(probes) > 1 and probes == sorted(probes)
    ids = many.column("vec_id").to_numpy()
    assert len(set(ids)) == 1000 and np.all(np.diff(many.column("cosine").to_numpy()) <= 0)


def test_top_exact_is_exact_on_lossy_codes(tmp_path):
    """--exact is exact on PQ codes too: probing every list is not enough when the codes' approximate
    scores drop true neighbours before the exact rescoring."""
    image, text = clustered_pairs(3000, 16, seed=8)
    out = tmp_path / "pq"
    build_index(ArraySource(image, text), out, index_key="IVF8,PQ2")
    v = np.random.default_rng(3).standard_normal(16)
    cos = unit(image).astype(np.float32).astype(np.float64) @ (v / np.linalg.norm(v))
    t = sample(out, prompt_embedding=v, n=100, mode="top", exact=True)
    assert t.column("vec_id").to_pylist() == np.argsort(-cos, kind="stable")[:100].tolist()
    approx = sample(out, prompt_embedding=v, n=100, mode="top").column("vec_id").to_pylist()
    assert approx != t.column("vec_id").to_pylist()  # what --exact is for, on this data


def test_draw_with_replacement_follows_the_weights(arrays_index, prompt_vec):
    idx, image, *_ = arrays_index
    draws = 20000
    t = sample(idx, prompt_embedding=prompt_vec, n=draws, mode="draw", replace=True, seed=123, logit_scale=5)
    p = np.exp(expected_log_w(image, prompt_vec, 5))
    p /= p.sum()
    observed = np.bincount(t.column("vec_id").to_numpy(), minlength=N)
    expected = p * draws
    # chi-square over bins with expected count >= 5, the rest pooled into one bin
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert big.sum() > 50
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    top = np.argsort(-p)[:5]  # the heaviest items: within 4 standard deviations
    sd = np.sqrt(draws * p[top] * (1 - p[top]))
    assert np.all(np.abs(observed[top] - expected[top]) < 4 * sd)


def test_gumbel_top_k_first_draw_follows_the_weights():
    rng = np.random.default_rng(0)
    log_w = np.log(np.array([8.0, 4.0, 2.0, 1.0, 1.0]))
    firsts = np.array([gumbel_top_k(log_w, 3, rng)[0] for _ in range(20000)])
    freq = np.bincount(firsts, minlength=5) / 20000
    np.testing.assert_allclose(freq, np.exp(log_w) / np.exp(log_w).sum(), atol=0.015)
    # second draw given the first was item 0: proportional to the remaining weights
    rng = np.random.default_rng(1)
    seconds = [d[1] for d in (gumbel_top_k(log_w, 2, rng) for _ in range(20000)) if d[0] == 0]
    freq = np.bincount(seconds, minlength=5)[1:] / len(seconds)
    np.testing.assert_allclose(freq, np.array([4, 2, 1, 1]) / 8, atol=0.02)


def test_draw_without_replacement_is_seeded_and_distinct(arrays_index, prompt_vec):
    idx, *_ = arrays_index
    a = sample(idx, prompt_embedding=prompt_vec, n=100, seed=1)
    b = sample(idx, prompt_embedding=prompt_vec, n=100, seed=1)
    c = sample(idx, prompt_embedding=prompt_vec, n=100, seed=2)
    ids = a.column("vec_id").to_pylist()
    assert len(set(ids)) == 100 and ids == b.column("vec_id").to_pylist() and ids != c.column("vec_id").to_pylist()
    assert a.column_names == ["rank", "vec_id", "uid", "caption", "cosine", "weight", "normalized_weight"]
    everything = sample(idx, prompt_embedding=prompt_vec, n=N, seed=0)
    assert sorted(everything.column("vec_id").to_pylist()) == list(range(N))
    with pytest.raises(InvalidParameter, match="larger than the pool"):
        sample(idx, prompt_embedding=prompt_vec, n=N + 1)
    assert sample(idx, prompt_embedding=prompt_vec, n=N + 1, replace=True).num_rows == N + 1
    with pytest.raises(InvalidParameter, match="mode"):
        sample(idx, prompt_embedding=prompt_vec, n=3, mode="best")


def test_sample_cli(arrays_index, prompt_vec, tmp_path):
    idx, _, _, caps, *_ = arrays_index
    path = tmp_path / "p.npy"
    np.save(path, prompt_vec)
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["sample", str(idx), "--prompt-embedding", str(path), "-n", "5", "--mode", "top"])
    assert r.exit_code == 0, r.output
    top = sample(idx, prompt_embedding=prompt_vec, n=5, mode="top")
    assert all(c[:20] in r.output for c in top.column("caption").to_pylist())
    assert "weight" in r.output.splitlines()[0] and "(5 rows)" in r.output
    out = tmp_path / "s.csv"
    args = ["sample", str(idx), "--prompt-embedding", str(path), "-n", "30", "--seed", "4", "--out", str(out)]
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 0, r.output
    assert "wrote 30 rows" in r.output
    lines = out.read_text().splitlines()
    assert lines[0] == "rank,vec_id,uid,caption,cosine,weight,normalized_weight" and len(lines) == 31
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(cli.cli, ["sample", str(idx), "--prompt-embedding", str(path), "-n", "3", "--mode", "top",
                                "--replace"])
    assert r.exit_code == 2
    r = runner.invoke(cli.cli, ["sample", str(idx), "-n", "3"])
    assert r.exit_code == 2 and "--prompt" in r.output


def test_api_reexports(arrays_index, prompt_vec):
    idx, *_ = arrays_index
    assert queries.weights(idx, prompt="api", prompt_embedding=prompt_vec, store=False).n == N
    assert queries.sample(idx, prompt_embedding=prompt_vec, n=3, mode="top").num_rows == 3
    assert queries.open_index(idx).n == N
    assert callable(queries.score) and callable(queries.select) and callable(queries.weights)


def test_caption_lookup_by_index_or_join_gives_the_same_rows(arrays_index, monkeypatch):
    """``lookup_samples``: point lookups (few ids) and the join (many ids) agree, keep the order and
    the repeats of the requested vec_ids."""
    from clip_density_index.queries import weighting as wmod

    idx, _, _, caps, uids, _ = arrays_index
    want = np.array([7, 3, 7, 399, 0, 3], dtype=np.int64)
    by_index = wmod.lookup_samples(idx, want)
    monkeypatch.setattr(wmod, "LOOKUP_MAX", 2)
    by_join = wmod.lookup_samples(idx, want)
    for t in (by_index, by_join):
        assert t.column("vec_id").to_pylist() == want.tolist()
        assert t.column("uid").to_pylist() == [uids[i] for i in want]
        assert t.column("caption").to_pylist() == [caps[i] for i in want]
    with pytest.raises(BadInput, match="lacks samples rows"):
        wmod.lookup_samples(idx, np.array([5, N + 3]))


def test_kept_reader_gives_way_to_writers(arrays_index, prompt_vec):
    """``sample`` keeps a read-only catalog connection on the opened index; a write through the
    same object (``weights`` stores rows) closes it first, and reads reopen it."""
    idx, *_ = arrays_index
    pool = queries.open_index(idx)
    first = sample(pool, prompt_embedding=prompt_vec, n=5, mode="top")
    assert pool._reader is not None
    weights(pool, prompt="kept-reader", prompt_embedding=prompt_vec)  # would fail with the reader open
    again = sample(pool, prompt_embedding=prompt_vec, n=5, mode="top")
    assert again.column("vec_id").to_pylist() == first.column("vec_id").to_pylist()
    with pool:
        pass
    assert pool._reader is None
    assert run_sql(idx, "SELECT count(*) AS n FROM weights WHERE prompt = 'kept-reader'").to_pylist()[0]["n"] == N
