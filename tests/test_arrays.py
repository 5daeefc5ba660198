"""indexer.arrays.NpyWriter: streamed .npy files that numpy reads back exactly."""

import numpy as np
import pytest

from clip_density_index.indexer.arrays import NpyWriter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blocks_round_trip(tmp_path, dtype):
    x = np.random.default_rng(0).standard_normal((1000, 7))
    with NpyWriter(tmp_path / "x.npy", 1000, 7, dtype) as w:
        for s in range(0, 1000, 300):
            w.write(x[s : s + 300])
    got = np.load(tmp_path / "x.npy")
    assert got.dtype == np.dtype(dtype) and got.shape == (1000, 7)
    np.testing.assert_array_equal(got, x.astype(dtype))


@pytest.mark.parametrize("announced, written", [(10, 3), (1_000_000, 999_999), (10**15, 5), (5, 0)])
def test_fewer_rows_than_announced_cut_the_file(tmp_path, announced, written):
    """The header is rewritten (padded to its old length) and the file truncated."""
    x = np.arange(written * 3, dtype=np.float32).reshape(written, 3)
    w = NpyWriter(tmp_path / "x.npy", announced, 3, "float32")
    w.write(x)
    w.close()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), x)


def test_bad_blocks_and_abort(tmp_path):
    w = NpyWriter(tmp_path / "x.npy", 4, 3, "float32")
    with pytest.raises(ValueError, match=r"expected \(b, 3\)"):
        w.write(np.zeros((2, 4)))
    w.write(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="more than the 4 rows"):
        w.write(np.zeros((1, 3)))
    w.abort()
    assert not (tmp_path / "x.npy").exists()
