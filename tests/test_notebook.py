"""examples/tour.ipynb runs headless (nbclient) on a small world, so it cannot go stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "tour.ipynb"


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_the_tour_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_EXAMPLE_N", "3000")
    monkeypatch.setenv("CDI_EXAMPLE_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    out = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "built 3,000 samples" in out
    assert re.search(r"exact - ", out)  # auto picked the exact estimator and said why
    assert out.count(" nats | ") == 12  # the text histogram
    assert re.search(r"Spearman\(kl_text, clipscore\) = -?\d\.\d{3}", out)
    assert "kl_text decile 10" in out
    m = re.search(r"kept ([\d,]+) of 3,000", out)
    assert m and int(m.group(1).replace(",", "")) == 750
    assert (tmp_path / "index" / "catalog.duckdb").is_file() and (tmp_path / "kl25.npy").is_file()
    m = re.search(r"clipscore top 30% AND kl_text top 25%: ([\d,]+) samples", out)
    assert m and 0 < int(m.group(1).replace(",", "")) <= 750
