"""The explorer in a real browser: Debian's headless Chromium driven by Selenium through the system
chromedriver (``.ci/run`` installs both; no browser is downloaded at run time). The server is
uvicorn on 127.0.0.1 in a thread, stopped at the end of the module.

Screenshots of each view go to ``docs/explorer-*.png`` only when ``UPDATE_SCREENSHOTS=1``."""

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from clip_density_index import queries  # noqa: E402
from clip_density_index.explorer.app import create_app  # noqa: E402
from clip_density_index.indexer.build import build_index  # noqa: E402
from clip_density_index.indexer.synthetic import SyntheticSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or CHROMIUM is None,
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver; .ci/run does this as root)",
)
SHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser") / "idx"
    build_index(SyntheticSource(n=2500, seed=5, dim=64), d)
    with queries.open_index(d) as pool:
        queries.score(pool, estimator="exact")
    return d


@contextlib.contextmanager
def _serve(index_dir):
    """uvicorn on a free 127.0.0.1 port in a thread (at most 500 requests), stopped on exit."""
    port = _free_port()
    config = uvicorn.Config(create_app(index_dir, "127.0.0.1", port), host="127.0.0.1", port=port,
                            log_level="warning", limit_max_requests=500)
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and t.is_alive(), "the explorer did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def server(index_dir):
    with _serve(index_dir) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    try:
        drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as e:  # a driver that does not match the browser, no display libraries ...
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")
    drv.set_page_load_timeout(60)
    drv.downloads = downloads
    yield drv
    drv.quit()


def _shot(drv, name):
    if SHOTS:
        (ROOT / "docs").mkdir(exist_ok=True)
        drv.save_screenshot(str(ROOT / "docs" / f"explorer-{name}.png"))


def _click(drv, element_id):
    """Click a button or link that loads a new page, and wait for that page."""
    old = drv.find_element(By.TAG_NAME, "html")
    drv.find_element(By.ID, element_id).click()
    WebDriverWait(drv, 30).until(EC.staleness_of(old))


def _ids(drv):
    return [int(e.get_attribute("data-vec-id")) for e in drv.find_elements(By.CSS_SELECTOR, "#cards .card")]


def test_explorer_in_a_browser(server, browser, index_dir, tmp_path):
    drv = browser
    drv.get(server + "/")
    assert "Gallery" in drv.title and "SYNTHETIC" in drv.page_source
    assert _ids(drv) == queries.run_query(index_dir, "top_by_score", column="kl_text", limit=24) \
        .column("vec_id").to_pylist()
    _shot(drv, "gallery")
    # sort by another column, lowest first, then page
    Select(drv.find_element(By.ID, "column")).select_by_value("klr_text")
    Select(drv.find_element(By.ID, "order")).select_by_value("bottom")
    _click(drv, "show")
    bottom = queries.run_query(index_dir, "bottom_by_score", column="klr_text", limit=48).column("vec_id").to_pylist()
    assert _ids(drv) == bottom[:24]
    _click(drv, "next")
    assert _ids(drv) == bottom[24:48] and "page 2" in drv.find_element(By.ID, "status").text
    # a decile, then a random page within it
    Select(drv.find_element(By.ID, "order")).select_by_value("decile")
    Select(drv.find_element(By.ID, "decile")).select_by_value("10")
    _click(drv, "show")
    top_tenth = set(queries.run_query(index_dir, "top_by_score", column="klr_text", limit=251)
                    .column("vec_id").to_pylist())
    assert set(_ids(drv)) <= top_tenth and len(_ids(drv)) == 24
    Select(drv.find_element(By.ID, "order")).select_by_value("random")
    _click(drv, "show")
    first = _ids(drv)
    _click(drv, "next")
    assert set(first) | set(_ids(drv)) <= top_tenth and _ids(drv) != first
    # plots
    drv.get(server + "/plots")
    Select(drv.find_element(By.ID, "y")).select_by_value("dc_text")
    _click(drv, "draw")
    assert "dc_text" in drv.find_element(By.ID, "scatter").get_attribute("innerHTML")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#histograms svg")) >= 10
    assert drv.find_elements(By.CSS_SELECTOR, "#correlations tr")
    _shot(drv, "plots")
    # a prompt
    drv.get(server + "/prompt")
    drv.find_element(By.ID, "prompt").send_keys("a photo of a dog")
    _click(drv, "run")
    top = queries.sample(index_dir, "a photo of a dog", n=24, mode="top").column("vec_id").to_pylist()
    assert _ids(drv) == top and drv.find_element(By.ID, "ess").text
    _shot(drv, "prompt")
    # a selection: preview, then download the subset and compare it with select's file
    drv.get(server + "/select")
    Select(drv.find_element(By.ID, "by")).select_by_value("kl_text")
    frac = drv.find_element(By.ID, "fraction")
    frac.clear()
    frac.send_keys("0.3")
    drv.find_element(By.ID, "where").send_keys("clipscore > 0.6")
    _click(drv, "preview")
    sel = queries.select(index_dir, by="kl_text", top_fraction=0.3, where="clipscore > 0.6", out=tmp_path / "s.npy")
    assert drv.find_element(By.ID, "kept").text == f"{sel.kept:,}"
    _shot(drv, "selection")
    drv.find_element(By.ID, "download").click()
    got = drv.downloads / "subset.npy"
    deadline = time.monotonic() + 20
    while not got.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got.read_bytes() == (tmp_path / "s.npy").read_bytes()


def test_hostile_input_in_the_browser(server, browser, index_dir):
    drv = browser
    catalog = index_dir / "catalog.duckdb"
    before = catalog.stat().st_mtime_ns, catalog.read_bytes()
    drv.get(server + "/select")
    drv.find_element(By.ID, "where").send_keys("1=1; DROP TABLE samples")
    _click(drv, "preview")
    assert "contains ';'" in drv.find_element(By.ID, "error").text
    drv.get(server + "/select")
    drv.find_element(By.ID, "where").send_keys("(SELECT count(*) FROM read_text('/etc/passwd')) > 0")
    _click(drv, "preview")
    assert drv.find_element(By.ID, "error").text and "root:" not in drv.page_source
    drv.get(server + "/prompt")
    drv.find_element(By.ID, "prompt").send_keys("<script>alert(1)</script>")
    _click(drv, "run")
    assert "<script>alert" not in drv.page_source  # escaped, never markup
    for url in ("/?column=%22%3B%20DROP%20TABLE%20scores", "/?decile=42", "/image/..%2F..%2Fetc%2Fpasswd",
                "/plots?x=uid", "/select.npy?by=kl_text&fraction=7"):
        drv.get(server + url)
        assert "Traceback" not in drv.page_source and "root:x" not in drv.page_source
    assert (catalog.stat().st_mtime_ns, catalog.read_bytes()) == before


def test_open_clip_pool_shows_real_thumbnails(browser, tmp_path):
    pytest.importorskip("open_clip")
    from explorer_pools import build_openclip_pool

    idx, _ = build_openclip_pool(tmp_path / "oc")
    with _serve(idx) as url:
        browser.get(url + "/?order=top")
        WebDriverWait(browser, 20).until(lambda d: d.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))
        sizes = browser.execute_script(
            "return Array.from(document.querySelectorAll('#cards img')).map(i => [i.getAttribute('src'), i.naturalWidth])")
        loaded = [src for src, w in sizes if w > 0]
        # every image inside the folder is shown; the one recorded outside it is not served
        assert len(sizes) == 17 and len(loaded) == 16, sizes
        _shot(browser, "gallery-images")
