"""Every bad input a clear error: the catalogue of docs/bad_inputs.md, one case per row.

  .venv/bin/python -m pytest -q tests/test_bad_inputs.py

Each case feeds one bad input through one way in (the main command and its config, the released-OmniRef builder,
checkpoints for the predictor and `init_from`, the predictor and its CLI, the release converter, the server's
HTTP API) and asserts that the error names the thing and says what to do, that nothing half-written is left
behind, and, where there were results before, that they are untouched (byte for byte). The trained model is the
session's `tiny_workdir` (tests/conftest.py); nothing else is trained.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniris_jax import convert_release, main, predict
from test_omniref_released import _assert_nothing_left, _build, _copy_fixture, _edit_json
from test_predict import REFERENCE, TARGET, _run_cli, predictor  # noqa: F401  (predictor: a fixture)
from test_train import REPO, run_main
from tfds_omniref.omniref import released
import tiny_config  # noqa: E402  (tests/ is on sys.path under pytest)

try:  # the server's cases reuse its module's server; without gradio they are skipped, the rest still run
  from test_serve import _file, client, server_url  # noqa: F401
except pytest.skip.Exception:
  client = None


def _snapshot(folder) -> dict[str, str]:
  """Every file under `folder` (relative path -> sha256): two snapshots are equal when nothing changed."""
  folder = Path(folder)
  return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(folder.rglob("*")) if path.is_file()}


def _truncate(path, fraction: float = 0.5) -> None:
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[:int(len(data) * fraction)])


def _png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


# ===============================================================================================================
# 1. The main command: config file, overrides, mesh, batch, model (`python -m omniris_jax.main`)
# ===============================================================================================================


def _main_command(*args: str) -> subprocess.CompletedProcess:
  """The main command with its own --config (run_main fixes it to the tiny config)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "omniris_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config.input.batchsize=4"], r"--config\.input\.batchsize: config\.input has no field 'batchsize'; did you "
                                     r"mean 'batch_size'\? its fields are batch_size, "),
    (["--config.nosuch.x=1"], r"config has no field 'nosuch'; its fields are .*dataset, eval"),
    (["--config.input.batch_size=abc"], r"--config\.input\.batch_size=abc: invalid literal for int\(\).*; "
                                        r"config\.input\.batch_size is of type int \(now 4\): give an int"),
    (["--config.mesh=3"], r"config\.mesh is a group of fields \(data, fsdp, model, num_devices\): set one of them"),
    (["--config.mesh.data=3"], r"config\.mesh=\{'data': 3, 'fsdp': 1, 'model': 1\} needs 3 devices but 1 are "
                               r"available; make the product of the axes equal 1"),
    (["--config.model.preset=huge"], r"config\.model\.preset='huge' is not a ShapesOmniSegNetConfig preset "
                                     r"\(tiny_test, demo, paper, release\)"),
], ids=["unknown_field", "unknown_group", "wrong_type", "value_for_a_group", "impossible_mesh", "unknown_preset"])
def test_main_refuses_a_bad_override_with_one_line_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "work"
  result = run_main(workdir, *args, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.search(message, result.stderr), result.stderr
  assert not workdir.exists()  # checked before the data preview, the stage folder and its config.json


@pytest.mark.parametrize("spec, message", [
    ("configs/alignment.py:dmeo", r"--config=configs/alignment\.py:dmeo: Unknown config variant 'dmeo'; choose one "
                                  r"of \('', 'demo', 'demo_long', 'release'\)"),
    ("configs/nope.py", r"--config=configs/nope\.py: no such config file; give one of configs/alignment\.py"),
], ids=["unknown_variant", "missing_config_file"])
def test_main_refuses_a_bad_config_file(tmp_path, spec, message):
  result = _main_command(f"--config={spec}", f"--workdir={tmp_path / 'work'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert re.search(message, result.stderr), result.stderr
  assert not (tmp_path / "work").exists()


def _tiny(stage: str = "alignment", **fields):
  """The tiny trainer config with dotted `fields` ('mesh.data': 2) set."""
  config = tiny_config.get_config(stage)
  with config.unlocked():
    for dotted, value in fields.items():
      *parents, name = dotted.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[name] = value
  return config


@pytest.mark.parametrize("fields, error, message", [
    ({"mesh.num_devices": 2, "mesh.data": 2, "input.batch_size": 3}, ValueError,
     r"config\.input\.batch_size=3 must be a multiple of the data-parallel size 2 \(mesh data=2 x fsdp=1\); e\.g\. 4"),
    ({"mesh.num_devices": 2, "mesh.data": 2, "eval.batch_size": 5}, ValueError,
     r"config\.eval\.batch_size=5 must be a multiple of the data-parallel size 2"),
    ({"input.batch_size": 0}, ValueError, r"config\.input\.batch_size=0 must be a positive int"),
    ({"mesh.num_devices": 99}, ValueError, r"config\.mesh\.num_devices=99 but only \d+ devices are available"),
    ({"mesh.data": 2, "mesh.model": -1, "mesh.fsdp": -1}, ValueError, r"must hold positive sizes, with at most one -1"),
    ({"sharding.rules": (("batch", "pipeline"),)}, ValueError, r"\('batch', 'pipeline'\) names \['pipeline'\], not "
                                                               r"mesh axes"),
    ({"model.name": "nope"}, ValueError, r"config\.model\.name='nope': there is no module omniris_jax\.models\.nope.*; "
                                          r"use 'omnisegnet'"),
    ({"model.overrides": {"swin": {"embed_dims": 8}}}, ValueError,
     r"config\.model\.overrides\.swin: SwinConfig has no fields \['embed_dims'\]"),
    ({"dataset.name": "omniref/released", "dataset.data_dir": "/nonexistent/tfds"}, FileNotFoundError,
     r"Dataset 'omniref/released' is not built in .*python -m tfds_omniref\.build"),
], ids=["batch_not_divisible", "eval_batch_not_divisible", "zero_batch", "more_devices_than_there_are",
        "two_minus_ones", "unknown_mesh_axis", "unknown_model", "unknown_model_field", "dataset_not_built"])
def test_the_config_is_checked_before_anything_is_written(tmp_path, fields, error, message):
  with pytest.raises(error, match=message):
    main.check_config(_tiny(**fields), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


# ===============================================================================================================
# 2. Checkpoints: `init_from`, a resumed stage, `Predictor.from_workdir`
# ===============================================================================================================


@pytest.fixture
def workdir_copy(tiny_workdir, tmp_path):
  """A copy of the tiny trained workdir to break (returns it and the path of its newest checkpoint)."""
  copy = tmp_path / "copy"
  shutil.copytree(tiny_workdir, copy)
  [step_dir] = (copy / "alignment" / "checkpoints").iterdir()
  return copy, step_dir


def _largest_data_file(step_dir: Path) -> Path:
  return max((step_dir / "state" / "d").iterdir(), key=lambda path: path.stat().st_size)


def test_resuming_a_stage_with_another_preset_is_refused_and_leaves_the_workdir_untouched(workdir_copy):
  # The trainer would overwrite the stage's config.json first, then fail to restore ("delete the broken step
  # directories"); the check comes first and names the config the stage was trained with.
  workdir, _ = workdir_copy
  before = _snapshot(workdir)
  result = run_main(workdir, "--config.model.preset=demo", check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "the checkpoint stage 'alignment' resumes from, was trained with another model than this config " \
         "describes (model 'proj.shapes.omnisegnet', preset 'demo')" in result.stderr
  assert f"Run with the config it was trained with (saved in {workdir}/alignment/config.json)" in result.stderr
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("case, message", [
    ("missing_directory", r"config\.init_from='.*nowhere': '.*nowhere' holds no checkpoint\. Run the stage it names "
                          r"first, .* or set --config\.init_from=None"),
    ("untrained_stage", r"config\.init_from='visual': '.*/visual/checkpoints' holds no checkpoint"),
    ("truncated_metadata", r"config\.init_from='.*': the checkpoint .*/checkpoints/2 cannot be read "
                           r"\(JSONDecodeError: .*\); it is truncated or damaged\. Delete that step directory"),
    ("another_preset", r"config\.init_from='.*': .*/checkpoints/2 holds only \d+ of the \d+ parameter arrays of this config's "
                           r"model \(model 'proj\.shapes\.omnisegnet', preset 'demo'\): .* have another shape there "
                           r".*; point init_from at a checkpoint of this model"),
])
def test_init_from_names_the_checkpoint_and_what_to_do(workdir_copy, tmp_path, case, message):
  workdir, step_dir = workdir_copy
  fields = {"init_from": str(workdir)}
  if case == "missing_directory":
    fields["init_from"] = str(tmp_path / "nowhere")
  elif case == "untrained_stage":
    fields["init_from"] = "visual"
  elif case == "truncated_metadata":
    _truncate(step_dir / "state" / "_METADATA")
  else:
    fields["model.preset"] = "demo"
  new_workdir = workdir if case == "untrained_stage" else tmp_path / "new"
  before = _snapshot(workdir)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    main.check_config(_tiny("joint", **fields), str(new_workdir))
  assert _snapshot(workdir) == before and not (tmp_path / "new").exists()


def _edit_stage_config(workdir: Path, edit) -> None:
  path = workdir / "alignment" / "config.json"
  values = json.loads(path.read_text())
  edit(values)
  path.write_text(json.dumps(values))


@pytest.mark.parametrize("case, message", [
    ("missing_stage", r"'.*/visual/checkpoints' holds no checkpoint; train stage 'visual' first"),
    ("truncated_data_file", r"the checkpoint .*/checkpoints/2 cannot be read \(ValueError: .*\); it is truncated or "
                            r"damaged\. Delete that step directory to fall back to the one before it, or train"),
    ("truncated_metadata", r"the checkpoint .*/checkpoints/2 cannot be read \(JSONDecodeError"),
    ("state_item_deleted", r"the checkpoint .*/checkpoints/2 cannot be read \(FileNotFoundError"),
    ("truncated_config_json", r"config\.json' is not valid JSON .*; it is cut short or damaged\. Restore it .* or "
                              r"pass the config the stage was trained with"),
    ("another_model_size", r"checkpoints/2 does not hold the model that '.*/alignment/config\.json' describes \(model "
                           r"'proj\.shapes\.omnisegnet', preset 'tiny_test'\): \d+ of its \d+ parameter arrays have "
                           r"another shape there \(image_encoder/.*\)\. It was trained with another model size or "
                           r"preset; pass the config it was trained with"),
    ("another_preset", r"checkpoints/2 does not hold the model that config describes \(model "
                       r"'proj\.shapes\.omnisegnet', preset 'demo'\): .*and \d+ are absent there"),
])
def test_a_bad_checkpoint_is_named_by_the_predictor_and_left_as_it_is(workdir_copy, case, message):
  workdir, step_dir = workdir_copy
  stage, config = None, None
  if case == "missing_stage":
    stage = "visual"
  elif case == "truncated_data_file":
    _truncate(_largest_data_file(step_dir))
  elif case == "truncated_metadata":
    _truncate(step_dir / "state" / "_METADATA")
  elif case == "state_item_deleted":
    shutil.rmtree(step_dir / "state")
  elif case == "truncated_config_json":
    _truncate(workdir / "alignment" / "config.json")
  elif case == "another_model_size":
    _edit_stage_config(workdir, lambda values: values["model"]["overrides"].update(swin={"embed_dim": 8}))
  else:
    config = _tiny(**{"model.preset": "demo"})
  before = _snapshot(workdir)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    predict.Predictor.from_workdir(str(workdir), stage, config)
  assert _snapshot(workdir) == before


# ===============================================================================================================
# 3. The released-OmniRef builder's files (tfds_omniref/omniref/released.py, built from a manual directory)
# ===============================================================================================================


def _edit_refs(edit):
  return lambda manual: _edit_json(manual, "OmniRef.json", edit)


def _set_polygon(name: str, match, polygon):
  """Puts `polygon` on every annotation of `name` (instances.json or SuppImageAnns.json) for which `match` holds."""
  def edit(value):
    records = ([ann for coco in value.values() for ann in coco["annotations"]] if name == "instances.json" else
               [entry["annotations"] for entries in value.values() for entry in entries if match(entry)])
    for record in records:
      if name == "SuppImageAnns.json" or match(record):
        record["segmentation"] = [polygon]
  return lambda manual: _edit_json(manual, name, edit)


def _replace_image(image_id: int, change):
  def edit(manual):
    path = Path(manual) / "train2014" / f"COCO_train2014_{image_id:012d}.jpg"
    change(path)
  return edit


@pytest.mark.parametrize("corrupt, message", [
    (lambda manual: _truncate(Path(manual) / "omniref" / "OmniRef.json"),
     r"OmniRef\.json: whole file: field '-' is not valid JSON \(.*\); the file is cut short or damaged: download it "
     r"again"),
    (lambda manual: _truncate(Path(manual) / "omniref" / "instances.json", 0.3),
     r"instances\.json: whole file: field '-' is not valid JSON"),
    (lambda manual: (Path(manual) / "omniref" / "OmniRef.json").write_text("[]"),
     r"OmniRef\.json: top level: field '-' must be a JSON dict; got list\. Is this the OmniRef\.json of the OmniRef "
     r"release\?"),
    (_edit_refs(lambda refs: refs["visual-train"][0].update(height="180")),
     r"OmniRef\.json: \['visual-train'\] ref_id=500: field 'height' must be int; got str '180'"),
    (lambda manual: _edit_json(manual, "instances.json", lambda coco: coco["visual-train"]["annotations"][0].pop("id")),
     r"instances\.json: \['visual-train'\] annotation #0: field 'id' is missing or not an int"),
    (_edit_refs(lambda refs: refs["text-test"][0]["sentences"][0].update(raw="  ")),
     r"OmniRef\.json: \['text-test'\] ref_id=510 sentence #0: field 'raw' is empty \('  '\); every sentence needs "
     r"its referring expression"),
    (_edit_refs(lambda refs: refs["text-test"][2].update(sentences=[])),
     r"OmniRef\.json: \['text-test'\] ref_id=512: field 'sentences' is empty; a text ref needs at least one"),
    (lambda manual: os.remove(Path(manual) / "train2014" / "COCO_train2014_000000000107.jpg"),
     r"SuppImageAnns\.json: category 17 entry #1: field 'image_id' names image 107, whose file .*107\.jpg does not "
     r"exist; put the COCO train2014 images in"),
    (_replace_image(103, _truncate),
     r"OmniRef\.json: \['visual-train'\] ref_id=502: field 'file_name' image .*103\.jpg cannot be read \(image file "
     r"is truncated.*\); the file is cut short or damaged: replace it"),
    (_replace_image(103, lambda path: Image.open(path).resize((100, 80)).save(path)),
     r"ref_id=502: field 'height/width' say 160x240 but the image file .*103\.jpg is 80x100"),
    (_set_polygon("instances.json", lambda ann: ann["id"] == 1021, [250.0, 10.0, 400.0, 10.0, 400.0, 100.0]),
     r"instances\.json: annotation id=1021: field 'segmentation' has a polygon outside the 160x240 image \(height x "
     r"width\): its points span x 250\.\.400, y 10\.\.100; is the annotation from another image"),
    (_set_polygon("SuppImageAnns.json", lambda entry: entry["image_id"] == 107,
                  [10.0, 170.0, 50.0, 170.0, 50.0, 300.0]),
     r"SuppImageAnns\.json: category 17 entry image_id=107: field 'annotations\.segmentation' has a polygon outside "
     r"the 160x160 image"),
], ids=["truncated_json", "truncated_instances", "wrong_schema", "wrong_field_type", "annotation_without_id",
        "empty_sentence", "no_sentences", "reference_image_missing", "truncated_image", "image_of_another_size",
        "polygon_outside_the_image", "reference_polygon_outside_its_image"])
def test_a_bad_release_file_names_the_file_record_and_field_and_leaves_no_data(tmp_path, corrupt, message):
  manual_dir = _copy_fixture(tmp_path)
  corrupt(manual_dir)
  data_dir = tmp_path / "data"
  with pytest.raises(released.MalformedRecordError, match=message):
    _build(data_dir, manual_dir)
  _assert_nothing_left(data_dir)


# ===============================================================================================================
# 4. The predictor (Python) and its CLI (`python -m omniris_jax.predict`)
# ===============================================================================================================


@pytest.mark.parametrize("call, message", [
    (lambda p, tmp: p.set_image(_truncated_png(tmp)), r"image: '.*cut\.png' is not an image this predictor can read "
                                                      r"\(image file is truncated.*\); give a JPEG, PNG"),
    (lambda p, tmp: p.set_image(Image.new("RGB", (0, 0))), r"image: the image is empty \(size 0x0\)"),
    (lambda p, tmp: p.predict(ref_image=REFERENCE, ref_box=(-5, 0, 10, 10)),
     r"prompt 0: ref_box: \(-5, 0, 10, 10\) must satisfy 0 <= x0 < x1 <= 128 .* inside the 128x128 reference image"),
    (lambda p, tmp: p.predict(ref_image=REFERENCE, ref_box=(0, 0, 10)),
     r"prompt 0: ref_box: must be four numbers x0, y0, x1, y1 in pixels; got \(0, 0, 10\)"),
    (lambda p, tmp: p.predict(text="\u200b\ufeff"), r"prompt 0: the text '.*' has no words once normalised \(only "
                                                    r"control or invisible characters\); type an instruction"),
    (lambda p, tmp: p.predict(), r"no prompt given; give text and/or a reference image"),
    (lambda p, tmp: p.predict(text=["a", "b"], ref_image=[REFERENCE]),
     r"the prompt lists differ in length: \{'text': 2, 'ref_image': 1\}"),
], ids=["truncated_image_file", "zero_size_image", "box_outside_the_image", "box_of_three_numbers",
        "text_of_invisible_characters", "no_prompt", "prompt_lists_of_two_lengths"])
def test_the_predictor_names_a_bad_input(predictor, tmp_path, call, message):  # noqa: F811
  predictor.set_image(TARGET)
  with pytest.raises(ValueError, match=message):
    call(predictor, tmp_path)


def _truncated_png(folder: Path) -> str:
  path = folder / "cut.png"
  path.write_bytes(Path(TARGET).read_bytes()[:600])
  return str(path)


def test_a_full_mask_is_answered_as_the_whole_reference(predictor):  # noqa: F811
  # Not an error: the whole reference image is the referent (as the box (0, 0, W, H) says).
  predictor.set_image(TARGET)
  full = predictor.predict(ref_image=REFERENCE, ref_mask=np.ones((128, 128), bool), return_logits=True)
  box = predictor.predict(ref_image=REFERENCE, ref_box=(0, 0, 128, 128), return_logits=True)
  assert full.masks.shape == (1, 128, 128)
  np.testing.assert_allclose(full.mask_logits, box.mask_logits, atol=1e-5)


def test_a_text_longer_than_the_model_reads_is_cut_not_refused(predictor):  # noqa: F811
  # The tiny model reads 8 tokens: [CLS], 6 words, [SEP]. A longer text is answered for its first 6 words.
  predictor.set_image(TARGET)
  words = "the purple cross on the left of every other shape in this picture"
  assert len(predictor.tokenizer.tokens(words)) == 13
  long = predictor.predict(text=words, return_logits=True)
  cut = predictor.predict(text="the purple cross on the left", return_logits=True)
  np.testing.assert_array_equal(long.mask_logits, cut.mask_logits)
  np.testing.assert_array_equal(long.nt_logits, cut.nt_logits)


@pytest.fixture
def earlier_results(tmp_path):
  """An overlay and a JSON from an earlier run, which a failed run must leave as they are."""
  out, result_json = tmp_path / "overlay.png", tmp_path / "result.json"
  out.write_bytes(b"an earlier overlay")
  result_json.write_text('{"earlier": true}')
  return out, result_json


def _cli(args, capsys, monkeypatch, shared_predictor=None):
  """`python -m omniris_jax.predict ARGS` in this process: (exit status, stderr). The compilation cache stays
  off; with `shared_predictor`, the model is not loaded again."""
  monkeypatch.setattr(main, "configure_compilation_cache", lambda *args: None)
  if shared_predictor is not None:
    monkeypatch.setattr(predict.Predictor, "from_workdir", classmethod(lambda cls, *a, **k: shared_predictor))
  try:
    status = predict.main([str(arg) for arg in args])
  except SystemExit as exit_:  # argparse's own refusals
    status = exit_.code
  return status, capsys.readouterr().err


def _bad_file(folder: Path, name: str, data: bytes) -> Path:
  path = folder / name
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("case, message", [
    ("unreadable_image", r"error: --image '.*notes\.png': '.*notes\.png' is not an image this predictor can read"),
    ("missing_image", r"error: --image '.*missing\.jpg': no such file or folder"),
    ("empty_folder", r"error: --image '.*empty': the folder holds no image \(\.jpg, \.jpeg, \.png"),
    ("box_outside_the_reference", r"error: --ref-box: \(70, 62, 300, 94\) must satisfy .* inside the 128x128 "
                                  r"reference image"),
    ("box_not_numbers", r"--ref-box '70,62,x,94': give four numbers x0,y0,x1,y1"),
    ("empty_mask", r"error: --ref-mask '.*empty_mask\.png': is empty \(no pixel set\); mark the referent"),
    ("mask_of_another_size", r"error: --ref-mask '.*small_mask\.png': is 64x32 but the reference image is 128x128; "
                             r"draw it on the reference image at its own size"),
    ("empty_text", r"--text is empty; type an instruction, or leave --text out"),
    ("no_prompt", r"give a prompt: --text, or --ref-image with --ref-box"),
    ("out_is_a_folder", r"error: --out '.*' is a folder; give a file name"),
    ("unknown_config_variant", r"error: Unknown config variant 'dmeo'"),
])
def test_the_cli_refuses_bad_input_before_loading_the_model_and_keeps_earlier_results(
    tiny_workdir, tmp_path, earlier_results, capsys, monkeypatch, case, message):
  out, result_json = earlier_results
  args = {"--workdir": tiny_workdir, "--image": TARGET, "--text": "the purple cross", "--out": out,
          "--json": result_json}
  if case == "unreadable_image":
    args["--image"] = _bad_file(tmp_path, "notes.png", b"these are notes, not a picture")
  elif case == "missing_image":
    args["--image"] = tmp_path / "missing.jpg"
  elif case == "empty_folder":
    (tmp_path / "empty").mkdir()
    args["--image"] = tmp_path / "empty"
  elif case in ("box_outside_the_reference", "box_not_numbers"):
    args.update({"--ref-image": REFERENCE, "--ref-box": "70,62,300,94" if case.startswith("box_outside") else
                 "70,62,x,94"})
  elif case == "empty_mask":
    args.update({"--ref-image": REFERENCE, "--ref-mask": _bad_file(tmp_path, "empty_mask.png",
                                                                   _png_bytes(np.zeros((128, 128), np.uint8)))})
  elif case == "mask_of_another_size":
    args.update({"--ref-image": REFERENCE, "--ref-mask": _bad_file(tmp_path, "small_mask.png",
                                                                   _png_bytes(np.full((32, 64), 255, np.uint8)))})
  elif case == "empty_text":
    args["--text"] = ""
  elif case == "no_prompt":
    del args["--text"]
  elif case == "out_is_a_folder":
    args["--out"] = tmp_path
  else:
    args["--config"] = os.path.join(REPO, "configs", "joint.py") + ":dmeo"
  loads = []
  monkeypatch.setattr(predict.Predictor, "from_workdir", classmethod(lambda cls, *a, **k: loads.append(a)))
  status, stderr = _cli([part for pair in args.items() for part in pair], capsys, monkeypatch)
  assert status == 2 and re.search(message, stderr), stderr
  assert not loads  # refused before the model was loaded
  assert out.read_bytes() == b"an earlier overlay" and result_json.read_text() == '{"earlier": true}'
  assert not list(tmp_path.glob(".*tmp*"))


def test_the_cli_names_a_checkpoint_of_another_size_and_keeps_earlier_results(
    workdir_copy, earlier_results, capsys, monkeypatch):
  workdir, _ = workdir_copy
  _edit_stage_config(workdir, lambda values: values["model"]["overrides"].update(swin={"embed_dim": 8}))
  out, result_json = earlier_results
  status, stderr = _cli(["--workdir", workdir, "--image", TARGET, "--text", "a", "--out", out, "--json", result_json],
                        capsys, monkeypatch)
  assert status == 2 and "does not hold the model that" in stderr and "pass the config it was trained with" in stderr
  assert out.read_bytes() == b"an earlier overlay" and result_json.read_text() == '{"earlier": true}'


def test_the_cli_cuts_a_long_text_and_says_so(predictor, tmp_path, capsys, monkeypatch):  # noqa: F811
  out = tmp_path / "overlay.png"
  words = "the purple cross on the left of every other shape in this picture"
  status, stderr = _cli(["--workdir", "unused", "--image", TARGET, "--text", words, "--out", out], capsys,
                        monkeypatch, shared_predictor=predictor)
  assert status == 0, stderr
  assert ("note: --text is 13 tokens long but the model reads 6; it answers for 'the purple cross on the left' (the "
          "rest is cut).") in stderr
  assert Image.open(out).format == "PNG"


def test_the_cli_command_exits_2_with_one_error_line(tiny_workdir, tmp_path):
  # The same refusal through `python -m omniris_jax.predict`: exit status 2, one line, no traceback.
  notes = _bad_file(tmp_path, "notes.jpg", b"not a jpeg")
  result = _run_cli("--workdir", str(tiny_workdir), "--image", str(notes), "--text", "a", "--out",
                    str(tmp_path / "o.png"))
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: --image {str(notes)!r}: ")
  assert not (tmp_path / "o.png").exists()


# ===============================================================================================================
# 5. The release converter (`python -m omniris_jax.convert_release`); tests/test_convert_release.py has the rest
# ===============================================================================================================


def _torch_file(folder: Path, case: str) -> Path:
  torch = pytest.importorskip("torch")
  path = folder / f"{case}.pth"
  if case == "truncated":
    torch.save({"model": {"backbone.patch_embed.proj.weight": torch.zeros(64, 3, 4, 4)}, "epoch": 3}, path)
    _truncate(path)
  elif case == "empty":
    path.write_bytes(b"")
  elif case == "json_file":
    path.write_text('{"model": {"backbone.patch_embed.proj.weight": [0.0]}}')
  elif case == "another_architecture":  # a bare state_dict of a torchvision-like classifier
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)},
               path)
  elif case == "pickled_module":  # the whole model object, not its state_dict
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
  return path


@pytest.mark.parametrize("case, extra, message", [
    ("truncated", [], r"'.*truncated\.pth' is not a readable PyTorch checkpoint \(.*\); it is cut short \(an "
                      r"interrupted download\?\) or damaged: download it again"),
    ("empty", [], r"'.*empty\.pth' is not a PyTorch checkpoint: it is empty \(0 bytes\), while torch\.save writes a "
                  r"zip archive"),
    ("json_file", [], r"'.*json_file\.pth' is not a PyTorch checkpoint: it begins with b'\{\"model\"'"),
    ("another_architecture", [], r"'.*another_architecture\.pth': the state_dict lacks "
                                 r"'backbone\.patch_embed\.proj\.weight'.*; its 3 tensors \(conv1\.weight, fc\.bias, "
                                 r"fc\.weight\) are another model's\. Give the OmniSegNet checkpoint of the release"),
    ("pickled_module", [], r"refused and not loaded: its pickle asks for torch\.nn\.modules\.linear\.Linear.*re-save "
                           r"just its state_dict"),
    ("missing", ["--resolution", "100"], r"--resolution=100 must be a positive multiple of 32"),
    ("out_is_a_file", [], r"--out '.*out_is_a_file' is a file; give a directory"),
], ids=["truncated_half_way", "empty_file", "json_file", "state_dict_of_another_architecture",
        "whole_pickled_module", "bad_resolution_checked_first", "out_is_a_file"])
def test_the_converter_names_a_file_it_cannot_convert_and_writes_nothing(tmp_path, capsys, case, extra, message):
  out = tmp_path / "converted"
  checkpoint = _torch_file(tmp_path, case) if case not in ("missing", "out_is_a_file") else tmp_path / "missing.pth"
  if case == "out_is_a_file":
    out = tmp_path / "out_is_a_file"
    out.write_text("a file")
    checkpoint = _torch_file(tmp_path, "empty")
  assert convert_release.main(["--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 2
  assert re.search(message, capsys.readouterr().err)
  assert (out.read_text() == "a file") if case == "out_is_a_file" else not out.exists()


# ===============================================================================================================
# 6. The server's HTTP API (`POST /api/predict`); tests/test_serve.py has the rest
# ===============================================================================================================

_serve = pytest.mark.skipif(client is None, reason="the browser demo needs gradio: pip install -e '.[serve]'")


def _multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = "catalogue") -> bytes:
  """A multipart body from (name, file name or None, bytes, content type or None) parts."""
  body = b""
  for name, filename, data, content_type in parts:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
    body += (f"Content-Type: {content_type}\r\n" if content_type else "").encode() + b"\r\n" + data + b"\r\n"
  return body + f"--{boundary}--\r\n".encode()


_TARGET_BYTES = Path(TARGET).read_bytes()
_MULTIPART = "multipart/form-data; boundary=catalogue"


@_serve
@pytest.mark.parametrize("method, headers, body, status, message", [
    ("POST", {}, b"text=a", 415, r"^Content-Type: send a multipart/form-data form .*; got 'none'\.$"),
    ("GET", {}, b"", 405, r"^method: GET is not served here; POST a multipart form\.$"),
    ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, b"text=" + b"a" * (1 << 20 | 1), 413,
     r"^upload: the request is 1\.0 MB, more than the 1 MB this server accepts \(--max-upload-mb\)\.$"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", "t.png", _TARGET_BYTES[:500], "image/png"),
                                                      ("text", None, b"a", None)]), 400,
     r"^image: the upload is not an image this server can read \(.*truncated.*\); upload a PNG, JPEG"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", "t.png", b"", "image/png"),
                                                      ("text", None, b"a", None)]), 400,
     r"^image: the uploaded file 't\.png' is empty\.$"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", "t.png", _TARGET_BYTES, "image/png"),
                                                      ("text", "t.txt", b"the cross", "text/plain")]), 400,
     r"^text: must be a text field, not a file upload\.$"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", "t.png", _TARGET_BYTES, "image/png"),
                                                      ("text", None, b"a", None), ("text", None, b"b", None)]), 400,
     r"^text: given 2 times; give it once\.$"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", "t.png", _TARGET_BYTES, "image/png"),
                                                      ("ref_image", "r.png", _TARGET_BYTES, "image/png"),
                                                      ("ref_mask", "m.pdf", b"%PDF-1.4", "application/pdf")]), 415,
     r"^ref_mask: content type 'application/pdf' is not an image type; upload image/png"),
    ("POST", {"Content-Type": _MULTIPART}, _multipart([("image", f"t{i}.png", _TARGET_BYTES, "image/png")
                                                      for i in range(6)]), 400,
     r"^form: the multipart body is malformed \(Too many files"),
    pytest.param("POST", {"Content-Type": _MULTIPART},
                 _multipart([("text", None, b"a", None), ("image", "t.png", _TARGET_BYTES, "image/png")])[:-2000],
                 400, r"^form: .*cut short", id="upload_cut_short"),
], ids=["no_content_type", "get", "oversized_url_encoded_form", "truncated_png", "empty_file", "text_as_a_file",
        "field_twice", "mask_of_a_non_image_type", "too_many_files", "upload_cut_short"])
def test_the_api_names_the_field_at_fault(client, method, headers, body, status, message):  # noqa: F811
  response = client.request(method, "/api/predict", content=body, headers=headers)
  assert response.status_code == status, response.text
  assert re.search(message, response.json()["error"]), response.json()


@_serve
def test_the_api_cuts_a_long_text_and_answers(client):  # noqa: F811
  words = "the purple cross on the left of every other shape in this picture " * 20
  response = client.post("/api/predict", files={"image": _file(Path(TARGET))}, data={"text": words})
  assert response.status_code == 200, response.text
  assert response.json()["prompts"][0]["prompt"] == repr(words.strip())
