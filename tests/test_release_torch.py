"""Quick checks of tests/release_torch.py, the PyTorch restatement of the authors' released OmniSegNet."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from release_torch import ReleaseConfig
from release_torch import ReleaseOmniSegNet
from release_torch import normalise_reference
from release_torch import randomize_
from release_torch import release_box
from release_torch import save_release_checkpoint

# Measured on the authors' published checkpoint (no position_ids): entries and Swin relative_position_index buffers.
RELEASED_ENTRIES = 1035
RELEASED_INT64_BUFFERS = 24
RELEASED_ELEMENTS = 232.8e6


def test_full_size_state_dict_matches_the_release():
  with torch.device("meta"):
    model = ReleaseOmniSegNet(ReleaseConfig())
  sd = model.state_dict()
  total = sum(v.numel() for v in sd.values())
  print(f"released-size state_dict: {len(sd)} entries, {total} elements ({total / 1e6:.3f} M)")
  assert len(sd) == RELEASED_ENTRIES
  int64 = [k for k, v in sd.items() if v.dtype == torch.int64]
  assert len(int64) == RELEASED_INT64_BUFFERS
  assert all(k.endswith("attn.relative_position_index") for k in int64)
  assert abs(total - RELEASED_ELEMENTS) < 0.1e6
  shapes = {
      "backbone.patch_embed.proj.weight": (128, 3, 4, 4),
      "backbone.layers.2.blocks.17.attn.relative_position_bias_table": (529, 16),
      "backbone.layers.2.blocks.17.attn.relative_position_index": (144, 144),
      "backbone.layers.0.fusion.image_lang_att.f_key.0.weight": (128, 768, 1),
      "backbone.layers.3.fusion.project_mm.0.weight": (1024, 1024, 1),
      "backbone.layers.2.downsample.reduction.weight": (1024, 2048),
      "backbone.layers.2.res_gate.2.weight": (512, 512),
      "backbone.norm3.weight": (1024,),
      "text_encoder.embeddings.word_embeddings.weight": (30522, 768),
      "text_encoder.encoder.layer.11.output.LayerNorm.bias": (768,),
      "sem_seg_head.pixel_decoder.input_proj.0.0.weight": (256, 1024, 1, 1),
      "sem_seg_head.pixel_decoder.transformer.level_embed": (3, 256),
      "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.linear1.weight": (1024, 256),
      "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight": (192, 256),
      "sem_seg_head.pixel_decoder.adapter_1.weight": (256, 128, 1, 1),
      "sem_seg_head.pixel_decoder.adapter_1.norm.weight": (256,),
      "sem_seg_head.pixel_decoder.layer_1.weight": (256, 256, 3, 3),
      "sem_seg_head.pixel_decoder.mask_features.bias": (256,),
      "sem_seg_head.predictor.lang_weight": (),
      "sem_seg_head.predictor.lang_proj.weight": (256, 768),
      "sem_seg_head.predictor.RIA_layers.8.multihead_attn.in_proj_weight": (768, 256),
      "sem_seg_head.predictor.transformer_ffn_layers.8.linear1.weight": (2048, 256),
      "sem_seg_head.predictor.level_embed.weight": (3, 256),
      "sem_seg_head.predictor.minimap_embed.weight": (2, 256),
      "sem_seg_head.predictor.nt_embed.layers.1.weight": (2, 256),
      "sem_seg_head.predictor.mask_embed.layers.2.weight": (256, 256),
      "feature_map_proj.weight": (256, 1920, 1, 1),
      "lang_in_linear.weight": (768, 256),
      "lang_norm.weight": (768,),
      "prompt_encoder.level_embed": (4, 256),
      "prompt_encoder.reference_points": (20, 4, 2),
      "prompt_encoder.refpoint_embed.weight": (20, 4),
      "prompt_encoder.ref_point_head.layers.0.weight": (256, 512),
      "prompt_encoder.input_proj.0.0.weight": (256, 1024, 1, 1),
      "prompt_encoder.downscale1.6.weight": (256, 16, 1, 1),
      "prompt_encoder.downscale4.1.weight": (256,),
      "prompt_encoder.layers.2.cross_attn.sampling_offsets.weight": (256, 256),
      "prompt_encoder.layers.2.self_attn.out_proj.weight": (256, 256),
      "prompt_encoder.norm.weight": (256,),
      "vis_prompts.weight": (20, 256),
  }
  for key, shape in shapes.items():
    assert tuple(sd[key].shape) == shape, key
  assert not any(k.startswith("backbone.layers.3.res_gate") or k.startswith("backbone.layers.3.downsample")
                 for k in sd)
  assert not any("pooler" in k or "pixel_mean" in k or "position_ids" in k for k in sd)


@pytest.fixture(scope="module")
def tiny():
  model = randomize_(ReleaseOmniSegNet(ReleaseConfig.tiny()), seed=0).eval()
  g = torch.Generator().manual_seed(1)
  b, length = 2, 20  # omni batches need text length == 20 visual tokens (the release's MAX_TOKENS)
  lang_mask = torch.ones(b, 1, length, dtype=torch.int64)
  lang_mask[0, 0, 12:] = 0
  supp_mask = torch.zeros(b, 64, 64)
  supp_mask[:, 10:40, 20:50] = 1
  supp_mask[:, 10:22, 20:32] = 0  # an L shape: its box differs from the mask
  supp_mask[1, 30:60, 5:25] = 1
  data = {
      "image": torch.rand(b, 3, 64, 64, generator=g) * 255,
      "lang_tokens": torch.randint(1, 120, (b, 1, length), generator=g),
      "lang_mask": lang_mask,
      "supp_image": normalise_reference(torch.rand(b, 3, 64, 64, generator=g) * 255),
      "supp_mask": supp_mask,
  }
  return model, data


def _run(model, ref=None, supp=None, condition="mask"):
  with torch.no_grad():
    return model(ref, supp, condition=condition)


def _check(out, n, hw=64):
  assert tuple(out["pred_masks"].shape) == (n, 2, hw // 4, hw // 4)
  assert tuple(out["nt_label"].shape) == (n, 2)
  assert tuple(out["pred_masks_full"].shape) == (n, 2, hw, hw)
  for v in out.values():
    assert torch.isfinite(v).all()


def test_tiny_forwards_text_visual_omni(tiny):
  model, d = tiny
  text = {k: d[k] for k in ("image", "lang_tokens", "lang_mask")}
  visual = {"image": d["image"], "supp_image": d["supp_image"], "supp_mask": d["supp_mask"]}
  out_t = _run(model, text)
  out_m = _run(model, None, visual)
  out_b = _run(model, None, visual, condition="box")
  out_o = _run(model, text, visual)
  for out, n in ((out_t, 2), (out_m, 2), (out_b, 2), (out_o, 4)):
    _check(out, n)
  # Every example is computed on its own: the omni batch is the text batch, then the visual batch.
  for key in ("pred_masks", "nt_label"):
    torch.testing.assert_close(out_o[key][:2], out_t[key], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out_o[key][2:], out_m[key], rtol=1e-4, atol=1e-3)
  # A box prompt is not the mask prompt.
  assert (out_b["pred_masks"] - out_m["pred_masks"]).abs().max() > 1e-3
  # Targets that are not a multiple of 32 are padded bottom/right.
  _check(_run(model, {**text, "image": d["image"][:, :, :60, :50]}), 2)


def test_tiny_outputs_follow_the_prompt(tiny):
  model, d = tiny
  text = {k: d[k] for k in ("image", "lang_tokens", "lang_mask")}
  tokens = d["lang_tokens"].clone()
  tokens[:, 0, 3] = tokens[:, 0, 3] % 119 + 1
  base, changed = _run(model, text), _run(model, {**text, "lang_tokens": tokens})
  assert (base["pred_masks"] - changed["pred_masks"]).abs().max() > 1e-3
  assert (base["nt_label"] - changed["nt_label"]).abs().max() > 1e-5
  visual = {"image": d["image"], "supp_image": d["supp_image"], "supp_mask": d["supp_mask"]}
  base = _run(model, None, visual)
  moved = _run(model, None, {**visual, "supp_mask": torch.roll(d["supp_mask"], shifts=(9, -7), dims=(1, 2))})
  assert (base["pred_masks"] - moved["pred_masks"]).abs().max() > 1e-3
  other_ref = _run(model, None, {**visual, "supp_image": torch.flip(d["supp_image"], dims=(-1,))})
  assert (base["pred_masks"] - other_ref["pred_masks"]).abs().max() > 1e-3


def test_release_box_and_normalisation():
  mask = torch.zeros(2, 8, 9)
  mask[0, 2, 3] = mask[0, 5, 6] = 1
  box = release_box(mask)
  expected = torch.zeros(2, 8, 9)
  expected[0, 2:6, 3:7] = 1
  assert torch.equal(box, expected) and box.dtype == mask.dtype
  image = torch.full((1, 3, 2, 2), 200.0)
  mean = torch.tensor((123.675, 116.28, 103.53)).view(1, 3, 1, 1)
  std = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)
  torch.testing.assert_close(normalise_reference(image), (image - mean) / std)


def test_checkpoint_needs_namespace_allowlisted(tiny, tmp_path):
  model, _ = tiny
  path = tmp_path / "model_best_OmniRef_box.pth"
  save_release_checkpoint(model, path, condition="box", epoch=3)
  with pytest.raises(pickle.UnpicklingError):
    torch.load(path, weights_only=True)
  with torch.serialization.safe_globals([argparse.Namespace]):
    ckpt = torch.load(path, weights_only=True)
  assert set(ckpt) == {"model", "optimizer", "epoch", "args", "lr_scheduler", "scaler"}
  assert ckpt["epoch"] == 3 and ckpt["args"].condition == "box" and ckpt["args"].model == "omnisegnet"
  assert set(ckpt["optimizer"]) == {"state", "param_groups"}
  assert list(ckpt["model"]) == list(model.state_dict())
  fresh = ReleaseOmniSegNet(ReleaseConfig.tiny())
  fresh.load_state_dict(ckpt["model"], strict=True)
  for k, v in model.state_dict().items():
    assert torch.equal(fresh.state_dict()[k], v), k

  path_ids = tmp_path / "with_ids.pth"
  save_release_checkpoint(model, path_ids, with_position_ids=True)
  with torch.serialization.safe_globals([argparse.Namespace]):
    sd = torch.load(path_ids, weights_only=True)["model"]
  ids = sd["text_encoder.embeddings.position_ids"]
  assert ids.dtype == torch.int64 and tuple(ids.shape) == (1, 40)
  assert len(sd) == len(model.state_dict()) + 1
