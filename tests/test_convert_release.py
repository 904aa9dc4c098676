"""The release converter: a checkpoint in the release's file layout, converted, computes what the release computes.

The reference is tests/release_torch.py, our PyTorch restatement of the release's eval forward under its exact
state_dict names, with random weights that make every path carry signal (gates open, zero-initialised
projections filled). Tolerance: 1e-4 max abs on mask and no-target logits.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
import transformers

from omniris_jax import convert_release
from omniris_jax.models.omnisegnet import OmniSegNetConfig
from release_torch import ReleaseConfig, ReleaseOmniSegNet, normalise_reference, randomize_, save_release_checkpoint

TOLERANCE = 1e-4
SIZE = 64
BATCH = 2


def _tiny_release_config() -> ReleaseConfig:
  # BERT heads are not in the file: the converter takes width / 64 (BERT's head size), so the tiny BERT keeps it.
  bert = transformers.BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=256, max_position_embeddings=40, type_vocab_size=2)
  return dataclasses.replace(ReleaseConfig.tiny(), lang_dim=128, bert=bert)


def _random_release_model(config: ReleaseConfig, seed: int) -> ReleaseOmniSegNet:
  """Random weights on every path. They give mask logits in the hundreds, where float32 rounding alone (both
  sides agree to ~2e-5 of the values' scale, as close as each is to a float64 run) exceeds 1e-4; scaling the two
  heads that multiply into the mask logits brings them to a trained model's range of a few units."""
  model = randomize_(ReleaseOmniSegNet(config), seed=seed).eval()
  with torch.no_grad():
    for head in (model.sem_seg_head.predictor.minimap_embed, model.sem_seg_head.predictor.mask_embed.layers[2]):
      head.weight.mul_(0.05)
      head.bias.mul_(0.05)
  return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(torch model, checkpoint path, converted config, converted params)."""
  torch.manual_seed(0)
  model = _random_release_model(_tiny_release_config(), seed=0)
  path = tmp_path_factory.mktemp("release") / "model_best_OmniRef_mask.pth"
  save_release_checkpoint(model, path, condition="mask", with_position_ids=True)
  config, params = convert_release.load_release_checkpoint(path)
  return model, path, config, params


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (BATCH, 3, SIZE, SIZE)).astype(np.float32)
  references = rng.uniform(0, 255, (BATCH, 3, SIZE, SIZE)).astype(np.float32)
  masks = np.zeros((BATCH, SIZE, SIZE), np.float32)
  masks[0, 10:30, 20:50] = 1
  masks[1, 33:60, 5:21] = 1
  masks[1, 40:44, 30:40] = 1  # two parts: the box differs from the mask
  scribble = np.zeros_like(masks)
  scribble[:, 20:23, 8:50] = 1
  scribble[1, 30:60, 12:14] = 1
  tokens = np.zeros((BATCH, 1, 20), np.int64)
  lengths = (7, 20)  # padded, and cut at 20 without [SEP] as the release's loader cuts
  for row, length in enumerate(lengths):
    tokens[row, 0, :length] = rng.integers(1, 120, length)
  lang_mask = (tokens > 0).astype(np.int64)
  return images, references, masks, scribble, tokens, lang_mask


def _torch_outputs(model, ref_data=None, supp_data=None, condition="mask"):
  as_torch = lambda d: None if d is None else {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
  with torch.no_grad():
    out = model(as_torch(ref_data), as_torch(supp_data), condition=condition)
  return {key: out[key].numpy() for key in ("pred_masks", "nt_label")}


def _data(kind: str, seed: int = 0):
  images, references, masks, scribble, tokens, lang_mask = _inputs(seed)
  normalised = normalise_reference(torch.from_numpy(references)).numpy()
  text = {"image": images, "lang_tokens": tokens, "lang_mask": lang_mask}
  visual = {"image": images, "supp_image": normalised, "supp_mask": scribble if kind == "scribble" else masks}
  return {"text": (text, None), "mask": (None, visual), "box": (None, visual), "scribble": (None, visual),
          "omni": (text, visual)}[kind]


@pytest.mark.parametrize("kind", ["text", "mask", "box", "scribble", "omni"])
def test_converted_checkpoint_matches_the_release_forward(release, kind):
  model, _, config, params = release
  ref_data, supp_data = _data(kind)
  condition = "box" if kind == "box" else "mask"
  theirs = _torch_outputs(model, ref_data, supp_data, condition)
  ours = convert_release.release_forward(config, params, ref_data, supp_data, condition)
  assert ours["pred_masks"].shape == theirs["pred_masks"].shape == (
      (2 if kind == "omni" else 1) * BATCH, 2, SIZE // 4, SIZE // 4)
  for key in ("pred_masks", "nt_label"):
    error = np.abs(ours[key] - theirs[key]).max()
    scale = np.abs(theirs[key]).max()
    print(f"{kind} {key}: max abs error {error:.2e} (values up to {scale:.2f})")
    assert error <= TOLERANCE, (key, error)
  assert np.abs(theirs["pred_masks"]).max() > 0.1  # the comparison is not between near-zero tensors


def test_inputs_that_differ_give_different_outputs(release):
  """The parity above is not vacuous: the box prompt and the scribble change the release's answer."""
  model = release[0]
  mask, box, scribble = (_torch_outputs(model, *_data(kind), condition="box" if kind == "box" else "mask")
                         for kind in ("mask", "box", "scribble"))
  assert np.abs(mask["pred_masks"] - box["pred_masks"]).max() > 1e-3
  assert np.abs(mask["pred_masks"] - scribble["pred_masks"]).max() > 1e-3


def test_sizes_are_read_from_the_checkpoint(release):
  _, _, config, _ = release
  assert config.swin.embed_dim == 32 and config.swin.depths == (2, 2, 2, 2) and config.swin.window_size == 3
  assert config.swin.num_heads == (1, 2, 4, 8)
  assert config.bert.hidden_size == 128 and config.bert.num_layers == 2 and config.bert.num_heads == 2
  assert config.mask_decoder.num_blocks == 9 and config.mask_decoder.query_grid == 10
  assert config.prompt_encoder.num_queries == 20 and config.prompt_dim == 128
  assert config.early_fusion and config.omni_fusion == "union"
  assert not config.prompt_encoder.level_embedding and not config.prompt_encoder.learned_reference_points
  full = OmniSegNetConfig.release()
  assert full.mask_decoder.prompt_cross_attention == "first" and full.mask_decoder.attend_to_padded_prompt


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, path)
  with pytest.raises(convert_release.UnsafeCheckpointError, match="refused"):
    convert_release.read_release_file(path)
  assert not marker.exists()
  # A plain pickle (not a torch zip) with the same payload is refused too.
  raw = tmp_path / "evil_raw.pth"
  raw.write_bytes(pickle.dumps({"model": {}, "args": Payload()}))
  with pytest.raises(convert_release.ReleaseCheckpointError):
    convert_release.read_release_file(raw)
  assert not marker.exists()


def test_module_prefix_and_bare_state_dicts_are_read(release, tmp_path):
  model = release[0]
  state = {f"module.{k}": v for k, v in model.state_dict().items()}
  torch.save(state, tmp_path / "bare.pth")
  arrays, args = convert_release.read_release_file(tmp_path / "bare.pth")
  assert args == {} and "backbone.patch_embed.proj.weight" in arrays


def test_a_broken_state_dict_names_every_problem(release):
  model = release[0]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  state.pop("sem_seg_head.predictor.lang_weight")
  state["backbone.layers.0.fusion.extra.weight"] = np.zeros(3, np.float32)
  state["lang_in_norm.bias"] = np.zeros(7, np.float32)
  config = convert_release.release_config(state)
  with pytest.raises(convert_release.ReleaseCheckpointError) as error:
    convert_release.convert_state_dict(state, config)
  message = str(error.value)
  for needle in ("missing keys: sem_seg_head.predictor.lang_weight", "unexpected keys: "
                 "backbone.layers.0.fusion.extra.weight", "lang_in_norm.bias (7,)"):
    assert needle in message, message


def test_not_a_checkpoint_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert_release.read_release_file(tmp_path / "missing.pth")
  torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
  with pytest.raises(convert_release.ReleaseCheckpointError, match="not the release's checkpoint dict"):
    convert_release.read_release_file(tmp_path / "other.pth")


def test_cli_writes_a_workdir_and_refuses_to_overwrite(release, tmp_path, capsys):
  _, path, _, _ = release
  out = tmp_path / "converted"
  assert convert_release.main(["--checkpoint", str(path), "--out", str(out)]) == 0
  assert (out / "release" / "config.json").is_file()
  assert "trained with visual prompts of type 'mask'" in capsys.readouterr().out
  assert convert_release.main(["--checkpoint", str(path), "--out", str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["release"]  # no staging directory left behind


# ---------------------------------------------------------------------------------------------------------------
# The converted workdir in the predictor and as init_from
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_workdir(tmp_path_factory):
  """A tiny release model with BERT's real vocabulary size (so the real tokenizer can feed it), converted by the
  CLI at 64 x 64; returns (torch model, workdir)."""
  torch.manual_seed(1)
  config = _tiny_release_config()
  config = dataclasses.replace(config, bert=transformers.BertConfig(**{**config.bert.to_dict(), "vocab_size": 30522}))
  model = _random_release_model(config, seed=1)
  path = tmp_path_factory.mktemp("release_vocab") / "model.pth"
  save_release_checkpoint(model, path)
  out = tmp_path_factory.mktemp("converted") / "workdir"
  assert convert_release.main(["--checkpoint", str(path), "--out", str(out), "--resolution", str(SIZE)]) == 0
  return model, out


def test_predictor_answers_like_the_release(converted_workdir):
  """The predictor on a converted checkpoint: the release's preprocessing and forward for text and visual prompts,
  and for an omni prompt the release's union (part masks OR-ed after upsampling, no target only if both say so)."""
  from PIL import Image
  from omniris_jax import predict

  model, out = converted_workdir
  predictor = predict.Predictor.from_workdir(str(out))
  assert predictor.early_fusion and not predictor.tokenizer.keep_sep and predictor.resolution == SIZE
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (90, 120, 3), np.uint8)
  reference = rng.integers(0, 256, (70, 50, 3), np.uint8)
  box = (5, 10, 30, 50)
  text = "the small dog sitting on the left of the red sofa next to a lamp and a big window behind it"
  predictor.set_image(image)
  result = predictor.predict(prompts=[predict.Prompt(text=text), predict.Prompt(ref_image=reference, ref_box=box),
                                      predict.Prompt(text=text, ref_image=reference, ref_box=box)],
                             return_logits=True)

  # The release's own inputs: the same resizing (PIL bilinear, nearest for the prompt), its tokenisation.
  ids, mask = predictor.tokenizer.encode(text, 20)
  assert ids[-1] != predictor.tokenizer.sep_id  # cut after 20 ids, as the release's loaders cut
  target = predict.resize_square(image, SIZE, bilinear=True).transpose(2, 0, 1)[None].astype(np.float32)
  ref = predict.resize_square(reference, SIZE, bilinear=True).transpose(2, 0, 1)[None].astype(np.float32)
  prompt = predict.resize_square(predict.box_map(box, reference.shape[:2]).astype(np.uint8), SIZE, bilinear=False)
  theirs = _torch_outputs(
      model, {"image": target, "lang_tokens": ids[None, None].astype(np.int64),
              "lang_mask": mask[None, None].astype(np.int64)},
      {"image": target, "supp_image": normalise_reference(torch.from_numpy(ref)).numpy(),
       "supp_mask": prompt[None].astype(np.float32)})
  their_logits = theirs["pred_masks"].transpose(0, 2, 3, 1)  # rows: text, visual
  # The predictor decodes its prompts in one padded batch; a batch of another size changes XLA's float rounding
  # (~1e-5 of the scale), which masked attention can amplify where a query mask sits at its threshold. Hence a
  # looser bound than the parity tests' 1e-4; a preprocessing mismatch would be off by orders of magnitude.
  scale = np.abs(their_logits).max()
  for row in (0, 1):
    assert np.abs(result.mask_logits[row] - their_logits[row]).max() <= 1e-3 * max(scale, 1.0), row
    assert np.abs(result.nt_logits[row] - theirs["nt_label"][row]).max() <= 1e-3, row
  # The omni prompt: its part masks upsampled and OR-ed, no target only if both parts say so.
  part_masks, part_probs = predict._masks_and_probs(their_logits, theirs["nt_label"], image.shape[:2])
  union = (part_masks[0] | part_masks[1]) & (part_probs.min() < 0.5)
  assert (result.masks[2] != union).mean() < 1e-3  # pixels on the argmax boundary may round either way
  assert union.any() and not union.all()
  assert result.no_target_prob[2] == pytest.approx(part_probs.min(), abs=1e-4)
  assert result.masks.shape == (3, 90, 120)
  # A second prompt batch of the same shape on a new image compiles nothing new.
  programs = predictor.compiled_programs()
  predictor.set_image(image[::-1])
  predictor.predict(prompts=[predict.Prompt(text="a cat"), predict.Prompt(ref_image=reference, ref_box=box),
                             predict.Prompt(text="a cat", ref_image=reference, ref_mask=predict.box_map(box, reference.shape[:2]))])
  assert predictor.compiled_programs() == programs


def test_converted_workdir_starts_a_fine_tuning_stage(converted_workdir):
  """`--config.init_from=DIR` resolves to DIR/release/checkpoints and every parameter comes from it."""
  import jax
  from flax import linen as nn
  from omniris_jax import checkpointing, predict
  from omniris_jax.models import factory

  _, out = converted_workdir
  init_dir = checkpointing.init_directory(str(out), "/unused")
  assert init_dir == str(out / "release" / "checkpoints")
  config = predict.load_stage_config(str(out / "release"))
  model = factory.make_model(config)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **factory.dummy_inputs(config))["params"]))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  logs = []
  params = checkpointing.load_params_from(init_dir, abstract, lambda: pytest.fail("needed fresh params"),
                                          log=logs.append)
  assert "Initialised" in logs[0] and "freshly" not in logs[0], logs
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
