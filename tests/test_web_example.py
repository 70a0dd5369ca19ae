"""examples/web in a real headless browser (Debian's Chromium): the page loads an onnxvit output folder
with onnxruntime-web, preprocesses a photo as preprocess.json says, and gives the Python run's answer;
a wrong preprocess.json (mean and std swapped) makes that check fail."""

import functools
import http.server
import json
import shutil
import threading

import numpy as np
import onnx
import pytest

from onnxvit.web_check import REPO_WEB, not_checked
from tests.conftest import SAMPLE

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = not_checked() or (None if CHROMIUM and DRIVER else "no chromium / chromedriver (apt: chromium-driver)")
try:
    import selenium  # noqa: F401
except ImportError:
    MISSING = MISSING or "selenium is not installed (pip install -e '.[dev]')"

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model, tiny_onnx, image_folder):
    """A folder served on 127.0.0.1: web/ (the example), out/ and wrong/ (onnxvit hand-offs, the second with
    mean and std swapped) and a photo; the Python run's logits for that photo."""
    from PIL import Image

    from onnxvit.config import MobileConfig
    from onnxvit.data import timm_transform
    from onnxvit.handoff import preprocess_document, write_handoff
    from onnxvit.mobile import to_ort_format
    from passes.runtime import model_logits

    root = tmp_path_factory.mktemp("site")
    (root / "web").symlink_to(REPO_WEB, target_is_directory=True)
    transform, data_config = timm_transform(tiny_model)
    doc = preprocess_document(transform, data_config, "input")
    for name, preprocess in (("out", doc), ("wrong", {**doc, "mean": doc["std"], "std": doc["mean"]})):
        (root / name).mkdir()
        onnx.save(tiny_onnx, root / name / "model.fp32.onnx")
        to_ort_format(root / name / "model.fp32.onnx", root / name / "model.fp32.ort", MobileConfig())
        write_handoff(root / name, preprocess, [f"class {i}" for i in range(4)])
    photos = sorted(SAMPLE.glob("*/*.JPEG")) if SAMPLE.is_dir() else sorted(image_folder.glob("*/*.jpg"))
    shutil.copy(photos[0], root / "photo.jpg")
    with Image.open(root / "photo.jpg") as image:
        expected = model_logits(root / "out" / "model.fp32.ort", [transform(image.convert("RGB")).numpy()[None]])[0]

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", expected
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def classify(browser, base: str, folder: str) -> np.ndarray:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{base}/web/index.html?folder=../{folder}/&model=model.fp32.ort&image=../photo.jpg")
    body = WebDriverWait(browser, 120).until(
        lambda b: (
            b.find_element("tag name", "body")
            if b.find_element("tag name", "body").get_attribute("data-logits")
            or b.find_element("tag name", "body").get_attribute("data-error")
            else False
        )
    )
    assert not body.get_attribute("data-error"), body.get_attribute("data-error")
    assert browser.find_element("id", "top5").text  # the person sees the top-5 too
    return np.array(json.loads(body.get_attribute("data-logits")), np.float32)


def test_the_page_gives_the_python_runs_answer(site, browser):
    base, expected = site
    logits = classify(browser, base, "out")
    assert logits.argmax() == expected.argmax()
    assert np.abs(logits - expected).max() < 1e-3  # the page's preprocessing is timm's, to the byte


def test_a_wrong_preprocess_json_makes_the_check_fail(site, browser):
    base, expected = site
    logits = classify(browser, base, "wrong")
    assert np.abs(logits - expected).max() > 1e-2
