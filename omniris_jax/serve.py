"""The browser demo and HTTP API of a trained predictor.

  pip install -e '.[serve]'
  python -m omniris_jax.serve --workdir workdir/demo [--stage S] [--host 127.0.0.1] [--port 7860] \\
      [--max-upload-mb 10]

then open the printed URL: upload a target image, type a text prompt and/or upload a reference image and paint over
the referent, and submit. The same model answers `POST /api/predict`, a multipart form:

  curl -F image=@examples/shapes_target.png -F text="the purple cross" http://127.0.0.1:7860/api/predict
  curl -F image=@examples/shapes_target.png -F ref_image=@examples/shapes_reference.png \\
      -F ref_box=70,62,103,94 http://127.0.0.1:7860/api/predict

Fields: `image` (file, required), `text`, and `ref_image` (file) with exactly one of `ref_box` ("x0,y0,x1,y1" in
pixels of the reference image), `ref_mask` or `ref_scribble` (binary image files of the reference image's size).
The answer is `predict.prediction_json` (COCO RLE masks, no-target probabilities) plus `overlay_png_base64`; a bad
input answers 4xx with `{"error": "<field>: ..."}`, and so do another method (405) and another path under /api (404).

One predictor serves everything; a lock makes concurrent requests (API and browser) wait their turn. gradio and
fastapi are imported only here, and only when the app is built, so `import omniris_jax` never needs them.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from omniris_jax import predict

if TYPE_CHECKING:
  import fastapi

FIELDS = ("image", "text", "ref_image", "ref_box", "ref_mask", "ref_scribble")
FILE_FIELDS = ("image", "ref_image", "ref_mask", "ref_scribble")
SPATIAL_FIELDS = ("ref_box", "ref_mask", "ref_scribble")
# An upload decodes to at most this many pixels: a small compressed file can hold a huge image.
MAX_PIXELS = 25_000_000
# Content types a file part may declare; clients that do not know send octet-stream or nothing.
_GENERIC_TYPES = ("", "application/octet-stream")
_SERVE_HINT = "pip install 'omniris_jax[serve]'"
_log = logging.getLogger(__name__)


class BadInput(Exception):
  """A request the server refuses: `status` (4xx) and a message that starts with the field at fault."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


# ===============================================================================================================
# The model behind both front ends
# ===============================================================================================================


class Segmenter:
  """One predictor shared by the API and the UI; a lock keeps `set_image` and `predict` of a request together."""

  def __init__(self, predictor: predict.Predictor):
    self.predictor = predictor
    self._lock = threading.Lock()

  def segment(self, image: np.ndarray, prompt: predict.Prompt, label: str) -> tuple[predict.Prediction, bytes]:
    """The prediction for one prompt about `image` (uint8 RGB) and the overlay PNG's bytes; BadInput when the
    text has no words the tokenizer keeps."""
    with self._lock:
      # Checked here, under the lock: the tokenizer is not safe to call from two threads at once.
      if prompt.text is not None and not self.predictor.tokenizer.tokens(prompt.text):
        raise BadInput(400, f"text: {prompt.text[:80]!r} has no words once control characters are dropped; type "
                            "an instruction, or leave text out and give a visual prompt.")
      self.predictor.set_image(image)
      prediction = self.predictor.predict(prompts=[prompt])
    with tempfile.TemporaryDirectory(prefix="omniris_serve_") as folder:
      path = os.path.join(folder, "overlay.png")
      predict.draw_overlay(image, prediction, [label], path)
      with open(path, "rb") as file:
        return prediction, file.read()


def prompt_label(text: str | None, spatial: str | None) -> str:
  """How the overlay's legend and the JSON name the prompt: its text and/or which visual prompt it is."""
  parts = [repr(text) if text is not None else None, f"visual prompt ({spatial})" if spatial else None]
  return " + ".join(part for part in parts if part)


def verdict(prediction: predict.Prediction, label: str) -> str:
  """The answer in words ("no target" plainly when that is the model's call, else what it paints), then the
  prompt."""
  return f"{predict.verdict(prediction, 0)} for {label}"


# ===============================================================================================================
# The HTTP API
# ===============================================================================================================


def decode_image(data: bytes, field: str) -> np.ndarray:
  """An uploaded image's bytes -> uint8 RGB (H, W, 3), EXIF orientation applied (as `predict.load_image`)."""
  try:
    with Image.open(io.BytesIO(data)) as opened:
      _check_pixels(opened, field)
      opened.load()
      return predict.load_image(opened, field)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise BadInput(400, f"{field}: the upload is not an image this server can read ({_why(error)}); upload a "
                        "PNG, JPEG or another common format.") from error


def decode_map(data: bytes, field: str) -> np.ndarray:
  """An uploaded mask or scribble's bytes -> its array as stored (nonzero = in, as `predict.load_mask` reads)."""
  try:
    with Image.open(io.BytesIO(data)) as opened:
      _check_pixels(opened, field)
      return np.asarray(opened)
  # Pillow raises ValueError on some broken headers too (e.g. a PPM whose size is not a number).
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise BadInput(400, f"{field}: the upload is not an image this server can read ({_why(error)}); upload a "
                        "binary PNG of the reference image's size.") from error


def _why(error: Exception) -> str:
  # Pillow's message for an unknown format names the in-memory buffer, which says nothing to the client.
  return "not a known image format" if isinstance(error, UnidentifiedImageError) else str(error)


def _check_pixels(opened: Image.Image, field: str) -> None:
  # The header gives the size before anything is decoded.
  if opened.width * opened.height > MAX_PIXELS:
    raise BadInput(413, f"{field}: {opened.width}x{opened.height} pixels is more than the {MAX_PIXELS:,} this "
                        "server decodes; downscale it.")


def parse_box(value: str, size: tuple[int, int]) -> tuple[float, ...]:
  """"x0,y0,x1,y1" -> four floats, checked to lie inside an image of `size` = (H, W)."""
  try:
    box = tuple(float(part) for part in value.split(","))
  except ValueError:
    box = ()
  if len(box) != 4 or not all(math.isfinite(number) for number in box):
    raise BadInput(400, f"ref_box: give four numbers x0,y0,x1,y1 in pixels of the reference image; got {value!r}.")
  try:
    predict.box_map(box, size, "ref_box")
  except ValueError as error:
    raise BadInput(400, str(error)) from error
  return box


async def read_form(request: Any, max_bytes: int) -> Any:
  """The request's form (multipart; url-encoded is read too), its body read at most `max_bytes` far: refused on
  the declared Content-Length before reading, and while reading when the client sends it chunked."""
  from starlette.exceptions import HTTPException  # pylint: disable=g-import-not-at-top
  from starlette.formparsers import MultiPartException  # pylint: disable=g-import-not-at-top
  from starlette.requests import ClientDisconnect, Request  # pylint: disable=g-import-not-at-top

  content_type = request.headers.get("content-type", "")
  # A url-encoded form carries no file, but parsing it lets the answer say which field is missing.
  if content_type.split(";")[0].strip().lower() not in ("multipart/form-data", "application/x-www-form-urlencoded"):
    raise BadInput(415, f"Content-Type: send a multipart/form-data form (the fields {', '.join(FIELDS)}); got "
                        f"{content_type or 'none'!r}.")
  limit = f"the {max_bytes / 2**20:g} MB this server accepts (--max-upload-mb)"
  declared = request.headers.get("content-length")
  if declared is not None:
    if not declared.strip().isdigit():
      raise BadInput(400, f"Content-Length: {declared!r} is not a byte count.")
    if int(declared) > max_bytes:
      raise BadInput(413, f"upload: the request is {int(declared) / 2**20:.1f} MB, more than {limit}.")
  chunks, received = [], 0
  try:
    async for chunk in request.stream():
      received += len(chunk)
      if received > max_bytes:
        raise BadInput(413, f"upload: the request is more than {limit}.")
      chunks.append(chunk)
  except ClientDisconnect as error:
    raise BadInput(400, "upload: the client closed the connection before the request ended.") from error
  body = b"".join(chunks)
  boundary = re.search(r'boundary="?([^";]+)"?', content_type)
  # Starlette's parser drops a file part that has no closing boundary, so a cut-short upload would read as a
  # missing field: say what happened instead.
  if boundary and not body.rstrip(b"\r\n").endswith(b"--" + boundary.group(1).encode("latin-1") + b"--"):
    raise BadInput(400, "form: the multipart body is cut short (it does not end with its closing boundary); send "
                        "the whole request again.")

  async def replay() -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": False}

  # The form parser reads the body again from a request that replays what was read.
  try:
    return await Request(request.scope, replay).form(max_files=len(FILE_FIELDS) + 1, max_fields=len(FIELDS) + 1,
                                                     max_part_size=64 * 1024)
  except HTTPException as error:
    raise BadInput(400, f"form: the multipart body is malformed ({error.detail}).") from error
  except MultiPartException as error:
    raise BadInput(400, f"form: the multipart body is malformed ({error.message}).") from error


async def parse_request(form: Any) -> tuple[np.ndarray, predict.Prompt, str, str | None]:
  """A form -> (target image, prompt, label, the target's file name); BadInput names the field at fault."""
  from starlette.datastructures import UploadFile  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(form.keys()) - set(FIELDS))
  if unknown:
    raise BadInput(400, f"form: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}.")
  values: dict[str, Any] = {}
  for name in FIELDS:
    given = form.getlist(name)
    if len(given) > 1:
      raise BadInput(400, f"{name}: given {len(given)} times; give it once.")
    value = given[0] if given else None
    if name in FILE_FIELDS and isinstance(value, str) and not value:
      value = None  # an HTML form's file input left empty (sent as an empty part without a file name)
    if name in FILE_FIELDS and value is not None:
      if not isinstance(value, UploadFile):
        raise BadInput(400, f"{name}: must be a file upload, not a text field.")
      content = (value.content_type or "").split(";")[0].strip().lower()
      if not (content.startswith("image/") or content in _GENERIC_TYPES):
        raise BadInput(415, f"{name}: content type {content!r} is not an image type; upload image/png, "
                            "image/jpeg or another image.")
      data = await value.read()
      if not data:
        raise BadInput(400, f"{name}: the uploaded file {value.filename!r} is empty.")
      value = (data, value.filename)
    elif value is not None:
      if isinstance(value, UploadFile):
        raise BadInput(400, f"{name}: must be a text field, not a file upload.")
      value = value.strip() or None  # an empty text field counts as not given
    values[name] = value

  if values["image"] is None:
    raise BadInput(400, "image: missing; upload the target image as the file field `image`.")
  spatial = [name for name in SPATIAL_FIELDS if values[name] is not None]
  if values["text"] is None and values["ref_image"] is None:
    raise BadInput(400, "prompt: none given; send `text`, or `ref_image` with one of ref_box, ref_mask, "
                        "ref_scribble, or both.")
  if values["ref_image"] is None and spatial:
    raise BadInput(400, f"ref_image: missing; {spatial[0]} is drawn on a reference image, upload it as `ref_image`.")
  if values["ref_image"] is not None and len(spatial) != 1:
    raise BadInput(400, f"{'/'.join(SPATIAL_FIELDS)}: give exactly one with ref_image; got "
                        f"{', '.join(spatial) or 'none'}.")

  data, filename = values["image"]
  image = decode_image(data, "image")
  prompt = predict.Prompt(text=values["text"])
  if values["ref_image"] is not None:
    prompt.ref_image = decode_image(values["ref_image"][0], "ref_image")
    size = prompt.ref_image.shape[:2]
    name = spatial[0]
    if name == "ref_box":
      prompt.ref_box = parse_box(values["ref_box"], size)
    else:
      try:
        binary = predict.load_mask(decode_map(values[name][0], name), size, name)
      except ValueError as error:
        raise BadInput(400, str(error)) from error
      setattr(prompt, name, binary)
  label = prompt_label(prompt.text, spatial[0].removeprefix("ref_") if spatial else None)
  return image, prompt, label, filename


class _AnyMethod:
  """An endpoint as an ASGI app, which Starlette routes every method to: it routes a function endpoint only for the
  methods listed, and another method (PROPFIND, ...) would fall through to the UI mounted at `/`."""

  def __init__(self, endpoint: Any):
    self.endpoint = endpoint

  async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
    from starlette.requests import Request  # pylint: disable=g-import-not-at-top
    response = await self.endpoint(Request(scope, receive, send))
    await response(scope, receive, send)


def create_app(predictor: predict.Predictor, max_upload_mb: float = 10.0) -> fastapi.FastAPI:
  """The FastAPI app: `POST /api/predict` and the gradio UI mounted at `/` (module docstring)."""
  import fastapi  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import gradio as gr  # pylint: disable=g-import-not-at-top
  from fastapi.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top

  segmenter = Segmenter(predictor)
  max_bytes = int(max_upload_mb * 2**20)
  app = fastapi.FastAPI(title="OmniRIS", docs_url=None, redoc_url=None, openapi_url=None)

  async def api_predict(request):
    if request.method != "POST":
      return JSONResponse({"error": f"method: {request.method} is not served here; POST a multipart form."},
                          status_code=405, headers={"Allow": "POST"})
    form = None
    try:
      form = await read_form(request, max_bytes)
      image, prompt, label, filename = await parse_request(form)
      # The model runs in a worker thread; the segmenter's lock queues concurrent requests.
      prediction, png = await run_in_threadpool(segmenter.segment, image, prompt, label)
      payload = predict.prediction_json(prediction, [label], filename)
      payload["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
    except BadInput as error:
      return JSONResponse({"error": str(error)}, status_code=error.status)
    except Exception:  # pylint: disable=broad-except
      # parse_request checks everything the predictor checks, so a failure past it is the server's own.
      _log.exception("POST /api/predict failed")
      return JSONResponse({"error": "server: internal error; see the server's log."}, status_code=500)
    finally:
      if form is not None:
        await form.close()
    return JSONResponse(payload)

  async def api_unknown(request):
    return JSONResponse({"error": f"path: {request.url.path} is not served; the API is POST /api/predict."},
                        status_code=404)

  # Plain Starlette routes: the endpoint reads the body itself (size limit) instead of FastAPI's form binding.
  # They take every method, and every other path under /api answers 404 here, so that no request under /api falls
  # through to the UI mounted at / (whose answers are not the API's JSON).
  app.add_route("/api/predict", _AnyMethod(api_predict))
  app.add_route("/api", _AnyMethod(api_unknown))
  app.add_route("/api/{rest:path}", _AnyMethod(api_unknown))

  demo = build_ui(segmenter)
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                            font_mono=["ui-monospace", "monospace"])  # local fonts: the page needs no network
  return gr.mount_gradio_app(app, demo, path="/", max_file_size=max_bytes, theme=theme, ssr_mode=False,
                             run_history=False, footer_links=["settings"])


# ===============================================================================================================
# The browser UI
# ===============================================================================================================


def read_drawing(value: dict[str, Any] | None, read_as: str) -> tuple[np.ndarray | None, str | None, Any]:
  """The reference editor's value -> (reference image, 'mask' | 'scribble' | 'box', the spatial prompt); all
  None when no reference image is given. The painted pixels are those any layer covers (alpha > 0); a box is
  their bounding box."""
  background = value.get("background") if value else None
  layers = [np.asarray(layer) for layer in (value.get("layers") or [])] if value else []
  painted = None
  for layer in layers:
    covered = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else np.asarray(layer).any(-1)
    painted = covered if painted is None else painted | covered
  if background is None:
    if painted is not None and painted.any():
      raise ValueError("Reference image: upload the reference image first, then paint over the referent on it.")
    return None, None, None
  reference = predict.load_image(np.asarray(background), "Reference image")
  height, width = reference.shape[:2]
  if painted is None or not painted.any():
    raise ValueError("Reference drawing: nothing is painted; paint over the referent with the brush, or clear "
                     "the reference image to use text only.")
  if painted.shape != (height, width):  # the editor's canvas may differ from the image's own size
    painted = np.asarray(Image.fromarray(painted).resize((width, height), Image.Resampling.NEAREST))
  if read_as == "box":
    rows, columns = np.nonzero(painted)
    return reference, "box", (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
  if read_as not in ("mask", "scribble"):
    raise ValueError(f"Read the drawing as: {read_as!r} is not one of mask, scribble, box.")
  return reference, read_as, painted


def build_ui(segmenter: Segmenter) -> Any:
  """The gradio Blocks: target, text, reference editor and how to read its drawing -> overlay and verdict."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  import gradio as gr  # pylint: disable=g-import-not-at-top

  def run(target: str | None, text: str | None, reference: dict[str, Any] | None, read_as: str):
    if target is None:
      raise gr.Error("Target image: upload the image to segment in.")
    text = (text or "").strip() or None
    try:
      ref_image, spatial, value = read_drawing(reference, read_as)
      if text is None and ref_image is None:
        raise ValueError("Prompt: type a text prompt, or upload a reference image and paint over the referent, "
                         "or both.")
      image = predict.load_image(target, "Target image")
    except (ValueError, FileNotFoundError) as error:
      raise gr.Error(str(error)) from error
    prompt = predict.Prompt(text=text, ref_image=ref_image)
    if spatial is not None:
      setattr(prompt, f"ref_{spatial}", value)
    # Past the checks above a failure is the server's own: gradio logs it and reports an error.
    label = prompt_label(text, spatial)
    try:
      prediction, png = segmenter.segment(image, prompt, label)
    except BadInput as error:
      raise gr.Error(str(error)) from error
    return Image.open(io.BytesIO(png)), verdict(prediction, label)

  with gr.Blocks(title="OmniRIS: segment what a prompt refers to") as demo:
    gr.Markdown("## Omni-Referring Image Segmentation\nUpload a target image, then type what to segment and/or "
                "upload a reference image and paint over the referent with the brush. Submit to see the mask.")
    with gr.Row():
      with gr.Column():
        target = gr.Image(label="Target image", type="filepath", sources=["upload", "clipboard"], elem_id="target")
        text = gr.Textbox(label="Text prompt (optional)", placeholder="e.g. the purple cross", elem_id="text")
      with gr.Column():
        reference = gr.ImageEditor(
            label="Reference image (optional): paint over the referent", type="numpy", image_mode="RGBA",
            sources=["upload", "clipboard"], transforms=[], layers=False, format="png", elem_id="reference",
            brush=gr.Brush(colors=[("#ff0040", 0.6)], color_mode="fixed", default_size="auto"))
        read_as = gr.Radio(["mask", "scribble", "box"], value="scribble", label="Read the drawing as",
                           info="mask / scribble: the painted pixels; box: their bounding box", elem_id="read_as")
    submit = gr.Button("Submit", variant="primary", elem_id="submit")
    with gr.Row():
      overlay = gr.Image(label="Overlay", type="pil", interactive=False, format="png", elem_id="overlay")
      answer = gr.Textbox(label="Verdict", interactive=False, elem_id="verdict")
    submit.click(run, [target, text, reference, read_as], [overlay, answer], api_name="segment")
  # One request at a time reaches the model; the others wait in gradio's queue.
  demo.queue(default_concurrency_limit=1, max_size=32)
  return demo


# ===============================================================================================================
# CLI
# ===============================================================================================================


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m omniris_jax.serve",
                                   description="Serve a trained model: a browser demo at / and POST /api/predict.")
  parser.add_argument("--workdir", required=True, help="a trained workdir, e.g. workdir/demo")
  parser.add_argument("--stage", default=None, help="the stage to load (default: the last trained one)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="the address to bind (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
  parser.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
  parser.add_argument("--max-upload-mb", type=float, default=10.0,
                      help="the largest request / uploaded file in MB (default 10)")
  args = parser.parse_args(argv)
  if args.max_upload_mb <= 0:
    parser.error("--max-upload-mb must be positive")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    print(f"error: the browser demo needs gradio ({error}); install it with: {_SERVE_HINT}", file=sys.stderr)
    return 2
  try:
    predictor = predict.Predictor.from_workdir(args.workdir, args.stage)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  app = create_app(predictor, max_upload_mb=args.max_upload_mb)
  host = f"[{args.host}]" if ":" in args.host else args.host
  print(f"Serving the OmniRIS demo at http://{host}:{args.port}/ (API: POST http://{host}:{args.port}/api/predict);"
        " Ctrl+C stops it.", flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0


if __name__ == "__main__":
  sys.exit(main())
