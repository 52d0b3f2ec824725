"""The playground in a real browser: JupyterLab (headless, loopback, token), Debian's Chromium driven by selenium.

One run (module fixture): open ``notebooks/02_playground.ipynb``, Run All, clear the canvas, draw a box with real
mouse events in the top-left quarter, type its caption, set a few steps, Generate, Save; screenshots go to
``outputs/browser/`` (CI artifacts). Without ``chromium``/``chromedriver`` the tests skip on a developer machine
and FAIL under CI (``CI=true``), so CI never passes without having run them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "outputs" / "browser"
CANVAS = 512  # display pixels of the playground canvas
FRAME = 64  # the Shapes frame of a blank canvas (the notebook's FRAME)
DRAG = ((40, 40), (216, 216))  # display pixels: inside the top-left quarter
CAPTION = "a red solid circle"
STEPS = 10

pytestmark = pytest.mark.slow


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    msg = f"{tool} not found: apt-get install -y chromium chromium-driver (Debian)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI: {msg}")
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, fn, timeout: float, every: float = 0.5):
    t0 = time.monotonic()
    while True:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - the page is still loading
            value = None
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _shutdown_kernels(url: str, token: str) -> None:
    """Stop the kernels the browser started, through the server's API (before the server itself stops)."""
    auth = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels", headers=auth), timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}", headers=auth, method="DELETE")
        urllib.request.urlopen(req, timeout=60).close()


@pytest.fixture(scope="module")
def lab():
    """JupyterLab on 127.0.0.1 with a random token, notebooks/ as its root (as ``make lab``); stopped after."""
    _need("chromium")
    _need("chromedriver")
    # our own temporary folder: pytest's numbered ones are pruned by any other pytest run of the same user
    tmp = Path(tempfile.mkdtemp(prefix="instdiff-lab-"))
    # running cells must not rewrite the committed notebook: no autosave (and the file is put back after)
    settings = tmp / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notebook = ROOT / "notebooks" / "02_playground.ipynb"
    original = notebook.read_bytes()
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "HF_HUB_OFFLINE": "1"}
    log = open(tmp / "lab.log", "w")
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.allow_root=True"]  # CI runs as root
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait("JupyterLab to answer", lambda: urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                  .status == 200, timeout=240)
        except TimeoutError:
            log.flush()
            print((tmp / "lab.log").read_text()[-5000:])
            raise
        yield {"url": url, "token": token, "log": tmp / "lab.log", "tmp": tmp}
    finally:
        try:
            _shutdown_kernels(url, token)
        except OSError as e:
            print(f"could not stop the kernels through the API: {e}")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if notebook.read_bytes() != original:
            notebook.write_bytes(original)


@pytest.fixture(scope="module")
def driver(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager: never download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = _need("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={lab['tmp'] / 'chrome-profile'}", "--window-size=1400,1700"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=_need("chromedriver")), options=opts)
    try:
        yield d
    finally:
        d.quit()


def _css(driver, selector: str):
    return driver.find_element("css selector", selector)


def _type(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = _css(driver, selector)
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)


@pytest.fixture(scope="module")
def drawn(lab, driver):
    """Open the playground, run all cells, draw, caption, Generate, Save; the files and measurements."""
    from selenium.webdriver.common.action_chains import ActionChains

    SHOTS.mkdir(parents=True, exist_ok=True)
    out_rel = f"outputs/browser/run-{uuid.uuid4().hex[:8]}"
    save_rel = f"{out_rel}/drawn.json"
    t0 = time.monotonic()
    driver.get(f"{lab['url']}/lab/tree/02_playground.ipynb?token={lab['token']}")
    try:
        # the kernel: a "Select Kernel" dialog may ask which one to start (accept the notebook's own, python3)
        _wait("the notebook's kernel to be idle", lambda: driver.execute_script(
            "const ok = document.querySelector('.jp-Dialog .jp-mod-accept'); if (ok) { ok.click(); return false; }"
            "const bar = document.querySelector('.jp-StatusBar-Widget');"
            "return document.querySelector('.jp-Notebook') !== null && bar !== null && bar.innerText.includes('Idle');"),
            timeout=600)
        _wait("the Run menu", lambda: [e for e in driver.find_elements("css selector", ".lm-MenuBar-itemLabel")
                                       if e.text == "Run"][0].click() or True, timeout=120)
        _wait("Run All Cells", lambda: [e for e in driver.find_elements("css selector", ".lm-Menu-itemLabel")
                                        if e.text == "Run All Cells"][0].click() or True, timeout=120)
        canvas = _wait("the playground canvas", lambda: driver.execute_script(
            # a "Select Kernel" dialog may ask which kernel to start: accept the notebook's own (python3)
            "const ok = document.querySelector('.jp-Dialog .jp-mod-accept'); if (ok) ok.click();"
            "const c = document.querySelector('img.instdiff-canvas'); return c && c.naturalWidth > 0 ? c : null;"),
            timeout=900)  # seconds on an idle machine (torch's import, the model's first load); long when shared
        startup_s = time.monotonic() - t0
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", _css(driver, ".instdiff-tool"))
        _css(driver, ".instdiff-clear").click()
        _wait("a blank canvas", lambda: len(driver.find_elements("css selector", ".instdiff-instances option")) == 0,
              timeout=120)
        _type(driver, ".instdiff-steps input", str(STEPS))
        _type(driver, ".instdiff-out-dir input", out_rel)
        _type(driver, ".instdiff-save-path input", save_rel)

        # a box dragged with real mouse events (offsets are from the canvas centre)
        (x0, y0), (x1, y1) = DRAG
        c = CANVAS / 2
        chain = ActionChains(driver, duration=50).move_to_element_with_offset(canvas, x0 - c, y0 - c).click_and_hold()
        for k in range(1, 6):
            chain = chain.move_to_element_with_offset(canvas, x0 + (x1 - x0) * k / 5 - c, y0 + (y1 - y0) * k / 5 - c)
        chain.release().perform()
        _wait("the drawn box in the instance list", lambda: [o.text for o in driver.find_elements(
            "css selector", ".instdiff-instances option")] == ["0: (no caption) [box]"], timeout=120)
        _type(driver, ".instdiff-caption input", CAPTION)
        _wait("the caption on the instance", lambda: [o.text for o in driver.find_elements(
            "css selector", ".instdiff-instances option")] == [f"0: {CAPTION} [box]"], timeout=120)
        driver.save_screenshot(str(SHOTS / "playground_drawn.png"))

        t1 = time.monotonic()
        _css(driver, ".instdiff-generate").click()
        _wait("the generated image", lambda: "done in" in _css(driver, ".instdiff-message").text, timeout=900)
        generate_s = time.monotonic() - t1
        _css(driver, ".instdiff-save").click()
        _wait("the saved layout", lambda: "saved" in _css(driver, ".instdiff-message").text, timeout=120)
        shown = Image.open(io.BytesIO(_css(driver, "img.instdiff-result-image").screenshot_as_png)).convert("RGB")
        shown.save(SHOTS / "playground_result_image.png")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", _css(driver, ".instdiff-tool"))
        driver.save_screenshot(str(SHOTS / "playground.png"))
    except Exception:
        driver.save_screenshot(str(SHOTS / "playground_failure.png"))
        print(Path(lab["log"]).read_text()[-5000:])
        raise
    out = ROOT / out_rel
    images = sorted(out.glob("layout-*__seed*__0.png"))
    layouts = sorted(p for p in out.glob("layout-*.json") if "__" not in p.name)  # not the <stem>__seed<S>.json
    return {"out": out, "saved": ROOT / save_rel, "images": images, "layouts": layouts,
            "shown": shown, "startup_s": round(startup_s, 1), "generate_s": round(generate_s, 1)}


def test_drawn_box_generates_and_saves(drawn):
    print(f"startup {drawn['startup_s']} s, generate {drawn['generate_s']} s ({STEPS} steps)")
    assert len(drawn["images"]) == 1, drawn["images"]
    made = Image.open(drawn["images"][0]).convert("RGB")
    assert made.size == (FRAME, FRAME)
    # the page shows that image: its on-screen pixels, averaged back to the 64 px frame, are the file's
    shown = np.asarray(drawn["shown"].resize((FRAME, FRAME), Image.Resampling.BOX), dtype=np.float64)
    diff = np.abs(shown - np.asarray(made, dtype=np.float64)).mean()
    print(f"on-screen result vs the generated file: mean |difference| {diff:.2f} grey levels")
    assert diff < 8, f"the image on the page is not the generated one (mean |difference| {diff:.1f})"
    saved = json.loads(drawn["saved"].read_text())
    assert [a["caption"] for a in saved["annos"]] == [CAPTION]
    (x0, y0), (x1, y1) = DRAG
    expected = [x0 * FRAME / CANVAS, y0 * FRAME / CANVAS, (x1 - x0) * FRAME / CANVAS, (y1 - y0) * FRAME / CANVAS]
    assert np.allclose(saved["annos"][0]["bbox"], expected, atol=1.0), (saved["annos"][0]["bbox"], expected)
    assert saved["width"] == saved["height"] == FRAME
    # the layout Generate wrote beside the image is the one saved
    assert [json.loads(p.read_text()) for p in drawn["layouts"]] == [saved]
    assert (SHOTS / "playground.png").stat().st_size > 10_000


def red_share(img: Image.Image) -> tuple[float, float]:
    """Share of pixels nearer the Shapes world's red than any other of its colours or the light background, in the
    top-left and the bottom-right quarter."""
    from instdiff_lib.datasets.shapes import COLOR_RGB

    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    names = list(COLOR_RGB)
    refs = np.array([COLOR_RGB[n] for n in names] + [(200, 200, 200)], dtype=np.float64)  # + a light background
    nearest = np.linalg.norm(a[:, :, None, :] - refs[None, None], axis=-1).argmin(-1)
    red = nearest == names.index("red")
    h, w = red.shape
    return float(red[: h // 2, : w // 2].mean()), float(red[h // 2:, w // 2:].mean())


def _committed_mini_model() -> bool:
    """The Shapes mini model committed before the instance-masked retraining (its UNet's sha256 starts d75e39ed)."""
    manifest = ROOT / "models" / "shapes-mini" / "manifest.json"
    return json.loads(manifest.read_text())["files"]["unet.safetensors"]["sha256"].startswith("d75e39ed83e1754e")


@pytest.mark.xfail(_committed_mini_model(), strict=False,
                   reason="the committed mini model does not follow its layouts yet (box AP50 ~1%); a retrained model "
                          "(another UNet sha256) must pass this")
def test_drawn_colour_lands_in_the_drawn_quarter(drawn):
    """Once the mini model follows its layouts: red dominates the quarter the red box was drawn in, not the
    opposite one. (The committed model does not follow its layouts yet: this may fail against it.)"""
    tl, br = red_share(Image.open(drawn["images"][0]))
    print(f"red share: top-left quarter {tl:.3f}, bottom-right quarter {br:.3f}")
    assert tl >= 0.15 and br <= 0.05, f"red share top-left {tl:.3f} (want >= 0.15), bottom-right {br:.3f} (want <= 0.05)"
