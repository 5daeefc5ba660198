"""The small index built from arrays that the SQL, selection and weighting tests share (the
``arrays_index`` fixture in conftest.py builds it), and the numpy references its checks use: a
``scores`` table computed here, independently of the library, from the raw arrays (SPEC 2-6, 11).
"""

import hashlib

import duckdb
import numpy as np
from scipy.special import logsumexp

N, DIM, A = 400, 16, 100.0
WORDS = ["dog", "cat", "red", "bus", "photo", "a", "of", "the", "on", "street", "beach", "pizza"]


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def captions(n, seed=0):
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(r.integers(1, 7))
        words = [WORDS[j] for j in r.choice(len(WORDS), size=k, p=np.linspace(2, 1, len(WORDS)) / 18)]
        out.append(" ".join(words).capitalize() + ("!" if i % 7 == 0 else ""))
    return out


def kl_both(q, c, a=A):
    """Exact D_KL and D_KLR of every query against all candidates (SPEC 2), in numpy."""
    s = a * q @ c.T
    lse = logsumexp(s, axis=1)
    p = np.exp(s - lse[:, None])
    logn = np.log(c.shape[0])
    return (p * s).sum(1) - lse + logn, lse - logn - s.mean(1)


def numpy_scores(image, text, a=A):
    """Every SPEC 11 score column, computed here in numpy from the raw arrays."""
    cols = {}
    raw = {"image": np.asarray(image, np.float64), "text": np.asarray(text, np.float64)}
    v = {m: unit(raw[m]) for m in raw}
    cols["kl_text"], cols["klr_text"] = kl_both(v["text"], v["image"], a)
    cols["kl_image"], cols["klr_image"] = kl_both(v["image"], v["text"], a)
    for m, other in (("image", "text"), ("text", "image")):
        x, n = v[m], v[m].shape[0]
        mean = x.mean(0)
        d = x - mean
        g = np.cov(v[other], rowvar=False, ddof=1)
        cols[f"dc_{m}"] = a * a * (d * d).sum(1)
        cols[f"dw_{m}"] = a * a * np.einsum("ij,jk,ik->i", d, g, d)
        cols[f"rawnorm_{m}"] = a * a * (raw[m] ** 2).sum(1)
        cols[f"conformity_{m}"] = (x @ x.sum(0) - 1) / (n - 1)
        cols[f"conformity_est_{m}"] = x @ mean / np.linalg.norm(mean)
        cov = np.cov(raw[m], rowvar=False) + 1e-6 * np.eye(raw[m].shape[1])
        z = np.linalg.solve(np.linalg.cholesky(cov), (raw[m] - raw[m].mean(0)).T).T
        cols[f"loglik_{m}"] = -0.5 * (z * z).sum(1)
    cols["clipscore"] = 2.5 * np.maximum((v["image"] * v["text"]).sum(1), 0)
    return cols


def write_scores(index_dir, cols):
    """Replace the index's ``scores`` table by ``cols`` (plus uid, vec_id and a partly NULL column)."""
    import pyarrow as pa

    con = duckdb.connect(str(index_dir / "catalog.duckdb"))
    try:
        n = len(next(iter(cols.values())))
        partial = np.arange(n, dtype=np.float64)
        mask = np.arange(n) % 5 == 0  # every fifth row has no value
        table = pa.table({"vec_id": np.arange(n, dtype=np.int64), **cols,
                          "partial_score": pa.array(partial, mask=mask)})
        con.register("_s", table)
        con.execute("CREATE OR REPLACE TABLE scores AS SELECT s.uid, t.* FROM _s AS t "
                    "JOIN samples AS s USING (vec_id) ORDER BY vec_id")
        con.unregister("_s")
    finally:
        con.close()


def fingerprint(index_dir):
    """Tables, their row counts and the catalog file's bytes: equal before and after = unchanged."""
    con = duckdb.connect(str(index_dir / "catalog.duckdb"), read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
    finally:
        con.close()
    digest = hashlib.sha256((index_dir / "catalog.duckdb").read_bytes()).hexdigest()
    return counts, digest
