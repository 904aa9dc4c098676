"""Tests of the browser demo and HTTP API (`python -m omniris_jax.serve`).

  .venv/bin/python -m pytest -q tests/test_serve.py

One real uvicorn server on 127.0.0.1 (a free port) serves the tiny trained model for the whole module: the API
tests post multipart forms to it with httpx, and one browser test drives Debian's chromium through Playwright
(skipped only when no chromium binary exists). Set OMNIRIS_SCREENSHOT_DIR to keep the browser test's screenshot.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the browser demo needs gradio: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from omniris_jax import predict, serve  # noqa: E402  pylint: disable=g-import-not-at-top

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGET, REFERENCE, REFERENCE_MASK = (EXAMPLES / name for name in ("shapes_target.png", "shapes_reference.png",
                                                                  "shapes_reference_mask.png"))
MAX_UPLOAD_MB = 1  # small, so the oversized uploads stay cheap


@pytest.fixture(scope="module")
def server_url(tiny_workdir):
  """The app on a real uvicorn server in a background thread; yields its base URL."""
  predictor = predict.Predictor.from_workdir(str(tiny_workdir))
  app = serve.create_app(predictor, max_upload_mb=MAX_UPLOAD_MB)
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))  # a free port, held from here on so nothing else takes it
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}"
  server.should_exit = True
  thread.join(timeout=30)
  sock.close()


@pytest.fixture(scope="module")
def client(server_url):
  with httpx.Client(base_url=server_url, timeout=120) as http:
    yield http


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _file(path: Path) -> tuple[str, bytes, str]:
  return (path.name, path.read_bytes(), "image/png")


def _check_prediction(response, size: tuple[int, int], label_part: str) -> dict:
  assert response.status_code == 200, response.text
  payload = response.json()
  height, width = size
  assert (payload["height"], payload["width"]) == (height, width)
  assert len(payload["prompts"]) == 1 and label_part in payload["prompts"][0]["prompt"]
  assert 0.0 <= payload["prompts"][0]["no_target_prob"] <= 1.0
  assert payload["union"]["size"] == [height, width]
  overlay = Image.open(io.BytesIO(base64.b64decode(payload["overlay_png_base64"])))
  # Small images are enlarged to at least 512 px wide (so the legend's words fit), with the legend below.
  scale = -(-512 // width) if width < 512 else 1
  assert overlay.format == "PNG" and overlay.width == width * scale and overlay.height > height * scale
  return payload


def test_text_prompt(client):
  response = client.post("/api/predict", files={"image": _file(TARGET)}, data={"text": "the purple cross"})
  payload = _check_prediction(response, (128, 128), "'the purple cross'")
  assert payload["image"] == TARGET.name


def test_box_and_omni_mask_prompts(client):
  response = client.post("/api/predict", files={"image": _file(TARGET), "ref_image": _file(REFERENCE)},
                         data={"ref_box": "70, 62, 103, 94"})
  _check_prediction(response, (128, 128), "visual prompt (box)")
  response = client.post("/api/predict", data={"text": "the purple cross"},
                         files={"image": _file(TARGET), "ref_image": _file(REFERENCE),
                                "ref_mask": _file(REFERENCE_MASK)})
  _check_prediction(response, (128, 128), "'the purple cross' + visual prompt (mask)")


_EMPTY_MASK = _png(np.zeros((128, 128), np.uint8))
_SMALL_MASK = _png(np.full((16, 16), 255, np.uint8))
_BAD_CASES = {
    # name: (form fields, files, status, the field the error must name)
    "no_image": ({"text": "a"}, {}, 400, "image"),
    "unreadable_image": ({"text": "a"}, {"image": ("t.png", b"not an image", "image/png")}, 400, "image"),
    "image_wrong_content_type": ({"text": "a"}, {"image": ("t.txt", TARGET.read_bytes(), "text/plain")}, 415,
                                 "image"),
    "image_as_text_field": ({"text": "a", "image": "t.png"}, {"ref_mask": _file(REFERENCE_MASK)}, 400, "image"),
    "no_prompt": ({}, {"image": _file(TARGET)}, 400, "text"),
    "blank_text_only": ({"text": "   "}, {"image": _file(TARGET)}, 400, "ref_image"),
    "unreadable_ref_image": ({"ref_box": "1,1,5,5"},
                             {"image": _file(TARGET), "ref_image": ("r.png", b"\x89PNG broken", "image/png")}, 400,
                             "ref_image"),
    "box_outside_image": ({"ref_box": "70,62,200,94"}, {"image": _file(TARGET), "ref_image": _file(REFERENCE)},
                          400, "ref_box"),
    "box_not_four_numbers": ({"ref_box": "70,62,x"}, {"image": _file(TARGET), "ref_image": _file(REFERENCE)},
                             400, "ref_box"),
    "box_without_ref_image": ({"ref_box": "1,1,5,5"}, {"image": _file(TARGET)}, 400, "ref_image"),
    "ref_image_without_spatial": ({}, {"image": _file(TARGET), "ref_image": _file(REFERENCE)}, 400, "ref_box"),
    "two_spatial_prompts": ({"ref_box": "1,1,5,5"}, {"image": _file(TARGET), "ref_image": _file(REFERENCE),
                                                     "ref_mask": _file(REFERENCE_MASK)}, 400, "ref_mask"),
    "empty_mask": ({}, {"image": _file(TARGET), "ref_image": _file(REFERENCE),
                        "ref_mask": ("m.png", _EMPTY_MASK, "image/png")}, 400, "ref_mask"),
    "mask_of_another_size": ({}, {"image": _file(TARGET), "ref_image": _file(REFERENCE),
                                  "ref_scribble": ("s.png", _SMALL_MASK, "image/png")}, 400, "ref_scribble"),
    "unknown_field": ({"text": "a", "ref-box": "1,1,5,5"}, {"image": _file(TARGET)}, 400, "ref-box"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CASES))
def test_bad_input_names_the_field(client, case):
  data, files, status, field = _BAD_CASES[case]
  response = client.post("/api/predict", data=data, files=files or None)
  assert response.status_code == status, response.text
  assert field in response.json()["error"]


@pytest.mark.parametrize("content_type, body, status, field", [
    ("application/json", b'{"text": "a"}', 415, "Content-Type"),
    ("multipart/form-data", b"--x\r\nno boundary given\r\n", 400, "form"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--b--\r\n", 400,
     "form"),
])
def test_malformed_request_names_the_problem(client, content_type, body, status, field):
  response = client.post("/api/predict", content=body, headers={"Content-Type": content_type})
  assert response.status_code == status, response.text
  assert field in response.json()["error"]


def test_huge_image_is_refused_before_decoding(client):
  buffer = io.BytesIO()
  Image.new("L", (6000, 5000)).save(buffer, format="PNG")  # 30 MP of zeros compresses to a small file
  response = client.post("/api/predict", files={"image": ("huge.png", buffer.getvalue(), "image/png")},
                         data={"text": "a"})
  assert response.status_code == 413, response.text
  assert response.json()["error"].startswith("image: 6000x5000 pixels")


def _oversized_form() -> tuple[bytes, str]:
  """A multipart body with an image part larger than the limit (random bytes: refused before being read)."""
  boundary = "omniris-test-boundary"
  payload = np.random.default_rng(0).integers(0, 256, int(1.2 * MAX_UPLOAD_MB * 2**20), np.uint8).tobytes()
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
          f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def test_oversized_upload_is_413(client):
  body, content_type = _oversized_form()
  # Content-Length says it: refused before the body is read.
  response = client.post("/api/predict", content=body, headers={"Content-Type": content_type})
  assert response.status_code == 413, response.text
  assert "upload" in response.json()["error"]
  # Chunked, no Content-Length: refused while reading.
  chunks = (body[start:start + 65536] for start in range(0, len(body), 65536))
  response = client.post("/api/predict", content=chunks, headers={"Content-Type": content_type})
  assert "content-length" not in response.request.headers
  assert response.status_code == 413, response.text
  assert "upload" in response.json()["error"]


def test_concurrent_requests_queue(client):
  def post(index: int):
    if index % 2:
      return client.post("/api/predict", files={"image": _file(TARGET), "ref_image": _file(REFERENCE)},
                         data={"ref_box": "70,62,103,94"})
    return client.post("/api/predict", files={"image": _file(TARGET)}, data={"text": f"shape {index}"})

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    responses = list(pool.map(post, range(4)))
  assert [response.status_code for response in responses] == [200] * 4, [r.text for r in responses]


def test_serve_cli_without_gradio_says_how_to_install(monkeypatch, capsys):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_gradio(name, *args, **kwargs):
    if name == "gradio" or name.startswith("gradio."):
      raise ImportError("No module named 'gradio'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_gradio)
  assert serve.main(["--workdir", "/nonexistent"]) == 2
  assert "pip install 'omniris_jax[serve]'" in capsys.readouterr().err


def test_read_drawing():
  background = np.zeros((20, 30, 4), np.uint8)
  layer = np.zeros((20, 30, 4), np.uint8)
  layer[5:8, 10:16, 3] = 153  # a translucent stroke
  value = {"background": background, "layers": [layer], "composite": background}
  reference, kind, box = serve.read_drawing(value, "box")
  assert reference.shape == (20, 30, 3) and kind == "box" and box == (10, 5, 16, 8)
  _, kind, painted = serve.read_drawing(value, "mask")
  assert kind == "mask" and painted.sum() == 18
  # The editor's canvas at another size than the image: the painted map is resized to the image.
  _, _, painted = serve.read_drawing({"background": np.zeros((40, 60, 4), np.uint8), "layers": [layer]}, "scribble")
  assert painted.shape == (40, 60) and painted.sum() == 72
  assert serve.read_drawing(None, "mask") == (None, None, None)
  assert serve.read_drawing({"background": None, "layers": [], "composite": None}, "box") == (None, None, None)
  with pytest.raises(ValueError, match="nothing is painted"):
    serve.read_drawing({"background": background, "layers": [np.zeros_like(layer)]}, "mask")
  with pytest.raises(ValueError, match="upload the reference image first"):
    serve.read_drawing({"background": None, "layers": [layer]}, "mask")


def test_browser_draw_and_submit(server_url, tmp_path):
  """Upload a target and a reference, type a prompt, paint a stroke on the reference, submit, read the answer."""
  chromium = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
  if chromium is None:
    pytest.skip("no chromium binary (apt-get install chromium); the browser test drives Debian's chromium")
  sync_api = pytest.importorskip("playwright.sync_api")
  screenshot = tmp_path / "serve_browser.png"
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 1100})
      page.goto(server_url + "/", wait_until="domcontentloaded")
      # Submitting with no image is refused with gradio's error naming the field.
      page.locator("#submit").click()
      page.get_by_text("Target image: upload the image").first.wait_for(state="visible", timeout=30_000)
      page.locator(".toast-close").first.click()
      page.locator("#target input[type=file]").set_input_files(str(TARGET))
      page.locator("#text textarea").fill("the purple cross")
      page.locator("#reference input[type=file]").set_input_files(str(REFERENCE))
      # Paint a stroke over the reference image's middle with the brush.
      canvas = page.locator("#reference canvas").first
      canvas.wait_for(state="visible")
      box = canvas.bounding_box()
      x, y = box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.55
      page.mouse.move(x, y)
      page.mouse.down()
      for step in range(1, 11):
        page.mouse.move(x + 4 * step, y + 3 * step)
      page.mouse.up()
      page.locator("#submit").click()
      page.locator("#overlay img").wait_for(state="visible", timeout=120_000)
      verdict = page.locator("#verdict textarea")
      page.wait_for_function("el => el.value.length > 0", arg=verdict.element_handle(), timeout=60_000)
      text = verdict.input_value()
      # Gradio fades its progress cover out once the answer is in; screenshot after it, transitions finished.
      for output in ("#overlay", "#verdict"):
        page.locator(f"{output} [data-testid=status-tracker].hide").wait_for(state="attached", timeout=30_000)
      page.screenshot(path=str(screenshot), full_page=True, animations="disabled")
    finally:
      browser.close()
  # The verdict says "no target" or the area, and names both prompts: the stroke reached the server.
  assert re.match(r"(no target|an empty mask|[\d,]+ pixels)", text), text
  assert text.endswith("for 'the purple cross' + visual prompt (scribble)"), text
  assert screenshot.stat().st_size > 0
  if os.environ.get("OMNIRIS_SCREENSHOT_DIR"):
    os.makedirs(os.environ["OMNIRIS_SCREENSHOT_DIR"], exist_ok=True)
    shutil.copy(screenshot, os.environ["OMNIRIS_SCREENSHOT_DIR"])
