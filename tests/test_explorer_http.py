"""The explorer (``cli.py serve``) over HTTP with Starlette's TestClient (no browser), and the
static report (``cli.py report``): pages, orders, the .npy download against ``select``'s file,
hostile input through every parameter, image serving limited to the catalog's own image paths."""

import hashlib
import io
import os
import re

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from clip_density_index import queries  # noqa: E402
from clip_density_index.explorer.app import create_app  # noqa: E402
from clip_density_index.explorer.report import write_report  # noqa: E402
from clip_density_index.indexer.build import build_index  # noqa: E402
from clip_density_index.indexer.sources import ArraySource  # noqa: E402
from clip_density_index.indexer.synthetic import SyntheticSource  # noqa: E402
from conftest import clustered_pairs  # noqa: E402

N = 2000


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("explorer") / "idx"
    build_index(SyntheticSource(n=N, seed=3, dim=64), d)
    with queries.open_index(d) as pool:
        queries.score(pool, estimator="exact")
    return d


@pytest.fixture(scope="module")
def client(index_dir):
    with TestClient(create_app(index_dir), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def _snapshot(d):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _card_ids(html):
    return [int(v) for v in re.findall(r'data-vec-id="(\d+)"', html)]


def test_gallery_orders_match_the_named_queries(client, index_dir):
    top = queries.run_query(index_dir, "top_by_score", column="klr_text", limit=48).column("vec_id").to_pylist()
    r = client.get("/?column=klr_text")
    assert r.status_code == 200 and "SYNTHETIC" in r.text
    assert _card_ids(r.text) == top[:24]
    assert _card_ids(client.get("/?column=klr_text&page=1").text) == top[24:48]
    bottom = queries.run_query(index_dir, "bottom_by_score", column="kl_text", limit=24).column("vec_id").to_pylist()
    assert _card_ids(client.get("/?column=kl_text&order=bottom").text) == bottom
    # decile 1 holds the lowest tenth, decile 10 the highest; a random page stays in its decile
    d1 = client.get("/?column=kl_text&order=decile&decile=1").text
    scores = queries.run_sql(index_dir, "SELECT vec_id, kl_text FROM scores ORDER BY kl_text").to_pydict()
    low = set(scores["vec_id"][: N // 10 + 1])
    assert set(_card_ids(d1)) <= low and len(_card_ids(d1)) == 24
    r1 = _card_ids(client.get("/?column=kl_text&order=random&decile=1&seed=1").text)
    r2 = _card_ids(client.get("/?column=kl_text&order=random&decile=1&seed=2").text)
    assert set(r1) <= low and set(r2) <= low and r1 != r2


def test_plots_prompt_and_selection(client, index_dir, tmp_path):
    r = client.get("/plots?x=kl_text&y=clipscore")
    assert r.status_code == 200 and r.text.count("<svg") >= 10 and 'id="correlations"' in r.text
    r = client.get("/prompt", params={"prompt": "a photo of a dog"})
    assert r.status_code == 200 and 'id="ess"' in r.text
    top = queries.sample(index_dir, "a photo of a dog", n=24, mode="top").column("vec_id").to_pylist()
    assert _card_ids(r.text) == top
    q = {"by": "kl_text", "fraction": "0.25", "where": "clipscore > 0.6"}
    r = client.get("/select", params=q)
    sel = queries.select(index_dir, by="kl_text", top_fraction=0.25, where="clipscore > 0.6",
                         out=tmp_path / "s.npy")
    assert f'<b id="kept">{sel.kept:,}</b>' in r.text
    data = client.get("/select.npy", params=q)
    assert data.status_code == 200 and data.content == (tmp_path / "s.npy").read_bytes()
    # an uploaded prompt embedding (.npy) gives the same top samples as the text prompt's vector
    from clip_density_index.queries.weighting import encode_prompt

    buf = io.BytesIO()
    np.save(buf, encode_prompt(index_dir, "a photo of a dog").vector.astype(np.float32))
    r = client.post("/prompt", files={"embedding": ("dog.npy", buf.getvalue())}, data={"logit_scale": "10"})
    assert r.status_code == 200 and _card_ids(r.text) == top


HOSTILE = [
    "/?column=kl_text%22%3B%20DROP%20TABLE%20samples%3B--", "/?column=../../etc/passwd", "/?order=evil",
    "/?decile=11", "/?decile=-1", "/?page=99999999999999999999", "/?page=1e3", "/?seed=-5", "/?page=%00",
    "/plots?x=vec_id", "/plots?y=uid", "/plots?x=" + "a" * 5000, "/plots?corr=2", "/plots?corr=%27",
    "/?order=random&seed=abc", "/prompt?prompt=a&logit_scale=abc",
    "/prompt?prompt=" + "x" * 3000, "/prompt?prompt=a&logit_scale=inf", "/prompt?prompt=a&logit_scale=-1",
    "/prompt?prompt=%00", "/select?by=kl_text&fraction=2", "/select?by=kl_text&fraction=nan",
    "/select?by=caption&fraction=0.5", "/select?by=kl_text&lowest=7",
    "/select?by=kl_text&where=1%3D1%3B%20DELETE%20FROM%20samples",
    "/select?by=kl_text&where=(SELECT%20content%20FROM%20read_text('/etc/passwd'))%20IS%20NOT%20NULL",
    "/select?by=kl_text&where=1%3D1)%20UNION%20(SELECT%20*%20FROM%20read_csv('/etc/passwd')",
    "/select.npy?by=kl_text&where=nope_column%20%3E%201", "/select.npy?by=kl_text&fraction=0",
    "/image/-1", "/image/99999999", "/image/..%2F..%2Fetc%2Fpasswd", "/image/1", "/picture/abc.svg",
    "/static/../../catalog.duckdb", "/static/%2e%2e/app.py", "/nope",
]


def test_hostile_input_is_refused_without_traceback_write_or_read(client, index_dir):
    before = _snapshot(index_dir)
    for url in HOSTILE:
        r = client.get(url)
        assert r.status_code in (400, 404, 405), (url, r.status_code, r.text[:300])
        assert "Traceback" not in r.text and "root:x:0" not in r.text, url
        assert 'id="error"' in r.text or r.status_code == 404, url
    for files in ({"embedding": ("x.npy", b"not an npy")}, {"embedding": ("x.npy", b"\x93NUMPY" + b"\0" * 50)},
                  {"embedding": ("x.npy", _npy(np.zeros(64)))}, {"embedding": ("x.npy", _npy(np.ones(63)))},
                  {"embedding": ("x.npy", _npy(np.array([{"a": 1}], dtype=object)))},
                  {"embedding": ("x.npy", b"\0" * (2 * 2**20))}, {}):
        r = client.post("/prompt", files=files or None, data={"logit_scale": "10"})
        assert r.status_code == 400, (files.keys(), r.status_code, r.text[:300])
        assert "Traceback" not in r.text
    for scale in ("nan", "-3", "x" * 5000):
        r = client.post("/prompt", files={"embedding": ("x.npy", _npy(np.ones(64)))}, data={"logit_scale": scale})
        assert r.status_code == 400, (files.keys(), r.status_code, r.text[:300])
        assert "Traceback" not in r.text
    # another Host (DNS rebinding) is refused
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400
    assert _snapshot(index_dir) == before
    assert client.get("/").status_code == 200


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_images_only_from_the_paths_the_catalog_records(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # the relative path below exists from here: still not served

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 100, 200)).save(pics / f"{i}.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (pics / "link.png").symlink_to(secret)
    paths = [str(pics / "0.png"), str(pics / "1.png"), str(secret), str(pics / "link.png"), "", str(pics / "2.png"),
             "pics/0.png"]
    image, text = clustered_pairs(len(paths), 16)
    build_index(ArraySource(image, text, captions=[f"picture {i}" for i in range(len(paths))],
                            meta={"image_path": paths, "url": ["https://example.org/a.jpg", "javascript:alert(1)",
                                                               None, None, None, None, None]}), tmp_path / "idx")
    with queries.open_index(tmp_path / "idx") as pool:
        queries.score(pool, estimator="exact")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1") as c:
        ok = c.get("/image/0")
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        assert ok.content == (pics / "0.png").read_bytes()
        for v in (2, 3, 4, 6):  # a text file, a .png link to it, an empty path, a relative path
            assert c.get(f"/image/{v}").status_code == 404
        page = c.get("/?per_page=24").text
        assert 'src="/image/0"' in page and "javascript:" not in page
    out = tmp_path / "report.html"
    write_report(tmp_path / "idx", out)
    html = out.read_text()
    assert "data:image/jpeg;base64," in html and "secret" not in html


def test_report_is_self_contained(index_dir, tmp_path):
    from click.testing import CliRunner

    from clip_density_index import cli

    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli.cli, ["report", str(index_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "Content-Security-Policy" in html and 'id="correlations"' in html and 'id="kl_text-top"' in html
    # no external resource: the only URLs are SVG namespace names
    assert set(re.findall(r"https?://[^\"' )]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|iframe)", html)
    r = CliRunner().invoke(cli.cli, ["report", str(index_dir), "--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    assert os.path.getsize(out) > 10_000


def test_open_clip_pool_serves_its_own_images_only(tmp_path):
    pytest.importorskip("open_clip")
    from explorer_pools import build_openclip_pool

    idx, outside = build_openclip_pool(tmp_path / "oc")
    rows = queries.run_sql(idx, "SELECT vec_id, image FROM samples ORDER BY vec_id").to_pylist()
    with TestClient(create_app(idx), base_url="http://127.0.0.1") as c:
        for r in rows:
            got = c.get(f"/image/{r['vec_id']}")
            if r["image"].startswith(".."):  # recorded, exists, but outside the index's image folder
                assert got.status_code == 404
            else:
                assert got.status_code == 200 and got.headers["content-type"] in ("image/png", "image/jpeg")
                assert got.content == (tmp_path / "oc" / "images" / r["image"]).read_bytes()
        page = c.get("/?order=bottom").text
        assert page.count('src="/image/') == len(rows)
        # the pool has a model: a text prompt is encoded with it
        assert c.get("/prompt", params={"prompt": "a red circle"}).status_code == 200


def test_large_pools_get_the_correlation_table_on_request(index_dir, monkeypatch):
    import clip_density_index.explorer.app as explorer_app

    monkeypatch.setattr(explorer_app, "CORR_INLINE_MAX", 10)
    with TestClient(create_app(index_dir), base_url="http://127.0.0.1") as c:
        r = c.get("/plots")
        assert 'id="compute-correlations"' in r.text and 'id="correlations"' not in r.text
        assert 'id="correlations"' in c.get("/plots?corr=1").text
        assert 'id="correlations"' in c.get("/plots?x=dc_text").text  # kept once computed


def test_cli_serve_binds_localhost_and_stops(index_dir):
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "cli.py"), "serve", str(index_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None and "Gallery" in body, proc.stderr.read() if proc.poll() is not None else ""
        # bound to 127.0.0.1 only: the machine's other addresses do not answer
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Serving" in proc.stderr.read()


def test_large_pools_get_the_weight_distribution_on_request(index_dir, monkeypatch):
    import clip_density_index.explorer.app as explorer_app

    monkeypatch.setattr(explorer_app, "DIST_INLINE_MAX", 10)
    top = queries.sample(index_dir, "a photo of a cat", n=24, mode="top").column("vec_id").to_pylist()
    with TestClient(create_app(index_dir), base_url="http://127.0.0.1") as c:
        r = c.get("/prompt", params={"prompt": "a photo of a cat"})
        assert 'id="compute-weights"' in r.text and 'id="ess"' not in r.text and _card_ids(r.text) == top
        r = c.get("/prompt", params={"prompt": "a photo of a cat", "dist": "1"})
        assert 'id="ess"' in r.text and _card_ids(r.text) == top


def test_cli_serve_port_in_use_is_one_line(index_dir):
    import socket

    from click.testing import CliRunner

    from clip_density_index import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(cli.cli, ["serve", str(index_dir), "--port", str(s.getsockname()[1])])
    assert r.exit_code == 1 and "Cannot listen on 127.0.0.1:" in r.output and "Traceback" not in r.output
