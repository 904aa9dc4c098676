"""The authors' published OmniSegNet checkpoint (a PyTorch `torch.save` file) -> omniris_jax config and parameters.

    python -m omniris_jax.convert_release --checkpoint OmniSegNet.pth --out workdir/release
    python -m omniris_jax.predict --workdir workdir/release --image photo.jpg --text "the dog on the left" \\
        --out overlay.png

What the file holds: the dict the release's `train_net.py` saves, {'model': state_dict, 'optimizer', 'epoch',
'args', 'lr_scheduler', 'scaler'} ('model' unwrapped, a `module.` prefix is tolerated; a bare state_dict is read
too). Its 'args' is an `argparse.Namespace`, which torch's safe loader refuses by default; the file is read with
`torch.load(weights_only=True)` and that one class allowed, so nothing in it can run code: a pickle that asks for
any other global is refused before anything is built (`UnsafeCheckpointError`).

What the converter does: reads every size from the tensors' shapes (Swin width, depths, heads and window; BERT's
vocabulary, width, depth; the decoders' widths and depths; the 20 prompt queries and 100 region queries), builds
`OmniSegNetConfig.release()` with those sizes, and maps each tensor onto our parameter tree: fused qkv /
`in_proj` weights split into query/key/value, linears transposed to (in, out), convolutions from OIHW to HWIO,
Conv1d kernels to Dense kernels. Tensors the release allocates but never reads in its forward are dropped
(`feature_map_proj.*`, `prompt_encoder.level_embed` (never initialised), `prompt_encoder.reference_points`,
`prompt_encoder.ref_point_head.*`, `prompt_encoder.refpoint_embed`, BERT's `position_ids` buffer); Swin's
`relative_position_index` buffers are checked against ours and dropped. Anything else missing, unexpected or
misshapen is an error that names every such key.

Heads and sampling points cannot be read from shapes; they are the release's (8 heads in every attention of the
decoders, 4 deformable points, BERT heads = width / 64) and checked for consistency where shapes allow.

Inputs in the release's layout (`release_forward`): the release normalises the target image inside its forward
but expects the reference image already normalised by its loader; our model takes both as 0..255 pixels, so
`release_forward` un-normalises the reference. Its outputs are the release's raw 'pred_masks' (N, 2, H/4, W/4)
and 'nt_label' (N, 2) logits, text rows first, exactly as the release's forward orders a batch with both.

torch is needed here only (`pip install torch`, the CPU wheel is enough); the rest of the package never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from omniris_jax.models import bert as bert_lib
from omniris_jax.models import swin as swin_lib
from omniris_jax.models.bert import BertConfig
from omniris_jax.models.mask_decoder import MaskDecoderConfig
from omniris_jax.models.omnisegnet import IMAGENET_MEAN, IMAGENET_STD, OmniSegNetConfig
from omniris_jax.models.pixel_encoder import PixelEncoderConfig
from omniris_jax.models.prompt_encoder import PromptEncoderConfig
from omniris_jax.models.swin import SwinConfig

# The stage directory a converted checkpoint is written to: DIR/release/{config.json, checkpoints/}.
STAGE = "release"
# Hyper-parameters the release fixes in code or config and shapes do not reveal.
RELEASE_HEADS = 8  # MASK_FORMER.NHEADS: pixel encoder, mask decoder, prompt encoder.
RELEASE_POINTS = 4  # deformable sampling points per head and level.
RELEASE_MAX_TEXT_LEN = 20  # REFERRING.MAX_TOKENS.
RELEASE_RESOLUTION = 480  # INPUT.IMAGE_SIZE.
# Allocated by the release but never read by its forward.
_UNUSED = re.compile(r"^(feature_map_proj\..*|prompt_encoder\.(level_embed|reference_points|refpoint_embed\.weight|"
                     r"ref_point_head\..*)|text_encoder\.embeddings\.(position_ids|token_type_ids))$")
_RELATIVE_POSITION_INDEX = re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$")


class ReleaseCheckpointError(ValueError):
  """The file is not a release checkpoint this converter can map (the message names the keys)."""


class UnsafeCheckpointError(ReleaseCheckpointError):
  """The file's pickle asks for code outside the allow-list; it was not loaded."""


# ===============================================================================================================
# Reading the file
# ===============================================================================================================


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("convert_release reads PyTorch files and needs torch: `pip install torch` (the CPU wheel "
                      "is enough; `--index-url https://download.pytorch.org/whl/cpu`).") from error
  return torch


def read_release_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The checkpoint's state_dict as float32/int64 numpy arrays (no `module.` prefix), and its 'args' as a dict.

  Loaded with torch's weights-only unpickler plus `argparse.Namespace`; any other global is refused.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle references code outside the allow-list (nothing was executed).
    ReleaseCheckpointError: the file is not a torch checkpoint holding a state_dict.
  """
  torch = _torch()
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--checkpoint {str(path)!r} does not exist; download the published checkpoint "
                            "(linked from the README of As-Time-Goes-By/OmniSegNet) first.")
  with open(path, "rb") as file:
    head = file.read(8)
  # torch.save writes a zip archive (PK..); files of torch < 1.6 are a pickle (protocol 2+ starts with 0x80).
  if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):
    what = "is empty (0 bytes)" if not head else f"begins with {head!r}"
    raise ReleaseCheckpointError(
        f"{str(path)!r} is not a PyTorch checkpoint: it {what}, while torch.save writes a zip archive. Give the .pth "
        "file of the release (linked from the README of As-Time-Goes-By/OmniSegNet); download it again if it was "
        "cut short.")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      loaded = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises UnpicklingError (or RuntimeError wrapping it) for refused globals
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
      found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)
      raise UnsafeCheckpointError(
          f"{str(path)!r} was refused and not loaded: its pickle asks for "
          f"{', '.join(sorted(set(found))) or 'a global outside the allow-list'}, which could run code. A release "
          "checkpoint needs nothing but tensors, plain containers and argparse.Namespace. If you trust the file, "
          "re-save just its state_dict (torch.save({'model': checkpoint['model']}, 'clean.pth')) and convert "
          "that.") from error
    first_line = (text.strip().splitlines() or [type(error).__name__])[0]
    raise ReleaseCheckpointError(
        f"{str(path)!r} is not a readable PyTorch checkpoint ({type(error).__name__}: {first_line}); it is cut short "
        "(an interrupted download?) or damaged: download it again.") from error
  if isinstance(loaded, Mapping) and "model" in loaded and isinstance(loaded["model"], Mapping):
    state, args = loaded["model"], loaded.get("args")
  elif isinstance(loaded, Mapping) and loaded and all(torch.is_tensor(v) for v in loaded.values()):
    state, args = loaded, None
  else:
    keys = sorted(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
    raise ReleaseCheckpointError(f"{str(path)!r} holds {keys}, not the release's checkpoint dict ('model', "
                                 "'optimizer', 'epoch', 'args', ...) nor a bare state_dict.")
  arrays = {}
  for key, value in state.items():
    if not torch.is_tensor(value):
      raise ReleaseCheckpointError(f"{str(path)!r}: model[{key!r}] is a {type(value).__name__}, not a tensor.")
    key = key[len("module."):] if key.startswith("module.") else key
    value = value.detach().cpu()
    arrays[key] = value.numpy() if not value.is_floating_point() else value.float().numpy()
  args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
  return arrays, args


# ===============================================================================================================
# Sizes from shapes
# ===============================================================================================================


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
  indices = {int(m.group(1)) for key in state for m in [re.match(pattern, key)] if m}
  if indices != set(range(len(indices))):
    raise ReleaseCheckpointError(f"the indices matched by {pattern!r} are {sorted(indices)}, not 0..n-1")
  return len(indices)


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
  if key not in state:
    raise ReleaseCheckpointError(
        f"the state_dict lacks {key!r}, which every release checkpoint has; its {len(state)} tensors ("
        f"{_listing(list(state), 4)}) are another model's. Give the OmniSegNet checkpoint of the release (linked "
        "from the README of As-Time-Goes-By/OmniSegNet).")
  return tuple(state[key].shape)


def release_config(state: Mapping[str, np.ndarray], **overrides: Any) -> OmniSegNetConfig:
  """`OmniSegNetConfig.release()` with the sizes of the checkpoint `state` (see the module docstring)."""
  out_channels, _, patch, _ = _shape(state, "backbone.patch_embed.proj.weight")
  num_stages = _count(state, r"^backbone\.layers\.(\d+)\.")
  depths = tuple(_count(state, rf"^backbone\.layers\.{s}\.blocks\.(\d+)\.") for s in range(num_stages))
  tables = [_shape(state, f"backbone.layers.{s}.blocks.0.attn.relative_position_bias_table")
            for s in range(num_stages)]
  window = (math.isqrt(tables[0][0]) + 1) // 2
  mlp_ratio = _shape(state, "backbone.layers.0.blocks.0.mlp.fc1.weight")[0] / out_channels
  swin = SwinConfig(embed_dim=out_channels, depths=depths, num_heads=tuple(t[1] for t in tables),
                    window_size=window, patch_size=patch, mlp_ratio=mlp_ratio)

  vocab, hidden = _shape(state, "text_encoder.embeddings.word_embeddings.weight")
  bert = BertConfig(vocab_size=vocab, hidden_size=hidden,
                    num_layers=_count(state, r"^text_encoder\.encoder\.layer\.(\d+)\."),
                    num_heads=max(hidden // 64, 1),
                    intermediate_size=_shape(state, "text_encoder.encoder.layer.0.intermediate.dense.weight")[0],
                    max_position_embeddings=_shape(state, "text_encoder.embeddings.position_embeddings.weight")[0],
                    type_vocab_size=_shape(state, "text_encoder.embeddings.token_type_embeddings.weight")[0],
                    dropout_rate=0.0)

  pixel = "sem_seg_head.pixel_decoder."
  pixel_dim = _shape(state, pixel + "input_proj.0.0.weight")[0]
  pixel_encoder = PixelEncoderConfig(
      hidden_dim=pixel_dim, mask_dim=_shape(state, pixel + "mask_features.weight")[0],
      num_layers=_count(state, r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
      num_heads=RELEASE_HEADS, num_points=RELEASE_POINTS,
      ffn_dim=_shape(state, pixel + "transformer.encoder.layers.0.linear1.weight")[0], dropout_rate=0.0,
      group_norm_groups=32)
  _check_deformable(state, pixel + "transformer.encoder.layers.0.self_attn", levels=3)

  decoder = "sem_seg_head.predictor."
  num_queries, decoder_dim = _shape(state, decoder + "query_feat.weight")
  grid = math.isqrt(num_queries)
  if grid * grid != num_queries:
    raise ReleaseCheckpointError(f"{decoder}query_feat has {num_queries} region queries, not a square grid")
  mask_decoder = dataclasses.replace(
      MaskDecoderConfig.release(), hidden_dim=decoder_dim, num_heads=RELEASE_HEADS,
      ffn_dim=_shape(state, decoder + "transformer_ffn_layers.0.linear1.weight")[0], query_grid=grid,
      num_blocks=_count(state, r"^sem_seg_head\.predictor\.RIA_layers\.(\d+)\."),
      num_feature_levels=_shape(state, decoder + "level_embed.weight")[0],
      mask_dim=_shape(state, decoder + "mask_embed.layers.2.weight")[0], dropout_rate=0.0)

  prompt = "prompt_encoder."
  prompt_encoder = dataclasses.replace(
      PromptEncoderConfig.release(), hidden_dim=_shape(state, prompt + "input_proj.0.0.weight")[0],
      prompt_dim=_shape(state, "lang_in_linear.weight")[0], num_queries=_shape(state, "vis_prompts.weight")[0],
      num_layers=_count(state, r"^prompt_encoder\.layers\.(\d+)\."), num_heads=RELEASE_HEADS,
      num_points=RELEASE_POINTS, ffn_dim=_shape(state, prompt + "layers.0.linear1.weight")[0], dropout_rate=0.0,
      mask_in_chans=_shape(state, prompt + "downscale1.3.weight")[0], group_norm_groups=32)
  _check_deformable(state, prompt + "layers.0.cross_attn", levels=4)

  if _shape(state, "lang_norm.weight")[0] != prompt_encoder.prompt_dim:
    raise ReleaseCheckpointError(f"lang_norm is {_shape(state, 'lang_norm.weight')[0]} wide but lang_in_linear "
                                 f"outputs {prompt_encoder.prompt_dim}; text and visual tokens must share a width")
  fields = dict(swin=swin, bert=bert, pixel_encoder=pixel_encoder, prompt_encoder=prompt_encoder,
                mask_decoder=mask_decoder, max_text_len=min(RELEASE_MAX_TEXT_LEN, bert.max_position_embeddings))
  return OmniSegNetConfig.release(**{**fields, **overrides})


def _check_deformable(state: Mapping[str, np.ndarray], prefix: str, levels: int) -> None:
  heads_points = _shape(state, prefix + ".attention_weights.weight")[0]
  if heads_points != RELEASE_HEADS * levels * RELEASE_POINTS:
    raise ReleaseCheckpointError(
        f"{prefix}.attention_weights has {heads_points} outputs; the release's {RELEASE_HEADS} heads x {levels} "
        f"levels x {RELEASE_POINTS} points would give {RELEASE_HEADS * levels * RELEASE_POINTS}")


# ===============================================================================================================
# The key map
# ===============================================================================================================

# How a torch tensor becomes our parameter: copy, Linear (out, in) -> (in, out), Conv2d OIHW -> HWIO,
# Conv1d (out, in, 1) -> (in, out), or one third of a fused (3D, ...) q/k/v weight (then transposed) or bias.
_COPY, _LINEAR, _CONV2D, _CONV1D = "copy", "linear", "conv2d", "conv1d"


def _key_map(config: OmniSegNetConfig) -> dict[tuple[str, ...], tuple[str, str, int | None]]:
  """Our parameter path -> (release state_dict key, conversion, q/k/v part or None)."""
  table: dict[tuple[str, ...], tuple[str, str, int | None]] = {}

  def path(text):
    return tuple(text.split("/"))

  def linear(ours, theirs, bias=True):
    table[path(ours + "/kernel")] = (theirs + ".weight", _LINEAR, None)
    if bias:
      table[path(ours + "/bias")] = (theirs + ".bias", _COPY, None)

  def norm(ours, theirs):
    table[path(ours + "/scale")] = (theirs + ".weight", _COPY, None)
    table[path(ours + "/bias")] = (theirs + ".bias", _COPY, None)

  def conv(ours, theirs, bias=True, kind=_CONV2D):
    table[path(ours + "/kernel")] = (theirs + ".weight", kind, None)
    if bias:
      table[path(ours + "/bias")] = (theirs + ".bias", _COPY, None)

  def fused_attention(ours, weight, bias, out):
    for part, name in enumerate(("query", "key", "value")):
      table[path(f"{ours}/{name}/kernel")] = (weight, _LINEAR, part)
      table[path(f"{ours}/{name}/bias")] = (bias, _COPY, part)
    linear(f"{ours}/out", out)

  def torch_attention(ours, theirs):  # nn.MultiheadAttention
    fused_attention(ours, f"{theirs}.in_proj_weight", f"{theirs}.in_proj_bias", f"{theirs}.out_proj")

  def deformable(ours, theirs):
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
      linear(f"{ours}/{name}", f"{theirs}.{name}")

  def input_projections(ours, theirs, levels):  # nn.Sequential(Conv2d 1x1, GroupNorm) per level
    for level in range(levels):
      conv(f"{ours}/input_proj_{level}", f"{theirs}.input_proj.{level}.0")
      norm(f"{ours}/input_norm_{level}", f"{theirs}.input_proj.{level}.1")

  # Image encoder: Swin with PWAM.
  enc = "image_encoder"
  conv(f"{enc}/patch_embed/projection", "backbone.patch_embed.proj")
  norm(f"{enc}/patch_embed/norm", "backbone.patch_embed.norm")
  swin = config.swin
  for s in range(swin.num_stages):
    theirs = f"backbone.layers.{s}"
    for b in range(swin.depths[s]):
      ours, block = f"{enc}/stage{s}/block{b}", f"{theirs}.blocks.{b}"
      norm(f"{ours}/layernorm_before", f"{block}.norm1")
      fused_attention(f"{ours}/attention", f"{block}.attn.qkv.weight", f"{block}.attn.qkv.bias",
                      f"{block}.attn.proj")
      table[path(f"{ours}/relative_position_bias_table")] = (f"{block}.attn.relative_position_bias_table", _COPY,
                                                             None)
      norm(f"{ours}/layernorm_after", f"{block}.norm2")
      linear(f"{ours}/mlp/fc1", f"{block}.mlp.fc1")
      linear(f"{ours}/mlp/fc2", f"{block}.mlp.fc2")
    pwam, fusion = f"{enc}/stage{s}/pwam", f"{theirs}.fusion"
    conv(f"{pwam}/pixel_projection", f"{fusion}.vis_project.0", kind=_CONV1D)
    for ours, name in (("query", "f_query"), ("key", "f_key"), ("value", "f_value"), ("output", "W")):
      conv(f"{pwam}/{ours}", f"{fusion}.image_lang_att.{name}.0", kind=_CONV1D)
    conv(f"{pwam}/fused_projection", f"{fusion}.project_mm.0", kind=_CONV1D)
    if s < swin.num_stages - 1:
      linear(f"{enc}/stage{s}/gate/gate_in", f"{theirs}.res_gate.0", bias=False)
      linear(f"{enc}/stage{s}/gate/gate_out", f"{theirs}.res_gate.2", bias=False)
      norm(f"{enc}/stage{s}/patch_merging/norm", f"{theirs}.downsample.norm")
      linear(f"{enc}/stage{s}/patch_merging/reduction", f"{theirs}.downsample.reduction", bias=False)
    norm(f"{enc}/norm_res{s + 2}", f"backbone.norm{s}")

  # Text encoder (HF BertModel names under text_encoder.) and its LayerNorm.
  for hf_key, (ours, transpose) in bert_lib._hf_key_table(config.bert).items():  # pylint: disable=protected-access
    table[("text_encoder",) + ours] = (f"text_encoder.{hf_key}", _LINEAR if transpose else _COPY, None)
  norm("text_projection/norm", "lang_norm")

  # Pixel encoder (Mask2Former's MSDeformAttnPixelDecoder).
  pixel = "sem_seg_head.pixel_decoder"
  input_projections("pixel_encoder", pixel, 3)
  table[("pixel_encoder", "level_embed")] = (f"{pixel}.transformer.level_embed", _COPY, None)
  for i in range(config.pixel_encoder.num_layers):
    ours, theirs = f"pixel_encoder/encoder_layer_{i}", f"{pixel}.transformer.encoder.layers.{i}"
    deformable(f"{ours}/self_attn", f"{theirs}.self_attn")
    norm(f"{ours}/norm1", f"{theirs}.norm1")
    linear(f"{ours}/ffn/fc1", f"{theirs}.linear1")
    linear(f"{ours}/ffn/fc2", f"{theirs}.linear2")
    norm(f"{ours}/norm2", f"{theirs}.norm2")
  conv("pixel_encoder/lateral_conv", f"{pixel}.adapter_1", bias=False)
  norm("pixel_encoder/lateral_norm", f"{pixel}.adapter_1.norm")
  conv("pixel_encoder/output_conv", f"{pixel}.layer_1", bias=False)
  norm("pixel_encoder/output_norm", f"{pixel}.layer_1.norm")
  conv("pixel_encoder/mask_features", f"{pixel}.mask_features")

  # Prompt encoder (the release's TransformerDecoder + the top-level vis_prompts / lang_in_*).
  pe = "prompt_encoder"
  table[(pe, "query_embed")] = ("vis_prompts.weight", _COPY, None)
  table[(pe, "query_pos")] = ("prompt_encoder.vis_prompts_pos.weight", _COPY, None)
  input_projections(pe, "prompt_encoder", 4)
  downscaler = {0: "downscale1.0", 1: "downscale1.3", 2: "downscale1.6", 3: "downscale2.0", 4: "downscale3.0",
                5: "downscale4.0"}
  downscaler_norms = {0: "downscale1.1", 1: "downscale1.4", 3: "downscale2.1", 4: "downscale3.1",
                      5: "downscale4.1"}
  for index, theirs in downscaler.items():
    conv(f"{pe}/prompt_downscaler/conv_{index}", f"prompt_encoder.{theirs}")
  for index, theirs in downscaler_norms.items():
    norm(f"{pe}/prompt_downscaler/norm_{index}", f"prompt_encoder.{theirs}")
  for i in range(config.prompt_encoder.num_layers):
    ours, theirs = f"{pe}/layer_{i}", f"prompt_encoder.layers.{i}"
    deformable(f"{ours}/cross_attn", f"{theirs}.cross_attn")
    norm(f"{ours}/norm1", f"{theirs}.norm1")
    torch_attention(f"{ours}/self_attn", f"{theirs}.self_attn")
    norm(f"{ours}/norm2", f"{theirs}.norm2")
    linear(f"{ours}/ffn/fc1", f"{theirs}.linear1")
    linear(f"{ours}/ffn/fc2", f"{theirs}.linear2")
    norm(f"{ours}/norm3", f"{theirs}.norm3")
  norm(f"{pe}/final_norm", "prompt_encoder.norm")
  linear(f"{pe}/prompt_proj", "lang_in_linear")
  norm(f"{pe}/prompt_norm", "lang_in_norm")

  # Mask decoder (ReLA's MultiScaleMaskedReferringDecoder).
  md, theirs = "mask_decoder", "sem_seg_head.predictor"
  table[(md, "query_features")] = (f"{theirs}.query_feat.weight", _COPY, None)
  table[(md, "query_positions")] = (f"{theirs}.query_embed.weight", _COPY, None)
  table[(md, "level_embed")] = (f"{theirs}.level_embed.weight", _COPY, None)
  if config.pixel_encoder.hidden_dim != config.mask_decoder.hidden_dim:
    for level in range(config.mask_decoder.num_feature_levels):
      conv(f"{md}/input_projection_{level}", f"{theirs}.input_proj.{level}")
  for i in range(config.mask_decoder.num_blocks):
    block = f"{md}/blocks_{i}"
    torch_attention(f"{block}/pixel_cross_attention", f"{theirs}.RIA_layers.{i}.multihead_attn")
    norm(f"{block}/pixel_cross_attention_norm", f"{theirs}.RIA_layers.{i}.norm")
    torch_attention(f"{block}/self_attention", f"{theirs}.RLA_vision.{i}.self_attn")
    norm(f"{block}/self_attention_norm", f"{theirs}.RLA_vision.{i}.norm")
    linear(f"{block}/ffn/fc1", f"{theirs}.transformer_ffn_layers.{i}.linear1")
    linear(f"{block}/ffn/fc2", f"{theirs}.transformer_ffn_layers.{i}.linear2")
    norm(f"{block}/ffn_norm", f"{theirs}.transformer_ffn_layers.{i}.norm")
  linear(f"{md}/blocks_0/prompt_projection", f"{theirs}.lang_proj", bias=False)
  torch_attention(f"{md}/blocks_0/prompt_cross_attention", f"{theirs}.RLA_lang_att.multihead_attn")
  norm(f"{md}/blocks_0/prompt_cross_attention_norm", f"{theirs}.RLA_lang_att.norm")
  table[(md, "blocks_0", "prompt_gate")] = (f"{theirs}.lang_weight", _COPY, None)
  norm(f"{md}/heads/decoder_norm", f"{theirs}.decoder_norm")
  linear(f"{md}/heads/region_head", f"{theirs}.minimap_embed")
  for k in range(3):
    linear(f"{md}/heads/mask_embed/layers_{k}", f"{theirs}.mask_embed.layers.{k}")
  for k in range(2):
    linear(f"{md}/nt_head/layers_{k}", f"{theirs}.nt_embed.layers.{k}")
  return table


def _convert(value: np.ndarray, kind: str, part: int | None) -> np.ndarray:
  if part is not None:
    value = np.split(value, 3, axis=0)[part]
  if kind == _LINEAR:
    return value.T
  if kind == _CONV2D:
    return value.transpose(2, 3, 1, 0)
  if kind == _CONV1D:
    return value[:, :, 0].T
  return value


def _listing(names: Sequence[str], limit: int = 10) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def convert_state_dict(state: Mapping[str, np.ndarray], config: OmniSegNetConfig) -> dict[str, Any]:
  """The release state_dict as our (nested, numpy float32) parameters for `config`.

  Raises:
    ReleaseCheckpointError: naming every missing, unexpected and misshapen key.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from omniris_jax.models.omnisegnet import OmniSegNet  # pylint: disable=g-import-not-at-top

  table = _key_map(config)
  size = 32 * (2 ** max(config.swin.num_stages - 4, 0))
  dummy = dict(image=np.zeros((1, size, size, 3), np.float32), text_ids=np.zeros((1, 2), np.int32),
               text_attention_mask=np.ones((1, 2), np.int32), ref_image=np.zeros((1, size, size, 3), np.float32),
               ref_prompt=np.ones((1, size, size), np.float32))
  abstract = jax.eval_shape(OmniSegNet(config).init, jax.random.key(0), **dummy)
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}
  if set(table) != set(expected):  # a bug in the key map, not in the file
    raise AssertionError(f"convert_release: key map and model disagree: only in the map "
                         f"{_listing(['/'.join(k) for k in set(table) - set(expected)])}; only in the model "
                         f"{_listing(['/'.join(k) for k in set(expected) - set(table)])}")

  used = {theirs for theirs, _, _ in table.values()}
  missing = sorted({theirs for theirs, _, _ in table.values() if theirs not in state})
  unexpected, index_problems = [], []
  for key, value in state.items():
    match = _RELATIVE_POSITION_INDEX.match(key)
    if match:
      if not np.array_equal(value.reshape(-1), swin_lib.relative_position_index(config.swin.window_size).reshape(-1)):
        index_problems.append(key)
    elif key not in used and not _UNUSED.match(key):
      unexpected.append(key)
  params, mismatched = {}, []
  for ours, (theirs, kind, part) in table.items():
    if theirs not in state:
      continue
    value = _convert(np.asarray(state[theirs], np.float32), kind, part)
    if tuple(value.shape) != expected[ours]:
      mismatched.append(f"{theirs} {tuple(state[theirs].shape)} -> {'/'.join(ours)} needs {expected[ours]}")
      continue
    params[ours] = np.array(value, np.float32, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches: {'; '.join(mismatched[:6])}" + (" ..." if len(mismatched) > 6 else ""))
  if index_problems:
    problems.append(f"relative_position_index buffers that are not Swin's for window {config.swin.window_size}: "
                    f"{_listing(index_problems, 3)}")
  if problems:
    raise ReleaseCheckpointError("the state_dict does not fit the release's OmniSegNet with the sizes its shapes "
                                 "give (" + describe(config) + "): " + " | ".join(problems))
  return traverse_util.unflatten_dict(params)


def describe(config: OmniSegNetConfig) -> str:
  """One line of the sizes read from a checkpoint."""
  s, b = config.swin, config.bert
  return (f"Swin C={s.embed_dim} depths={s.depths} heads={s.num_heads} window={s.window_size}; BERT "
          f"{b.num_layers}x{b.hidden_size} vocab {b.vocab_size}; pixel encoder {config.pixel_encoder.num_layers}x"
          f"{config.pixel_encoder.hidden_dim}; prompt encoder {config.prompt_encoder.num_layers}x"
          f"{config.prompt_encoder.hidden_dim} -> {config.prompt_dim}; decoder {config.mask_decoder.num_blocks}x"
          f"{config.mask_decoder.hidden_dim}, {config.mask_decoder.num_queries} region queries")


def load_release_checkpoint(path: str | os.PathLike) -> tuple[OmniSegNetConfig, dict[str, Any]]:
  """(config, params) of the release checkpoint at `path`, for `OmniSegNet(config).apply({'params': params}, ...)`.

  See the module docstring for what is read, checked and dropped.
  """
  state, _ = read_release_file(path)
  config = release_config(state)
  return config, convert_state_dict(state, config)


# ===============================================================================================================
# The release's forward, in its own layout (for parity checks against the PyTorch code)
# ===============================================================================================================


def release_box(mask: np.ndarray) -> np.ndarray:
  """The release's box prompt from a (B, H, W) mask: its tight box [x0, y0, x1 + 1, y1 + 1] filled with ones."""
  mask = np.asarray(mask) > 0
  boxes = np.zeros(mask.shape, np.float32)
  for index, single in enumerate(mask):
    rows, cols = np.flatnonzero(single.any(axis=1)), np.flatnonzero(single.any(axis=0))
    if rows.size and cols.size:
      boxes[index, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1.0
  return boxes


def release_forward(config: OmniSegNetConfig, params: Any, ref_data: Mapping[str, Any] | None = None,
                    supp_data: Mapping[str, Any] | None = None, condition: str = "mask") -> dict[str, np.ndarray]:
  """Our model called the way the release's `OmniSegNet.forward(ref_data, supp_data)` is, in eval mode.

  Args (arrays as numpy or torch CPU tensors, in the release's layout):
    ref_data: the text batch: 'image' (B, 3, H, W) 0..255, 'lang_tokens' and 'lang_mask' (B, 1, L).
    supp_data: the visual batch: 'image' (B, 3, H, W) 0..255, 'supp_image' (B, 3, Hr, Wr) normalised as the
      release's loader does, 'supp_mask' (B, Hr, Wr) 0/1.
    condition: 'mask' uses supp_mask as it is, 'box' its tight box (the release's get_bounding_boxes). A
      scribble is random in the release: pass the scribble itself as supp_mask with 'mask'.

  Returns:
    {'pred_masks': (N, 2, H'/4, W'/4), 'nt_label': (N, 2)} raw logits, N = text rows then visual rows, H' and W'
    the sizes padded to a multiple of 32 as the release pads them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from omniris_jax.models.omnisegnet import OmniSegNet  # pylint: disable=g-import-not-at-top

  if condition not in ("mask", "box"):
    raise ValueError(f"release_forward: condition={condition!r} must be 'mask' or 'box' (a scribble is a binary "
                     "map: pass it as supp_mask with condition='mask')")
  model = OmniSegNet(config)
  mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)

  def array(x):
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)

  def target(images):  # NCHW 0..255 -> NHWC, padded with the mean pixel (0 once normalised) to a multiple of 32
    images = array(images).astype(np.float32).transpose(0, 2, 3, 1)
    pad_h, pad_w = -images.shape[1] % 32, -images.shape[2] % 32
    padded = np.broadcast_to(mean, (images.shape[0], images.shape[1] + pad_h, images.shape[2] + pad_w, 3)).copy()
    padded[:, :images.shape[1], :images.shape[2]] = images
    return padded

  apply = jax.jit(model.apply)
  outputs = []
  if ref_data:
    ids = array(ref_data["lang_tokens"]).reshape(len(ref_data["image"]), -1).astype(np.int32)
    mask = array(ref_data["lang_mask"]).reshape(ids.shape).astype(np.int32)
    outputs.append(apply({"params": params}, target(ref_data["image"]), ids, mask))
  if supp_data:
    reference = array(supp_data["supp_image"]).astype(np.float32).transpose(0, 2, 3, 1) * std + mean
    prompt = array(supp_data["supp_mask"]).astype(np.float32)
    if condition == "box":
      prompt = release_box(prompt)
    outputs.append(apply({"params": params}, target(supp_data["image"]), ref_image=reference, ref_prompt=prompt))
  if not outputs:
    raise ValueError("release_forward: give ref_data (text) and/or supp_data (visual)")
  return {"pred_masks": np.concatenate([np.asarray(o["mask_logits"]).transpose(0, 3, 1, 2) for o in outputs]),
          "nt_label": np.concatenate([np.asarray(o["nt_logits"]) for o in outputs])}


# ===============================================================================================================
# Writing a workdir that the predictor and `--config.init_from` read
# ===============================================================================================================


def trainer_config(model_config: OmniSegNetConfig, resolution: int = RELEASE_RESOLUTION) -> Any:
  """The `configs/joint.py:release` config with this checkpoint's sizes, as the stage 'release' (its config.json)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "joint.py"
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} is missing; run the converter from a checkout of the repository.")
  spec = importlib.util.spec_from_file_location("omniris_release_joint_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("release")
  c.stage, c.init_from, c.run_before = STAGE, None, ()
  c.input.resolution = resolution
  c.input.max_text_len = model_config.max_text_len
  c.model.name, c.model.preset = "omnisegnet", "release"
  c.model.overrides = {name: dataclasses.asdict(getattr(model_config, name))
                       for name in ("swin", "bert", "pixel_encoder", "prompt_encoder", "mask_decoder")}
  c.model.text_encoder_checkpoint = None  # the weights come from the checkpoint; MiniLM's vocab is BERT's uncased
  return c


def write_workdir(out: str | os.PathLike, model_config: OmniSegNetConfig, params: Any,
                  resolution: int = RELEASE_RESOLUTION) -> str:
  """Writes OUT/release/{config.json, checkpoints/0} atomically (a failed write leaves nothing behind)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from omniris_jax import checkpointing  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out).absolute()
  stage_dir = out / STAGE
  if stage_dir.exists():
    raise FileExistsError(f"{str(stage_dir)!r} exists; convert into a new --out directory (or delete it).")
  config = trainer_config(model_config, resolution)
  out.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{STAGE}.", dir=out))
  try:
    (staging / "config.json").write_text(config.to_json_best_effort(indent=2))
    manager = ocp.CheckpointManager(str(staging / "checkpoints"), item_names=(checkpointing.STATE,))
    manager.save(0, args=ocp.args.Composite(**{checkpointing.STATE: ocp.args.PyTreeSave({"params": params})}))
    manager.wait_until_finished()
    manager.close()
    staging.rename(stage_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return str(stage_dir)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m omniris_jax.convert_release",
      description="Convert the authors' published OmniSegNet checkpoint (.pth) into an omniris_jax workdir that "
                  "`python -m omniris_jax.predict --workdir OUT` and `--config.init_from=OUT` read.")
  parser.add_argument("--checkpoint", required=True, help="the release's .pth file (torch.save of train_net.py)")
  parser.add_argument("--out", required=True, help="directory to write OUT/release/{config.json,checkpoints/}")
  parser.add_argument("--resolution", type=int, default=RELEASE_RESOLUTION,
                      help="the square input side images are resized to (the release's INPUT.IMAGE_SIZE, 480)")
  args = parser.parse_args(argv)
  try:
    # The cheap checks first: reading and converting the release's file takes minutes.
    if args.resolution < 32 or args.resolution % 32:
      raise ReleaseCheckpointError(f"--resolution={args.resolution} must be a positive multiple of 32 (the "
                                   "release pads its inputs to one; 480 is what it was trained at)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise FileExistsError(f"--out {args.out!r} is a file; give a directory to write {STAGE}/ into.")
    if os.path.exists(os.path.join(args.out, STAGE)):
      raise FileExistsError(f"{os.path.join(args.out, STAGE)!r} exists; convert into a new --out directory (or "
                            "delete it).")
    state, release_args = read_release_file(args.checkpoint)
    try:
      config = release_config(state)
    except ReleaseCheckpointError as error:
      raise ReleaseCheckpointError(f"{args.checkpoint!r}: {error}") from None
    print(f"Read {len(state)} tensors from {args.checkpoint}: {describe(config)}")
    condition = release_args.get("condition")
    if condition:
      print(f"The checkpoint was trained with visual prompts of type {condition!r} (--condition).")
    params = convert_state_dict(state, config)
    stage_dir = write_workdir(args.out, config, params, args.resolution)
  except (ImportError, FileNotFoundError, FileExistsError, ReleaseCheckpointError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"Wrote {stage_dir}. Try: python -m omniris_jax.predict --workdir {args.out} --image IMAGE --text TEXT "
        "--out overlay.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
