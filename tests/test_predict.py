"""The predictor, its CLI and its export, on the tiny model of `tiny_workdir` (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from omniris_jax import export, predict

import tiny_config  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(REPO, "examples", "shapes_target.png")
REFERENCE = os.path.join(REPO, "examples", "shapes_reference.png")
REFERENCE_MASK = os.path.join(REPO, "examples", "shapes_reference_mask.png")
REFERENCE_BOX = (70, 62, 103, 94)


@pytest.fixture(scope="module")
def predictor(tiny_workdir):
  return predict.Predictor.from_workdir(str(tiny_workdir))


def _odd_image(mode: str = "RGBA") -> Image.Image:
  """A 100 x 70 crop of the shapes target in another mode: the predictor must not care about size or mode."""
  return Image.open(TARGET).crop((10, 20, 110, 90)).convert(mode)


def test_a_second_prompt_on_the_same_image_compiles_nothing(predictor):
  predictor.set_image(TARGET)
  predictor.predict(text="the purple cross")
  compiled = predictor.compiled_programs()
  predictor.predict(text="the orange star")  # another prompt: the decoder for one text prompt is compiled
  predictor.set_image(_odd_image())  # another image of another size: the encoder sees the same input shape
  predictor.predict(text="every cross")
  assert predictor.compiled_programs() == compiled
  predictor.predict(text=["the blue cross", "the star"])  # two prompts: a new bucket, once
  two = predictor.compiled_programs()
  assert two == compiled + 1
  predictor.predict(text=["a", "b"])
  assert predictor.compiled_programs() == two


def test_masks_come_back_at_the_image_size_and_equal_the_full_forward(predictor):
  image = _odd_image("RGB")
  predictor.set_image(image)
  result = predictor.predict(text="the purple cross", return_logits=True)
  assert result.masks.shape == (1, 70, 100) and result.union.shape == (70, 100)
  assert result.mask_logits.shape[0] == 1 and 0.0 <= result.no_target_prob[0] <= 1.0
  # The same prompt through the model's own full forward on the same preprocessed inputs.
  resized = predict.resize_square(np.asarray(image), predictor.resolution, bilinear=True)[None]
  ids, mask = predictor.tokenizer.encode("the purple cross", predictor.max_text_len)
  with jax.set_mesh(predictor.mesh), nn.logical_axis_rules(predictor.rules):
    outputs = jax.jit(lambda p: predictor.model.apply({"params": p}, jnp.asarray(resized),
                                                      text_ids=jnp.asarray(ids[None]),
                                                      text_attention_mask=jnp.asarray(mask[None])))(predictor.params)
  np.testing.assert_allclose(result.mask_logits, np.asarray(outputs["mask_logits"]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(result.nt_logits, np.asarray(outputs["nt_logits"]), atol=1e-4, rtol=1e-4)


def test_a_batch_of_prompts_answers_each_as_alone(predictor):
  predictor.set_image(TARGET)
  prompts = [predict.Prompt(text="the purple cross"),
             predict.Prompt(ref_image=REFERENCE, ref_mask=REFERENCE_MASK),
             predict.Prompt(text="the purple cross", ref_image=REFERENCE, ref_box=REFERENCE_BOX)]
  together = predictor.predict(prompts=prompts, return_logits=True)
  assert together.masks.shape == (3, 128, 128)
  np.testing.assert_array_equal(together.union, together.masks.any(axis=0))
  for index, prompt in enumerate(prompts):
    alone = predictor.predict(prompts=[prompt], return_logits=True)
    np.testing.assert_allclose(together.mask_logits[index], alone.mask_logits[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(together.nt_logits[index], alone.nt_logits[0], atol=1e-4, rtol=1e-4)
  # Keyword lists are the same prompts.
  listed = predictor.predict(text=["the purple cross", None], ref_image=[None, REFERENCE],
                             ref_mask=[None, REFERENCE_MASK], return_logits=True)
  np.testing.assert_allclose(listed.mask_logits, together.mask_logits[:2], atol=1e-4, rtol=1e-4)
  boxes = predictor.predict(ref_image=[REFERENCE, REFERENCE], ref_box=np.array([REFERENCE_BOX, (0, 0, 64, 64)]))
  assert boxes.masks.shape == (2, 128, 128)  # a (K, 4) array is K boxes


def test_masks_read_alpha_drawings_colour_and_exif_like_their_image(tmp_path):
  drawing = np.zeros((4, 5, 4), np.uint8)
  drawing[1:3, 2:4, 3] = 255  # painted on a transparent layer, colour left black
  expected = np.zeros((4, 5), bool)
  expected[1:3, 2:4] = True
  np.testing.assert_array_equal(predict.load_mask(drawing, (4, 5), "m"), expected)
  opaque = np.zeros((4, 5, 4), np.uint8)
  opaque[..., 3] = 255
  opaque[1:3, 2:4, 0] = 200  # an opaque RGBA mask: the colour says what is in
  np.testing.assert_array_equal(predict.load_mask(opaque, (4, 5), "m"), expected)
  exif = Image.Exif()
  exif[0x0112] = 6  # shown rotated: a 5-wide, 4-tall file is a 4-wide, 5-tall mask
  Image.fromarray(expected.astype(np.uint8) * 255).save(tmp_path / "m.jpg", exif=exif, quality=100)
  assert predict.load_mask(str(tmp_path / "m.jpg"), (5, 4), "m").shape == (5, 4)


def test_a_reference_box_is_the_filled_box_of_its_pixels():
  box = predict.box_map((1.5, 2, 4, 3.2), (5, 6))
  expected = np.zeros((5, 6), bool)
  expected[2:4, 1:4] = True
  np.testing.assert_array_equal(box, expected)


def test_images_of_any_mode_and_exif_rotation_load_as_rgb(tmp_path):
  for mode in ("RGB", "RGBA", "L", "P", "I;16"):
    array = predict.load_image(_odd_image(mode if mode != "I;16" else "L").convert(mode), mode)
    assert array.shape == (70, 100, 3) and array.dtype == np.uint8, mode
  # A JPEG whose EXIF says "rotate 90 degrees clockwise to display": loaded as displayed, 70 wide, 100 tall.
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "rotated.jpg"
  _odd_image("RGB").save(path, exif=exif)
  assert predict.load_image(str(path)).shape == (100, 70, 3)
  assert predict.load_image(np.zeros((5, 7), np.float32)).shape == (5, 7, 3)


@pytest.mark.parametrize("prompt, message", [
    (predict.Prompt(), "neither text nor a reference image"),
    (predict.Prompt(text="  "), "the text is empty"),
    (predict.Prompt(ref_image=REFERENCE), "needs exactly one of ref_mask, ref_box, ref_scribble"),
    (predict.Prompt(ref_image=REFERENCE, ref_box=(0, 0, 200, 10)), r"ref_box: .* inside the 128x128 reference"),
    (predict.Prompt(ref_image=REFERENCE, ref_box=(5, 5, 5, 9)), r"0 <= x0 < x1"),
    (predict.Prompt(ref_image=REFERENCE, ref_mask=np.zeros((128, 128))), "ref_mask: is empty"),
    (predict.Prompt(ref_image=REFERENCE, ref_scribble=np.ones((64, 64))), "ref_scribble: is 64x64 but the reference"),
    (predict.Prompt(ref_image=REFERENCE, ref_box=(1, 1, 9, 9), ref_mask=REFERENCE_MASK), "one spatial prompt"),
])
def test_bad_prompts_are_refused_naming_what_is_wrong(predictor, prompt, message):
  predictor.set_image(TARGET)
  with pytest.raises(ValueError, match=message):
    predictor.predict(prompts=[prompt])


def test_bad_images_and_workdirs_are_refused_naming_them(predictor, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png at all")
  with pytest.raises(ValueError, match="broken.png' is not an image"):
    predictor.set_image(str(broken))
  with pytest.raises(FileNotFoundError, match="no file"):
    predictor.set_image(str(tmp_path / "missing.jpg"))
  with pytest.raises(ValueError, match="the image is empty"):
    predictor.set_image(np.zeros((0, 5, 3), np.uint8))
  predictor.set_image(TARGET)
  with pytest.raises(ValueError, match="prompt 0: ref_image: .* is not an image"):
    predictor.predict(ref_image=str(broken), ref_box=(0, 0, 1, 1))
  (tmp_path / "empty" / "alignment" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="holds no trained stage"):
    predict.Predictor.from_workdir(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.Predictor.from_workdir(str(tmp_path / "nowhere"))


def _run_cli(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=tiny_config.TINY_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, "-m", "omniris_jax.predict", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_the_cli_writes_an_overlay_and_coco_rle_json_for_an_image_and_a_folder(tiny_workdir, tmp_path):
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  Image.open(TARGET).save(folder / "a.png")
  _odd_image("L").save(folder / "b.jpg")
  result = _run_cli("--workdir", str(tiny_workdir), "--image", TARGET, "--text", "the purple cross",
                    "--ref-image", REFERENCE, "--ref-box", ",".join(map(str, REFERENCE_BOX)),
                    "--out", str(tmp_path / "overlay.png"), "--json", str(tmp_path / "result.json"))
  assert result.returncode == 0, result.stderr[-3000:]
  overlay = Image.open(tmp_path / "overlay.png")
  assert overlay.width == 512 and overlay.height > 512  # the 128-px image enlarged 4x, then the legend
  payload = json.loads((tmp_path / "result.json").read_text())
  assert payload["height"] == payload["width"] == 128 and len(payload["prompts"]) == 1
  decoded = mask_utils.decode({"size": payload["union"]["size"], "counts": payload["union"]["counts"].encode()})
  assert decoded.shape == (128, 128) and int(decoded.sum()) == payload["prompts"][0]["area"]
  result = _run_cli("--workdir", str(tiny_workdir), "--image", str(folder), "--text", "the star",
                    "--out", str(tmp_path / "overlays"), "--json", str(tmp_path / "jsons"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2/2 images" in result.stdout
  assert sorted(os.listdir(tmp_path / "overlays")) == ["a.png", "b.png"]
  assert sorted(os.listdir(tmp_path / "jsons")) == ["a.json", "b.json"]
  assert json.loads((tmp_path / "jsons" / "b.json").read_text())["height"] == 70


def test_the_cli_names_bad_input_and_writes_nothing(tiny_workdir, tmp_path):
  out = tmp_path / "overlay.png"
  result = _run_cli("--workdir", str(tiny_workdir), "--image", TARGET, "--ref-image", REFERENCE,
                    "--ref-box", "0,0,500,10", "--out", str(out))
  assert result.returncode == 2 and "--ref-box" in result.stderr and "inside the 128x128" in result.stderr
  result = _run_cli("--workdir", str(tiny_workdir), "--image", TARGET, "--out", str(out))
  assert result.returncode == 2 and "give a prompt" in result.stderr
  result = _run_cli("--workdir", str(tmp_path / "none"), "--image", TARGET, "--text", "x", "--out", str(out))
  assert result.returncode == 2 and "does not exist" in result.stderr
  assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_the_exported_halves_reload_without_the_model_and_give_the_same_masks(predictor, tmp_path):
  export.export_predictor(predictor, str(tmp_path / "exported"), num_prompts=2)
  loaded = export.ExportedPredictor(str(tmp_path / "exported"))
  prompts = [predict.Prompt(text="the purple cross"),
             predict.Prompt(text="the star", ref_image=REFERENCE, ref_mask=REFERENCE_MASK)]
  predictor.set_image(TARGET)
  expected = predictor.predict(prompts=prompts, return_logits=True)
  loaded.set_image(TARGET)
  got = loaded.predict(prompts)
  np.testing.assert_allclose(got.no_target_prob, expected.no_target_prob, atol=1e-5)
  assert (got.masks != expected.masks).mean() < 1e-3  # argmax ties at rounding level may flip a pixel or two
  with pytest.raises(ValueError, match="give 1 to 2 prompts"):
    loaded.predict(prompts * 2)
  # The loaded functions are jax.export artifacts: no omniris_jax.models import is needed to call them.
  child = ("import sys; from omniris_jax import export; p = export.ExportedPredictor(sys.argv[1]); "
           "p.set_image(sys.argv[2]); p.predict([__import__('omniris_jax.predict').predict.Prompt(text='x')]); "
           "print(sorted(m for m in sys.modules if m.startswith('omniris_jax.models')))")
  result = subprocess.run([sys.executable, "-c", child, str(tmp_path / "exported"), TARGET], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"




def test_no_target_is_the_model_s_call_and_an_empty_mask_is_said_apart():
  empty = np.zeros((2, 4, 4), bool)
  painted = empty.copy()
  painted[1, :2, :2] = True
  believed = predict.Prediction(empty, empty.any(axis=0), np.array([0.2, 0.9]))
  assert not believed.no_target and believed.prompt_no_target.tolist() == [False, True]
  assert predict.verdict(believed, 0).startswith("an empty mask (p(no target) 0.20)")
  assert predict.verdict(believed, 1).startswith("no target (p(no target) 0.90)")
  assert predict.Prediction(empty, empty[0], np.array([0.6, 0.9])).no_target
  found = predict.Prediction(painted, painted.any(axis=0), np.array([0.1, 0.3]))
  assert predict.verdict(found, 1) == "4 pixels, 25.0% of the image (p(no target) 0.30)"
  payload = predict.prediction_json(believed, ["a", "b"], None)
  assert [p["no_target"] for p in payload["prompts"]] == [False, True] and payload["no_target"] is False
