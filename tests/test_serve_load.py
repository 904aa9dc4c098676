"""The HTTP API under load and under fuzzed requests (`python -m omniris_jax.serve`).

  .venv/bin/python -m pytest -q -s tests/test_serve_load.py   # -s shows the measured figures

The two HTTP tests use test_serve's `server_url` fixture: one real uvicorn server on 127.0.0.1 (a free port) in a background
thread of this process, serving the tiny trained model.

- test_concurrent_clients_bounded_memory: CLIENTS threads, each with its own connection, post valid requests (text,
  visual with box / mask / scribble, omni) for LOAD_SECONDS (env OMNIRIS_LOAD_SECONDS, default 20). Every answer
  must be a 200 with well-formed JSON, and the process's resident memory may grow at most RSS_GROWTH_BOUND_MB from
  after a concurrent warm-up to the end. The server shares the process with the clients, so the figure bounds the
  server's growth from above. It prints requests/s, latencies and RSS.
- test_fuzzed_requests_never_5xx: hypothesis generates malformed and odd requests (random and repeated fields,
  wrong types, tiny / huge / non-image / odd-mode files, boxes with NaN / negative / huge numbers, empty and
  unicode text, raw and truncated bodies, wrong methods and paths). Every answer must be a 2xx, or a 4xx whose JSON
  `error` says which field or part is wrong. FUZZ_EXAMPLES (env OMNIRIS_FUZZ_EXAMPLES) bounds the run; the
  examples are derandomized so CI sees the same set each time (set OMNIRIS_FUZZ_RANDOM=1 to explore new ones).
- test_decoders_refuse_broken_files_naming_the_field: in-process, files with header bytes changed or cut short
  decode or raise serve.BadInput naming the field (the HTTP fuzz rarely breaks a header just so).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import statistics
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the browser demo needs gradio: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis: pip install -e '.[test]'")
from hypothesis import strategies as st  # noqa: E402  pylint: disable=g-import-not-at-top

# The server fixture and request helpers of the API tests (the fixture is module-scoped: this module gets its own).
from test_serve import MAX_UPLOAD_MB, REFERENCE, REFERENCE_MASK, TARGET, server_url  # noqa: E402,F401
from test_serve import _file, _png  # noqa: E402  pylint: disable=g-import-not-at-top

from omniris_jax import serve  # noqa: E402  pylint: disable=g-import-not-at-top

CLIENTS = 8
LOAD_SECONDS = float(os.environ.get("OMNIRIS_LOAD_SECONDS", "20"))
RSS_GROWTH_BOUND_MB = 50  # measured: +4 to +7 MiB over 20 s at ~45 requests/s on 2 CPU cores
FUZZ_EXAMPLES = int(os.environ.get("OMNIRIS_FUZZ_EXAMPLES", "150"))


def _rss_mb() -> float:
  """This process's resident set size in MiB (Linux /proc; psutil elsewhere)."""
  try:
    with open(f"/proc/{os.getpid()}/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import psutil  # pylint: disable=g-import-not-at-top
  return psutil.Process().memory_info().rss / 2**20


# ===============================================================================================================
# Load
# ===============================================================================================================

_WIDE_TARGET = _png(np.asarray(Image.open(TARGET).convert("RGB").resize((200, 150))))
_SCRIBBLE = np.zeros((128, 128), np.uint8)
_SCRIBBLE[70:90, 75:80] = 255
_REQUESTS = {
    # name: (form fields, files, (height, width) of the answer, a part of the prompt's label)
    "text": ({"text": "the purple cross"}, {"image": _file(TARGET)}, (128, 128), "'the purple cross'"),
    "text_wide": ({"text": "a red circle"}, {"image": ("wide.png", _WIDE_TARGET, "image/png")}, (150, 200),
                  "'a red circle'"),
    "box": ({"ref_box": "70,62,103,94"}, {"image": _file(TARGET), "ref_image": _file(REFERENCE)}, (128, 128),
            "visual prompt (box)"),
    "mask": ({}, {"image": _file(TARGET), "ref_image": _file(REFERENCE), "ref_mask": _file(REFERENCE_MASK)},
             (128, 128), "visual prompt (mask)"),
    "scribble": ({}, {"image": ("wide.png", _WIDE_TARGET, "image/png"), "ref_image": _file(REFERENCE),
                      "ref_scribble": ("s.png", _png(_SCRIBBLE), "image/png")}, (150, 200),
                 "visual prompt (scribble)"),
    "omni_box": ({"text": "the purple cross", "ref_box": "70.5,62,103,94.25"},
                 {"image": _file(TARGET), "ref_image": _file(REFERENCE)}, (128, 128),
                 "'the purple cross' + visual prompt (box)"),
    "omni_mask": ({"text": "the purple cross"},
                  {"image": _file(TARGET), "ref_image": _file(REFERENCE), "ref_mask": _file(REFERENCE_MASK)},
                  (128, 128), "'the purple cross' + visual prompt (mask)"),
}
_KINDS = sorted(_REQUESTS)


def _post_and_check(http, kind: str) -> None:
  """Posts the request `kind` and checks the answer is a 200 with well-formed prediction JSON."""
  data, files, (height, width), label = _REQUESTS[kind]
  response = http.post("/api/predict", data=data, files=files)
  assert response.status_code == 200, f"{kind}: {response.status_code} {response.text[:500]}"
  assert response.headers["content-type"].startswith("application/json"), (kind, response.headers)
  payload = response.json()
  assert (payload["height"], payload["width"]) == (height, width), kind
  assert payload["union"]["size"] == [height, width] and isinstance(payload["union"]["counts"], str), kind
  assert isinstance(payload["no_target"], bool), kind
  [prompt] = payload["prompts"]
  assert label in prompt["prompt"], (kind, prompt["prompt"])
  assert 0.0 <= prompt["no_target_prob"] <= 1.0 and 0 <= prompt["area"] <= height * width, (kind, prompt)
  assert prompt["mask"]["size"] == [height, width], kind
  assert base64.b64decode(payload["overlay_png_base64"], validate=True).startswith(b"\x89PNG\r\n\x1a\n"), kind


def _hammer(url: str, seconds: float, latencies: list[float], failures: list[str], start: threading.Barrier,
            offset: int) -> None:
  """One client: its own connection, posting the request kinds in turn until `seconds` have passed."""
  with httpx.Client(base_url=url, timeout=120) as http:
    start.wait()
    deadline = time.monotonic() + seconds
    index = offset
    while time.monotonic() < deadline and not failures:
      kind = _KINDS[index % len(_KINDS)]
      index += 1
      began = time.monotonic()
      try:
        _post_and_check(http, kind)
      except Exception as error:  # pylint: disable=broad-except
        failures.append(f"{kind}: {type(error).__name__}: {error}")
        return
      latencies.append(time.monotonic() - began)


def _load(url: str, seconds: float) -> tuple[list[float], list[str], float]:
  """CLIENTS concurrent clients for `seconds`: (per-request latencies, failures, wall seconds)."""
  latencies: list[float] = []
  failures: list[str] = []
  barrier = threading.Barrier(CLIENTS + 1)
  threads = [threading.Thread(target=_hammer, args=(url, seconds, latencies, failures, barrier, offset),
                              daemon=True) for offset in range(CLIENTS)]
  for thread in threads:
    thread.start()
  barrier.wait()
  began = time.monotonic()
  for thread in threads:
    thread.join(timeout=seconds + 180)
    assert not thread.is_alive(), "a client hung"
  return latencies, failures, time.monotonic() - began


def test_concurrent_clients_bounded_memory(server_url):  # noqa: F811  (the fixture imported above)
  # Warm-up: every request kind once (compiles each program), then a short concurrent burst, so that the
  # allocator's per-thread arenas and the connection pools exist before the first measurement.
  with httpx.Client(base_url=server_url, timeout=120) as http:
    for kind in _KINDS:
      _post_and_check(http, kind)
  _, failures, _ = _load(server_url, 3)
  assert not failures, failures
  rss_start = _rss_mb()
  samples = []

  def sample(stop: threading.Event) -> None:
    while not stop.wait(1.0):
      samples.append(_rss_mb())

  stop = threading.Event()
  sampler = threading.Thread(target=sample, args=(stop,), daemon=True)
  sampler.start()
  latencies, failures, wall = _load(server_url, LOAD_SECONDS)
  stop.set()
  sampler.join()
  rss_end = _rss_mb()
  rss_peak = max(samples + [rss_end])
  count = len(latencies)
  print(f"\nload: {CLIENTS} clients x {LOAD_SECONDS:g} s: {count} requests in {wall:.1f} s = {count / wall:.1f} "
        f"requests/s; latency median {statistics.median(latencies) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} "
        f"ms\nload: RSS {rss_start:.1f} MiB after warm-up, {rss_end:.1f} MiB at the end "
        f"({rss_end - rss_start:+.1f} MiB; peak {rss_peak:.1f} MiB; bound +{RSS_GROWTH_BOUND_MB} MiB)")
  assert not failures, failures
  assert count >= CLIENTS, f"only {count} requests answered in {wall:.1f} s"
  assert rss_end - rss_start < RSS_GROWTH_BOUND_MB, (rss_start, rss_end, samples)


# ===============================================================================================================
# Fuzz
# ===============================================================================================================


def _encoded(size: tuple[int, int], mode: str, fmt: str, fill: int = 7) -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size, fill).save(buffer, format=fmt)
  return buffer.getvalue()


def _exif_rotated() -> bytes:
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees
  buffer = io.BytesIO()
  Image.open(TARGET).convert("RGB").resize((40, 24)).save(buffer, format="JPEG", exif=exif)
  return buffer.getvalue()


_TARGET_BYTES, _REFERENCE_BYTES = TARGET.read_bytes(), REFERENCE.read_bytes()
_FILE_BODIES = [
    _TARGET_BYTES, _REFERENCE_BYTES, REFERENCE_MASK.read_bytes(), _WIDE_TARGET, _png(_SCRIBBLE),
    _png(np.zeros((128, 128), np.uint8)),  # an empty mask
    _TARGET_BYTES[:200], _TARGET_BYTES[:-20],  # truncated
    _TARGET_BYTES[:100] + bytes(range(256)) * 4,  # a PNG header, then garbage
    b"", b"\x00", b"GIF89a", b"not an image", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4\n%",
    _encoded((6000, 5000), "1", "PNG", 0),  # 30 MP in a small file: refused before decoding
    _encoded((1, 1), "RGB", "PNG"), _encoded((1, 128), "L", "PNG"), _encoded((128, 1), "RGBA", "PNG"),
    _encoded((128, 128), "1", "PNG", 1), _encoded((128, 128), "P", "PNG", 3), _encoded((128, 128), "LA", "PNG"),
    _encoded((128, 128), "I;16", "PNG", 1000), _encoded((128, 128), "I", "TIFF", 70000),
    _encoded((128, 128), "F", "TIFF", 0.5), _encoded((128, 128), "CMYK", "JPEG"), _encoded((128, 128), "RGB", "BMP"),
    _encoded((128, 128), "RGB", "GIF"), _encoded((128, 128), "RGBA", "WEBP"), _encoded((128, 128), "RGB", "TIFF"),
    _encoded((128, 128), "RGB", "ICO"), _encoded((128, 128), "L", "PPM"), _exif_rotated(),
    # Larger than the upload limit: refused while reading.
    np.random.default_rng(0).integers(0, 256, int(1.1 * MAX_UPLOAD_MB * 2**20), np.uint8).tobytes(),
]
_CONTENT_TYPES = ["image/png"] * 4 + ["image/jpeg", "application/octet-stream", "", "text/plain", "image/",
                  "application/json", "image/png; charset=utf-8", "IMAGE/PNG", "multipart/form-data"]
_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40),
                     st.integers(0, 140), st.sampled_from(["nan", "inf", "-inf", "", " ", "1e999", "0x10", "1_0"]))
_BOXES = st.one_of(
    st.lists(_NUMBERS, min_size=0, max_size=6).map(lambda numbers: ",".join(str(n) for n in numbers)),
    st.sampled_from(["70,62,103,94", " 70 , 62 , 103 , 94 ", "0,0,128,128", "94,62,70,103", "0,0,0,0",
                     "70;62;103;94", "[70, 62, 103, 94]", "-1,0,5,5", "0,0,128.0001,5"]),
    st.text(max_size=40))
_TEXTS = st.one_of(st.text(max_size=200), st.sampled_from(["", " ", "\t\n", "the purple cross", "\x00", "🟣 ✚",
                                                           "x" * 70_000, "a\r\nb", "'\"\\"]))
_FIELD_NAMES = st.one_of(st.sampled_from(serve.FIELDS), st.sampled_from(serve.FIELDS),
                         st.sampled_from(["Image", "ref-box", "texts", "", "image[]", "files"]), st.text(max_size=12))
_FILENAMES = st.one_of(st.sampled_from(["t.png", "", "a b.jpg", "../../etc/passwd"]), st.text(max_size=30))
_FILE_PARTS = st.tuples(_FILENAMES, st.sampled_from(_FILE_BODIES) | st.binary(max_size=300),
                        st.sampled_from(_CONTENT_TYPES))


def _add_part(draw, data: list, files: list, name: str) -> None:
  """Adds a fuzzed part named `name`: mostly a file for a file field and text for a text field, not always."""
  if draw(st.sampled_from([True, True, True, False])) == (name in serve.FILE_FIELDS):
    files.append((name, draw(_FILE_PARTS)))
  else:
    data.append((name, draw(_BOXES if name == "ref_box" else _TEXTS)))


@st.composite
def _forms(draw) -> tuple[list[tuple[str, str]], list[tuple[str, Any]]]:
  """A form: mostly a valid request with one part changed (an odd value in its place, or a part added, dropped or
  repeated), so that the odd part reaches the checks behind the first ones and the model; else random parts."""
  base_data, base_files, _, _ = _REQUESTS[draw(st.sampled_from(_KINDS))]
  data, files = list(base_data.items()), list(base_files.items())
  change = draw(st.sampled_from(["replace"] * 4 + ["add", "drop", "repeat", "random"]))
  if change == "random":
    data, files = [], []
    for _ in range(draw(st.integers(0, 4))):
      _add_part(draw, data, files, draw(_FIELD_NAMES))
  elif change == "add":
    _add_part(draw, data, files, draw(_FIELD_NAMES))
  else:
    name = draw(st.sampled_from([name for name, _ in data + files]))
    if change == "repeat":
      (data if name in dict(data) else files).append(next(part for part in data + files if part[0] == name))
    else:
      data = [part for part in data if part[0] != name]
      files = [part for part in files if part[0] != name]
      if change == "replace":
        _add_part(draw, data, files, name)
  return data, files


@hypothesis.settings(max_examples=300, deadline=None, database=None,
                     derandomize=not os.environ.get("OMNIRIS_FUZZ_RANDOM"))
@hypothesis.example(body=_encoded((128, 128), "L", "PPM")[:3] + b"12V 128\n255\n", field="ref_mask")
@hypothesis.given(body=st.tuples(st.sampled_from([body for body in _FILE_BODIES if 0 < len(body) < 2**20]),
                                 st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), max_size=4),
                                 st.integers(1, 2**20)).map(
                                     lambda spec: _mutated(*spec)),
                  field=st.sampled_from(["image", "ref_image", "ref_mask", "ref_scribble"]))
def test_decoders_refuse_broken_files_naming_the_field(body, field):
  """Files with bytes of their header changed or cut short decode or raise BadInput naming the field (the HTTP
  fuzz below rarely breaks a header just so; this runs in-process, hundreds of files a second)."""
  decode = serve.decode_image if field in ("image", "ref_image") else serve.decode_map
  try:
    decode(body, field)
  except serve.BadInput as error:
    assert str(error).startswith(f"{field}: ") and error.status in (400, 413), (error.status, str(error))


def _mutated(body: bytes, changes: list[tuple[int, int]], keep: int) -> bytes:
  changed = bytearray(body[:keep])
  for position, value in changes:
    if position < len(changed):
      changed[position] = value
  return bytes(changed)


def _multipart(data, files, boundary: str = "fuzz-boundary") -> bytes:
  parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
           for name, value in data]
  for name, (filename, content, content_type) in files:
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n")
  return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _grouped(data: list[tuple[str, str]]) -> dict[str, list[str]]:
  grouped: dict[str, list[str]] = {}
  for name, value in data:
    grouped.setdefault(name, []).append(value)
  return grouped


_API_PATHS = ["/api/predict"] * 24 + ["/api/predict/", "/api/Predict", "/api/predictions", "/api/", "/api",
                                     "/api/predict?text=a", "/api/predict/../predict", "/api/%00"]


@st.composite
def _requests(draw) -> dict[str, Any]:
  """A request for httpx.Client.request: method, url and a body made one of several ways."""
  method = draw(st.sampled_from(["POST"] * 24 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"]))
  request = {"method": method, "url": draw(st.sampled_from(_API_PATHS))}
  how = draw(st.sampled_from(["httpx"] * 10 + ["urlencoded", "raw_multipart", "truncated", "bytes", "json"]))
  data, files = draw(_forms())
  if how == "httpx":  # httpx's own multipart encoding (url-encoded when there are no files)
    request.update(data=_grouped(data) or None, files=files or None)
  elif how == "urlencoded":
    request.update(data=_grouped(data), headers={"Content-Type": "application/x-www-form-urlencoded"})
  elif how in ("raw_multipart", "truncated"):
    boundary = draw(st.sampled_from(["fuzz-boundary", "b", "x" * 80]))
    body = _multipart(data, files, boundary)
    if how == "truncated":
      body = body[:draw(st.integers(0, len(body)))]
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                         f"multipart/form-data; boundary={boundary}x",
                                         f'multipart/form-data; boundary="{boundary}"', "multipart/mixed"]))
    request.update(content=body, headers={"Content-Type": content_type})
  elif how == "bytes":
    content_type = draw(st.sampled_from(["multipart/form-data; boundary=b", "application/x-www-form-urlencoded",
                                         "image/png", "text/plain", ""]))
    request.update(content=draw(st.binary(max_size=500)), headers={"Content-Type": content_type})
  else:
    request.update(json={"text": draw(_TEXTS), "image": base64.b64encode(_TARGET_BYTES).decode()})
  return request


def _check_answer(request: dict[str, Any], response) -> None:
  """A 2xx, or a 4xx with a JSON `error` that starts with the field or part at fault ("<what>: ...")."""
  status = response.status_code
  assert status < 500, f"{status} {response.text[:300]}"
  assert 200 <= status < 300 or 400 <= status < 500, f"{status} {response.headers}"
  if request["method"] == "HEAD":
    return  # no body
  assert response.headers.get("content-type", "").startswith("application/json"), (status, response.headers,
                                                                                    response.text[:300])
  payload = response.json()
  if status >= 400:
    error = payload.get("error")
    assert isinstance(error, str) and re.match(r"^[^:\s][^:]*: \S", error), payload
  else:
    assert "prompts" in payload and payload["overlay_png_base64"], list(payload)


@pytest.fixture(scope="module")
def fuzz_client(server_url):  # noqa: F811  (the fixture imported above)
  with httpx.Client(base_url=server_url, timeout=120) as http:
    yield http


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                     derandomize=not os.environ.get("OMNIRIS_FUZZ_RANDOM"), print_blob=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large,
                                            hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(spec=_requests())
def test_fuzzed_requests_never_5xx(fuzz_client, spec):
  began = time.monotonic()
  response = fuzz_client.request(**spec)
  shown = {key: (value if key in ("method", "url", "headers") else "...") for key, value in spec.items()}
  hypothesis.note(f"request {json.dumps(shown)} -> {response.status_code} in {time.monotonic() - began:.2f} s: "
                  f"{response.text[:300]}")
  hypothesis.event(f"status {response.status_code}")
  _check_answer(spec, response)
