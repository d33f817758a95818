"""job=explore: the maps the page shows are job=visualize's and the composition of the loops (NumPy float64, dense),
a click is answered from features cached per image, bad input is said on the page, a real browser clicks through the
page, and the server stops cleanly on Ctrl-C."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import CONTEXT_TINY

ROOT = Path(__file__).resolve().parents[1]


def restored(compose, trained, run_dir):
    from ccnet.jobs.restore import restore_model

    cfg = compose(["job=explore", f"checkpoint={trained}"])
    model, _, _ = restore_model(cfg, run_dir, adopt_dataset=True)
    return model, cfg


def dense(attention: np.ndarray) -> np.ndarray:
    """(h, w, h + w) criss-cross weights -> the (hw, hw) matrix whose row p holds p's weights over every position."""
    h, w = attention.shape[:2]
    out = np.zeros((h * w, h * w))
    for y in range(h):
        for x in range(w):
            row = np.zeros((h, w))
            row[:, x] += attention[y, x, :h]  # p's column
            row[y, :] += attention[y, x, h:]  # p's row
            out[y * w + x] = row.ravel()
    return out


def composed_maps(attentions, image_hw, point) -> list[np.ndarray]:
    """The loops composed with dense float64 matrices: M_r = A_r N_{r-1}, N_0 = I, N_k = (I + M_k) / 2; the row of
    the point's feature position, resized to the image as the page does."""
    (h, w), (fh, fw) = image_hw, attentions[0].shape[:2]
    p = min(fh - 1, point[0] * fh // h) * fw + min(fw - 1, point[1] * fw // w)
    eye, carried, maps = np.eye(fh * fw), np.eye(fh * fw), []
    for a in attentions:
        m = dense(a.astype(np.float64)) @ carried
        carried = (eye + m) / 2
        maps.append(m[p].reshape(fh, fw))
    return [cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) for m in maps], maps


def model_attentions(model, normalised):
    import jittor as jt

    with jt.no_grad():
        _, feature = model.backbone(jt.array(normalised[None]))
        return [a.numpy()[0] for a in model.head.attention_maps(feature)]


def test_page_maps_are_visualize_maps_and_the_composed_loops(trained, compose, tmp_path):
    from ccnet.data.transforms import eval_transform
    from ccnet.engine.attention import attention_maps_at
    from ccnet.jobs.explore import Explorer
    from ccnet.registry import JOBS

    model, cfg = restored(compose, trained, tmp_path / "explore")
    explorer = Explorer(model, cfg, tmp_path / "explore")
    picture = explorer.picture("0000")
    normalised = eval_transform(picture.image, cfg.dataset)
    reference = model_attentions(model, normalised)
    for point in [(16, 230), (0, 0), (31, 255), (9, 41)]:
        shown = explorer.maps(picture, point)
        visualized = attention_maps_at(model, normalised, point)  # what job=visualize draws
        assert len(shown) == 2 and all(np.array_equal(a, b) for a, b in zip(shown, visualized)), point
        expected, at_features = composed_maps(reference, picture.image.shape[:2], point)
        for a, b in zip(shown, expected):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert at_features[0].sum() == pytest.approx(1, abs=1e-5) and at_features[1].min() > 0
    # "save PNG" writes the very file job=visualize writes for the point
    saved = explorer.save(picture, (16, 230))
    JOBS.get("visualize").factory(
        compose(["job=visualize", f"checkpoint={trained}", "point=[16,230]"]), tmp_path / "vis"
    )
    written = tmp_path / "vis" / "attention_0000_y16_x230.png"
    assert saved.name == written.name and saved.read_bytes() == written.read_bytes()


def test_three_loops_compose_like_the_dense_product(compose, tmp_path):
    import jittor as jt

    from ccnet.data.transforms import eval_transform
    from ccnet.jobs.explore import Explorer
    from ccnet.models import build_model

    cfg = compose([*CONTEXT_TINY, "recurrence=r3", "job=explore"])
    model = build_model(cfg)
    model.head.cca.gamma.assign(jt.array([0.7]))  # a new module is the identity: loops would all see one input
    model.eval()
    explorer = Explorer(model, cfg, tmp_path)
    picture = explorer.picture("0001")
    reference = model_attentions(model, eval_transform(picture.image, cfg.dataset))
    assert not np.allclose(reference[0], reference[2])  # the loops do differ
    for point in [(5, 100), (30, 3)]:
        shown = explorer.maps(picture, point)
        expected, _ = composed_maps(reference, picture.image.shape[:2], point)
        assert len(shown) == 3
        for a, b in zip(shown, expected):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert explorer.overlays(picture) == ["prediction", "loop 1", "loop 2", "loop 3", "ground truth", "none"]


def test_a_click_is_answered_from_the_cache(trained, compose, tmp_path, monkeypatch):
    from ccnet.jobs import explore

    model, cfg = restored(compose, trained, tmp_path)
    calls = {"attention": 0, "predict": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(explore, "attention_weights", counted("attention", explore.attention_weights))
    monkeypatch.setattr(explore, "predict_image", counted("predict", explore.predict_image))
    explorer = explore.Explorer(model, cfg, tmp_path, keep=2)
    for point in [(1, 1), (16, 230), (31, 0)]:
        picture = explorer.picture("0000")
        explorer.maps(picture, point)
        explorer.view(picture, point, "loop 2", 0.5)
        info = explorer.pixel(picture, point)
    assert calls == {"attention": 1, "predict": 1}
    assert sum(info["probs"].values()) == pytest.approx(1, abs=1e-5) and info["truth"] in explorer.class_names
    assert info["predicted"] == max(info["probs"], key=info["probs"].get)
    explorer.picture("0001")
    explorer.picture("0002")  # keep=2: 0000 leaves the cache
    explorer.picture("0000")
    assert calls == {"attention": 4, "predict": 4}


def test_bad_input_is_said_clearly(trained, compose, tmp_path):
    from ccnet.jobs.explore import ExploreError, Explorer

    model, cfg = restored(compose, trained, tmp_path)
    explorer = Explorer(model, cfg, tmp_path)
    picture = explorer.picture("0000")
    with pytest.raises(ExploreError, match=r"point \(y=32, x=5\) lies outside the 32x256 image"):
        explorer.maps(picture, (32, 5))
    with pytest.raises(ExploreError, match=r"point \(y=0, x=-1\) lies outside"):
        explorer.view(picture, (0, -1), "prediction", 0.5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ExploreError, match=f"{re.escape(str(broken))}: cannot decode the image"):
        explorer.picture(explorer.add_file(str(broken)))
    # input=DIR: its images, without labels (no true class, no ground-truth overlay); a broken one is said when picked
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), picture.image[:, :, ::-1])
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cfg.input = str(folder)
    explorer = Explorer(model, cfg, tmp_path)
    assert list(explorer.sources) == ["a", "b"]
    with pytest.raises(ExploreError, match="b.jpg: cannot decode the image"):
        explorer.picture("b")
    mine = explorer.picture("a")
    assert (
        np.array_equal(mine.image, picture.image)
        and mine.label is None
        and explorer.pixel(mine, (3, 3))["truth"] is None
    )
    assert explorer.overlays(mine) == ["prediction", "loop 1", "loop 2", "none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    pytest.importorskip("gradio", reason='job=explore needs the optional extra: pip install -e ".[explore]"')
    port, run_dir = free_port(), tmp_path_factory.mktemp("explore-run")
    log_path = run_dir.parent / "explore-server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "run.py", "job=explore", f"checkpoint={trained}", f"explore.port={port}"]
            + [f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while f"attention explorer at {url}" not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()
        time.sleep(0.5)
    yield SimpleNamespace(proc=proc, url=url, port=port, log=log_path, run_dir=run_dir)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def browser_or_skip():
    pytest.importorskip("selenium", reason="selenium is not installed (the [test] extra)")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


STATUS = re.compile(
    r"point \(y=(\d+), x=(\d+)\).*?loop 1 peaks at \(y=(\d+), x=(\d+)\); loop 2 peaks at \(y=(\d+), x=(\d+)\)"
)


def test_a_browser_clicks_two_pixels(server, trained, compose, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from ccnet.data.datasets import build_dataset
    from ccnet.data.transforms import eval_transform
    from ccnet.engine.attention import attention_maps_at
    from ccnet.jobs.visualize import attention_figure

    driver = browser_or_skip()
    model, cfg = restored(compose, trained, tmp_path)
    image, _ = build_dataset(cfg.dataset, cfg.dataset.val_split).read(0)
    normalised = eval_transform(image, cfg.dataset)
    h, w = image.shape[:2]

    def status(changed_from=None, timeout=120):
        """The status line once it says something new (Gradio shows a timer beside it while an event runs)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = driver.find_elements(By.CSS_SELECTOR, "#status")
            lines = [t for t in (found[0].text.splitlines() if found else []) if "peaks" in t or "error" in t]
            if lines and lines[-1] != changed_from and not driver.find_elements(By.CSS_SELECTOR, "#status .eta-bar"):
                return lines[-1]
            time.sleep(0.2)
        raise AssertionError(f"the status line did not change from {changed_from!r}\n{server.log.read_text()}")

    def figure_shown() -> np.ndarray:
        src = driver.find_element(By.CSS_SELECTOR, "#figure img").get_attribute("src")
        data = np.frombuffer(urllib.request.urlopen(src, timeout=30).read(), np.uint8)
        return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]

    def click(y, x, before):
        img = driver.find_element(By.CSS_SELECTOR, "#view img")
        width, height = img.size["width"], img.size["height"]
        dx, dy = (x + 0.5) / w * width - width / 2, (y + 0.5) / h * height - height / 2
        ActionChains(driver).move_to_element_with_offset(img, int(round(dx)), int(round(dy))).click().perform()
        return status(before)

    def check(text, y, x):
        """The page's point, its maps' peaks (read back) and its figure against job=visualize's maps."""
        got = tuple(int(v) for v in STATUS.search(text).groups())
        maps = attention_maps_at(model, normalised, (y, x))
        peaks = [np.unravel_index(int(np.argmax(m)), m.shape) for m in maps]
        assert got == (y, x, *peaks[0], *peaks[1]), (text, peaks)
        shown, expected = figure_shown().astype(float), attention_figure(image, (y, x), maps).astype(float)
        assert shown.shape == expected.shape and np.abs(shown - expected).mean() < 8  # a JPEG of it (quality 75)
        far = attention_figure(image, (y, x), attention_maps_at(model, normalised, ((y + 16) % h, (x + 128) % w)))
        assert np.abs(shown - far).mean() > 2 * np.abs(shown - expected).mean()  # and not of another point's maps
        return maps

    try:
        driver.get(server.url)
        first = status()
        one = check(click(9, 204, first), 9, 204)
        text = status("")
        two = check(click(24, 40, text), 24, 40)
        assert not np.allclose(one[0], two[0]) and not np.allclose(one[1], two[1])  # the maps changed
        assert "true class" in text and driver.find_element(By.CSS_SELECTOR, "#legend").text.count("row") == 3
        # the arrow key moves the point by one feature cell (256 px / 33 positions: 8 px)
        text = status("")
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
        check(status(text), 24, 48)
        # bad input: said on the page, which still answers afterwards
        text = status("")
        box = driver.find_element(By.CSS_SELECTOR, "#y input")
        box.clear()
        box.send_keys("999", Keys.ENTER)
        said = status(text)
        assert "error" in said and "lies outside the 32x256 image" in said
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff not a jpeg")
        box = driver.find_element(By.CSS_SELECTOR, "#path textarea, #path input")
        box.send_keys(str(broken), Keys.ENTER)
        said = status(said)
        assert "error" in said and "cannot decode the image" in said
        check(click(3, 100, said), 3, 100)
        # offline: everything the page loaded came from our server (no CDN, no web fonts, no analytics)
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith((server.url, "data:", "blob:")) for u in loaded), loaded
    finally:
        driver.quit()
    log = server.log.read_text()
    assert "lies outside the 32x256 image" in log and "cannot decode the image" in log  # and in the log


def test_ctrl_c_stops_the_server_and_leaves_nothing_running(server):
    assert urllib.request.urlopen(server.url, timeout=30).status == 200
    below = descendants(server.proc.pid)
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0
    assert "the attention explorer has stopped" in server.log.read_text()
    deadline = time.time() + 20
    while any(alive(pid) for pid in below) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in below), [pid for pid in below if alive(pid)]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass


@pytest.mark.parametrize(
    "overrides,said",
    [
        (["explore.host=0.0.0.0", "checkpoint=RUN"], "error: explore.host='0.0.0.0': expected 127.0.0.1"),
        ([], "error: checkpoint=None: expected a path (job=eval|visualize|predict|explore needs one)"),
    ],
)
def test_refusals_are_one_line(overrides, said, tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "job=explore", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stderr.strip().startswith(said), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
