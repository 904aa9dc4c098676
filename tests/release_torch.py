"""A PyTorch restatement of the authors' released OmniSegNet, eval mode only, for checking ports against it.

Written from a reading of the release (github.com/As-Time-Goes-By/OmniSegNet: OmniSegNet_model/models/OmniSegNet/
OmniSegNet.py and the modules it builds), not copied from it. Every submodule, parameter and buffer is registered
under the name and with the shape the release's model has, in the same order, so `state_dict()` of this module
and of the authors' model load into each other (1035 entries for the released size, see the tests). detectron2,
timm and the compiled deformable-attention op are not needed: what the release takes from them is restated here
(detectron2's Conv2d with a `norm` submodule and its ImageList padding; the pure-PyTorch grid_sample path of
multi-scale deformable attention; DropPath and dropout are identities in eval).

Only the eval forward is restated (no losses, no training-time scribbles). Inputs follow the release's loaders:

  ref_data:  'image' (B, 3, H, W) float in 0..255, 'lang_tokens' (B, 1, L) int64, 'lang_mask' (B, 1, L) int64.
  supp_data: 'image' (B, 3, H, W) float in 0..255 (the targets), 'supp_image' (B, 3, Hs, Ws) already normalised
             (`normalise_reference`), 'supp_mask' (B, Hs, Ws) 0/1.

`ReleaseOmniSegNet.forward` returns {'pred_masks': (N, 2, Hp/4, Wp/4) logits, 'nt_label': (N, 2) logits,
'pred_masks_full': pred_masks resized to the padded input (Hp, Wp)}, text examples first. The release applies a
sigmoid to the last two in `refer_inference`; they are returned raw here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
import transformers

PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
# The reference loader's torchvision Normalize constants (on images scaled to 0..1); x255 they are the above.
_LOADER_MEAN = (0.485, 0.456, 0.406)
_LOADER_STD = (0.229, 0.224, 0.225)


def _bert_base() -> transformers.BertConfig:
  return transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


@dataclasses.dataclass
class ReleaseConfig:
  """Every size of the released model; the defaults are the published Swin-B model."""
  image_size: int = 480  # the loaders resize targets and references to this square (train.sh IMG_SIZE)
  swin_embed_dim: int = 128
  swin_depths: tuple[int, ...] = (2, 2, 18, 2)
  swin_heads: tuple[int, ...] = (4, 8, 16, 32)
  swin_window: int = 12
  swin_patch: int = 4
  swin_mlp_ratio: float = 4.0
  hidden_dim: int = 256  # pixel decoder conv_dim = mask_dim = decoder hidden = prompt encoder d_model
  num_heads: int = 8  # decoder, deformable encoder and prompt encoder heads
  dec_layers: int = 9  # DEC_LAYERS 10 minus one
  enc_layers: int = 6  # deformable encoder layers of the pixel decoder
  enc_ffn: int = 1024
  enc_points: int = 4
  dec_ffn: int = 2048
  prompt_layers: int = 3
  prompt_ffn: int = 2048
  prompt_levels: int = 4
  prompt_points: int = 4
  num_queries: int = 100
  num_prompts: int = 20
  prompt_grid: tuple[int, int] = (4, 5)  # the fixed reference-point grid of the prompt encoder (rows, cols)
  mask_in_chans: int = 16
  group_norm_groups: int = 32
  lang_dim: int = 768  # hard-coded 768 in the release; must equal bert.hidden_size
  rla_weight: float = 0.1
  size_divisibility: int = 32
  bert: transformers.BertConfig = dataclasses.field(default_factory=_bert_base)

  def __post_init__(self):
    if self.lang_dim != self.bert.hidden_size:
      raise ValueError(f"lang_dim {self.lang_dim} must equal the BERT hidden size {self.bert.hidden_size}")
    if self.prompt_grid[0] * self.prompt_grid[1] != self.num_prompts:
      raise ValueError(f"prompt_grid {self.prompt_grid} must hold num_prompts={self.num_prompts} points")
    if not len(self.swin_depths) == len(self.swin_heads) == 4:
      raise ValueError("the release has four Swin stages")

  @property
  def swin_widths(self) -> tuple[int, ...]:
    return tuple(self.swin_embed_dim * 2**i for i in range(len(self.swin_depths)))

  @classmethod
  def tiny(cls) -> "ReleaseConfig":
    """64x64 images; window 3 makes every stage pad and run shifted windows with the -100 mask."""
    bert = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=40, type_vocab_size=2)
    return cls(image_size=64, swin_embed_dim=32, swin_depths=(2, 2, 2, 2), swin_heads=(1, 2, 4, 8), swin_window=3,
               hidden_dim=64, num_heads=8, dec_layers=9, enc_layers=2, enc_ffn=128, dec_ffn=128, prompt_layers=2,
               prompt_ffn=128, num_queries=100, group_norm_groups=32, lang_dim=64, bert=bert)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by several parts


def normalise_reference(image_0_255: torch.Tensor) -> torch.Tensor:
  """The reference loader's normalisation: ToTensor's /255, then Normalize with the ImageNet mean/std.

  Equal (up to float rounding) to (x - PIXEL_MEAN) / PIXEL_STD. Takes (3, H, W) or (B, 3, H, W) in 0..255.
  """
  x = image_0_255.to(torch.float32).div(255)
  mean = torch.tensor(_LOADER_MEAN, dtype=torch.float32, device=x.device).view(-1, 1, 1)
  std = torch.tensor(_LOADER_STD, dtype=torch.float32, device=x.device).view(-1, 1, 1)
  return x.sub(mean).div(std)


def release_box(mask: torch.Tensor) -> torch.Tensor:
  """get_bounding_boxes' box map: per (H, W) map the tight box [x0, y0, x1 + 1, y1 + 1) filled with ones.

  Same dtype as `mask`; an empty mask gives an all-zero map.
  """
  box_mask = torch.zeros_like(mask)
  cols = torch.any(mask, dim=1)
  rows = torch.any(mask, dim=2)
  for i in range(mask.shape[0]):
    xs = torch.where(cols[i])[0]
    ys = torch.where(rows[i])[0]
    if len(xs) > 0 and len(ys) > 0:
      box_mask[i, int(ys[0]):int(ys[-1]) + 1, int(xs[0]):int(xs[-1]) + 1] = 1
  return box_mask


def _sine_position(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
  """PositionEmbeddingSine(num_pos_feats, normalize=True) of a (B, C, H, W) map with no padding mask."""
  not_mask = torch.ones((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
  y_embed = not_mask.cumsum(1, dtype=torch.float32)
  x_embed = not_mask.cumsum(2, dtype=torch.float32)
  eps, scale = 1e-6, 2 * math.pi
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
  pos_x = x_embed[:, :, :, None] / dim_t
  pos_y = y_embed[:, :, :, None] / dim_t
  pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
  pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
  return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class _D2Conv2d(nn.Conv2d):
  """detectron2.layers.Conv2d: a conv, then the optional submodule `norm`, then the optional activation."""

  def __init__(self, *args, norm: Optional[nn.Module] = None, activation=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.norm = norm
    self.activation = activation

  def forward(self, x):
    x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    if self.norm is not None:
      x = self.norm(x)
    if self.activation is not None:
      x = self.activation(x)
    return x


class _MLP(nn.Module):
  """`layers.{i}` Linear layers with ReLU between them."""

  def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
    super().__init__()
    self.num_layers = num_layers
    dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
    dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
    return x


class _LayerNorm2d(nn.Module):
  """Channel LayerNorm of (B, C, H, W) maps, eps 1e-6, written out as the release does."""

  def __init__(self, num_channels: int, eps: float = 1e-6):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(num_channels))
    self.bias = nn.Parameter(torch.zeros(num_channels))
    self.eps = eps

  def forward(self, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention (the pure-PyTorch grid_sample path of both releases of it)


def _deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights):
  n, _, m, d = value.shape
  _, lq, m, nl, p, _ = sampling_locations.shape
  shapes = [(int(h), int(w)) for h, w in spatial_shapes]
  value_list = value.split([h * w for h, w in shapes], dim=1)
  sampling_grids = 2 * sampling_locations - 1
  sampled = []
  for lid, (h, w) in enumerate(shapes):
    value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
    grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
    sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
  attention_weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * attention_weights).sum(-1).view(n, m * d, lq)
  return out.transpose(1, 2).contiguous()


def _polar_offsets(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
  """Deformable DETR's initial sampling_offsets bias: one direction per head, radius 1..n_points."""
  thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
  grid = torch.stack([thetas.cos(), thetas.sin()], -1)
  grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
  for i in range(n_points):
    grid[:, :, i, :] *= i + 1
  return grid.view(-1)


class _MSDeformAttn(nn.Module):
  """MSDeformAttn (pixel decoder) / MultiScaleDeformableAttention (prompt encoder), batch first, 2-d points."""

  def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
    super().__init__()
    self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
    self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
    self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
    self.value_proj = nn.Linear(d_model, d_model)
    self.output_proj = nn.Linear(d_model, d_model)
    with torch.no_grad():
      if not self.sampling_offsets.bias.is_meta:
        self.sampling_offsets.bias.copy_(_polar_offsets(n_heads, n_levels, n_points))

  def forward(self, query, reference_points, input_flatten, spatial_shapes, padding_mask=None):
    n, len_q, _ = query.shape
    _, len_in, _ = input_flatten.shape
    value = self.value_proj(input_flatten)
    if padding_mask is not None:
      value = value.masked_fill(padding_mask[..., None], float(0))
    value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
    offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
    weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
    weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return self.output_proj(_deform_attn_core(value, spatial_shapes, locations, weights))


# ----------------------------------------------------------------------------------------------------------------
# Backbone: the multi-modal Swin transformer (LAVT-style PWAM fusion after every stage)


def _window_partition(x, ws):
  b, h, w, c = x.shape
  x = x.view(b, h // ws, ws, w // ws, ws, c)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows, ws, h, w):
  b = int(windows.shape[0] / (h * w / ws / ws))
  x = windows.view(b, h // ws, w // ws, ws, ws, -1)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class _SwinMlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _WindowAttention(nn.Module):

  def __init__(self, dim, window, num_heads):
    super().__init__()
    self.dim, self.window, self.num_heads = dim, window, num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) * (2 * window - 1), num_heads))
    coords = torch.stack(torch.meshgrid([torch.arange(window), torch.arange(window)], indexing="ij"))
    coords = torch.flatten(coords, 1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    self.register_buffer("relative_position_index", rel.sum(-1))
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask=None):
    b_, n, c = x.shape
    qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * self.scale
    attn = q @ k.transpose(-2, -1)
    ww = self.window * self.window
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(ww, ww, -1)
    attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
      nw = mask.shape[0]
      attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
      attn = attn.view(-1, self.num_heads, n, n)
    attn = F.softmax(attn, dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return self.proj(x)


class _SwinBlock(nn.Module):

  def __init__(self, dim, num_heads, window, shift, mlp_ratio):
    super().__init__()
    self.window, self.shift = window, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = _WindowAttention(dim, window, num_heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = _SwinMlp(dim, int(dim * mlp_ratio))

  def forward(self, x, h, w, mask_matrix):
    b, length, c = x.shape
    assert length == h * w
    shortcut = x
    x = self.norm1(x).view(b, h, w, c)
    ws = self.window
    pad_r = (ws - w % ws) % ws
    pad_b = (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, hp, wp, _ = x.shape
    if self.shift > 0:
      shifted = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
      attn_mask = mask_matrix
    else:
      shifted = x
      attn_mask = None
    windows = _window_partition(shifted, ws).view(-1, ws * ws, c)
    windows = self.attn(windows, mask=attn_mask).view(-1, ws, ws, c)
    shifted = _window_reverse(windows, ws, hp, wp)
    x = torch.roll(shifted, shifts=(self.shift, self.shift), dims=(1, 2)) if self.shift > 0 else shifted
    if pad_r > 0 or pad_b > 0:
      x = x[:, :h, :w, :].contiguous()
    x = shortcut + x.view(b, h * w, c)
    return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim)

  def forward(self, x, h, w):
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    if h % 2 == 1 or w % 2 == 1:
      x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)
    return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _PatchEmbed(nn.Module):

  def __init__(self, patch, embed_dim):
    super().__init__()
    self.patch, self.embed_dim = patch, embed_dim
    self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch)
    self.norm = nn.LayerNorm(embed_dim)

  def forward(self, x):
    _, _, h, w = x.size()
    if w % self.patch != 0:
      x = F.pad(x, (0, self.patch - w % self.patch))
    if h % self.patch != 0:
      x = F.pad(x, (0, 0, 0, self.patch - h % self.patch))
    x = self.proj(x)
    wh, ww = x.size(2), x.size(3)
    x = self.norm(x.flatten(2).transpose(1, 2))
    return x.transpose(1, 2).view(-1, self.embed_dim, wh, ww)


class _ImageLangAttention(nn.Module):
  """SpatialImageLanguageAttention with one head: pixels attend to words (or visual prompt tokens)."""

  def __init__(self, v_in, l_in, key_channels, value_channels):
    super().__init__()
    self.key_channels, self.value_channels, self.num_heads = key_channels, value_channels, 1
    self.f_key = nn.Sequential(nn.Conv1d(l_in, key_channels, kernel_size=1, stride=1))
    self.f_query = nn.Sequential(nn.Conv1d(v_in, key_channels, kernel_size=1, stride=1),
                                 nn.InstanceNorm1d(key_channels))
    self.f_value = nn.Sequential(nn.Conv1d(l_in, value_channels, kernel_size=1, stride=1))
    self.W = nn.Sequential(nn.Conv1d(value_channels, value_channels, kernel_size=1, stride=1),
                           nn.InstanceNorm1d(value_channels))

  def forward(self, x, l, l_mask):
    b, hw = x.size(0), x.size(1)
    x = x.permute(0, 2, 1)
    l_mask = l_mask.permute(0, 2, 1)  # (B, 1, L)
    query = self.f_query(x).permute(0, 2, 1)
    key = self.f_key(l) * l_mask
    value = self.f_value(l) * l_mask
    n_l = value.size(-1)
    heads = self.num_heads
    query = query.reshape(b, hw, heads, self.key_channels // heads).permute(0, 2, 1, 3)
    key = key.reshape(b, heads, self.key_channels // heads, n_l)
    value = value.reshape(b, heads, self.value_channels // heads, n_l)
    l_mask = l_mask.unsqueeze(1)
    sim = torch.matmul(query, key)
    sim = (self.key_channels ** -.5) * sim
    sim = sim + (1e4 * l_mask - 1e4)
    sim = F.softmax(sim, dim=-1)
    out = torch.matmul(sim, value.permute(0, 1, 3, 2))
    out = out.permute(0, 2, 1, 3).contiguous().reshape(b, hw, self.value_channels).permute(0, 2, 1)
    return self.W(out).permute(0, 2, 1)


class _PWAM(nn.Module):

  def __init__(self, dim, l_in):
    super().__init__()
    self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1, 1), nn.GELU(), nn.Dropout(0.0))
    self.image_lang_att = _ImageLangAttention(dim, l_in, dim, dim)
    self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1, 1), nn.GELU(), nn.Dropout(0.0))

  def forward(self, x, l, l_mask):
    vis = self.vis_project(x.permute(0, 2, 1))
    lang = self.image_lang_att(x, l, l_mask).permute(0, 2, 1)
    mm = self.project_mm(torch.mul(vis, lang))
    return mm.permute(0, 2, 1)


class _MMBasicLayer(nn.Module):

  def __init__(self, dim, depth, num_heads, window, mlp_ratio, lang_dim, downsample: bool):
    super().__init__()
    self.window, self.shift = window, window // 2
    self.blocks = nn.ModuleList([
        _SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)])
    self.fusion = _PWAM(dim, lang_dim)
    if downsample:
      self.downsample = _PatchMerging(dim)
      self.res_gate = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                    nn.Tanh())
    else:
      self.downsample = None
      self.res_gate = None

  def _shift_mask(self, h, w, device):
    ws, sh = self.window, self.shift
    hp = int(math.ceil(h / ws)) * ws
    wp = int(math.ceil(w / ws)) * ws
    img_mask = torch.zeros((1, hp, wp, 1), device=device)
    slices = (slice(0, -ws), slice(-ws, -sh), slice(-sh, None))
    cnt = 0
    for hs in slices:
      for wsl in slices:
        img_mask[:, hs, wsl, :] = cnt
        cnt += 1
    mask_windows = _window_partition(img_mask, ws).view(-1, ws * ws)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))

  def forward(self, x, h, w, l, l_mask):
    attn_mask = self._shift_mask(h, w, x.device)
    for blk in self.blocks:
      x = blk(x, h, w, attn_mask)
    x_residual = self.fusion(x, l, l_mask) if l is not None else x
    if self.downsample is not None:
      if l is not None:
        x = x + (self.res_gate(x_residual) * x_residual)
      x_down = self.downsample(x, h, w)
      return x_residual, h, w, x_down, (h + 1) // 2, (w + 1) // 2
    return x_residual, h, w, None, h, w


class _MultiModalSwin(nn.Module):
  """MultiModalSwinTransformer / D2SwinTransformer: returns {'res2'..'res5'} (B, C_i, H/2^(i+2), W/2^(i+2))."""

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    self.num_features = list(cfg.swin_widths)
    self.patch_embed = _PatchEmbed(cfg.swin_patch, cfg.swin_embed_dim)
    self.pos_drop = nn.Dropout(0.0)
    n = len(cfg.swin_depths)
    self.layers = nn.ModuleList([
        _MMBasicLayer(self.num_features[i], cfg.swin_depths[i], cfg.swin_heads[i], cfg.swin_window,
                      cfg.swin_mlp_ratio, cfg.lang_dim, downsample=i < n - 1) for i in range(n)])
    for i in range(n):
      self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

  def forward(self, x, l, l_mask):
    x = self.patch_embed(x)
    wh, ww = x.size(2), x.size(3)
    x = self.pos_drop(x.flatten(2).transpose(1, 2))
    outs = {}
    for i, layer in enumerate(self.layers):
      x_out, h, w, x, wh, ww = layer(x, wh, ww, l, l_mask)
      x_out = getattr(self, f"norm{i}")(x_out)
      outs[f"res{i + 2}"] = x_out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
    return outs


# ----------------------------------------------------------------------------------------------------------------
# sem_seg_head.pixel_decoder: MSDeformAttnPixelDecoder (deformable encoder on res3..res5, one FPN level on res2)


class _EncoderLayer(nn.Module):

  def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
    super().__init__()
    self.self_attn = _MSDeformAttn(d_model, n_levels, n_heads, n_points)
    self.norm1 = nn.LayerNorm(d_model)
    self.linear1 = nn.Linear(d_model, d_ffn)
    self.linear2 = nn.Linear(d_ffn, d_model)
    self.norm2 = nn.LayerNorm(d_model)

  def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
    src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
    src = self.norm1(src + src2)
    src2 = self.linear2(F.relu(self.linear1(src)))
    return self.norm2(src + src2)


class _Encoder(nn.Module):

  def __init__(self, cfg: ReleaseConfig, n_levels):
    super().__init__()
    self.layers = nn.ModuleList([
        _EncoderLayer(cfg.hidden_dim, cfg.enc_ffn, n_levels, cfg.num_heads, cfg.enc_points)
        for _ in range(cfg.enc_layers)])

  @staticmethod
  def reference_points(spatial_shapes, valid_ratios, device):
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
      h, w = int(h), int(w)
      ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                    indexing="ij")
      ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
      ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
      refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

  def forward(self, src, spatial_shapes, valid_ratios, pos, padding_mask):
    ref = self.reference_points(spatial_shapes, valid_ratios, src.device)
    out = src
    for layer in self.layers:
      out = layer(out, pos, ref, spatial_shapes, padding_mask)
    return out


class _EncoderOnly(nn.Module):

  def __init__(self, cfg: ReleaseConfig, n_levels):
    super().__init__()
    self.encoder = _Encoder(cfg, n_levels)
    self.level_embed = nn.Parameter(torch.zeros(n_levels, cfg.hidden_dim))

  @staticmethod
  def _valid_ratio(mask):
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

  def forward(self, srcs, pos_embeds):
    masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
    src_flat, mask_flat, pos_flat, shapes = [], [], [], []
    for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
      shapes.append(src.shape[-2:])
      src_flat.append(src.flatten(2).transpose(1, 2))
      mask_flat.append(mask.flatten(1))
      pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
    src_flat = torch.cat(src_flat, 1)
    mask_flat = torch.cat(mask_flat, 1)
    pos_flat = torch.cat(pos_flat, 1)
    spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=src_flat.device)
    level_start = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([self._valid_ratio(m) for m in masks], 1)
    memory = self.encoder(src_flat, spatial_shapes, valid_ratios, pos_flat, mask_flat)
    return memory, spatial_shapes, level_start


class _PixelDecoder(nn.Module):
  IN_FEATURES = ("res2", "res3", "res4", "res5")
  TRANSFORMER_IN_FEATURES = ("res3", "res4", "res5")

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    widths = dict(zip(self.IN_FEATURES, cfg.swin_widths))
    d, groups = cfg.hidden_dim, cfg.group_norm_groups
    self.input_proj = nn.ModuleList([
        nn.Sequential(nn.Conv2d(widths[f], d, kernel_size=1), nn.GroupNorm(groups, d))
        for f in self.TRANSFORMER_IN_FEATURES[::-1]])
    self.transformer = _EncoderOnly(cfg, len(self.TRANSFORMER_IN_FEATURES))
    self.hidden_dim = d
    self.mask_features = _D2Conv2d(d, d, kernel_size=1, stride=1, padding=0)
    # One FPN level (stride 8 -> common stride 4): detectron2 Conv2d with GN, no bias.
    self.add_module("adapter_1", _D2Conv2d(widths["res2"], d, kernel_size=1, bias=False,
                                           norm=nn.GroupNorm(groups, d)))
    self.add_module("layer_1", _D2Conv2d(d, d, kernel_size=3, stride=1, padding=1, bias=False,
                                         norm=nn.GroupNorm(groups, d), activation=F.relu))

  def forward_features(self, features):
    srcs, pos = [], []
    for idx, f in enumerate(self.TRANSFORMER_IN_FEATURES[::-1]):
      x = features[f].float()
      srcs.append(self.input_proj[idx](x))
      pos.append(_sine_position(x, self.hidden_dim // 2))
    y, spatial_shapes, level_start = self.transformer(srcs, pos)
    bs = y.shape[0]
    n = len(srcs)
    sections = [int(level_start[i + 1] - level_start[i]) if i < n - 1 else int(y.shape[1] - level_start[i])
                for i in range(n)]
    out = [z.transpose(1, 2).view(bs, -1, int(spatial_shapes[i][0]), int(spatial_shapes[i][1]))
           for i, z in enumerate(torch.split(y, sections, dim=1))]
    x = features["res2"].float()
    cur_fpn = self.adapter_1(x)
    y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
    out.append(self.layer_1(y))
    return self.mask_features(out[-1]), out[0], out[:3]


# ----------------------------------------------------------------------------------------------------------------
# sem_seg_head.predictor: MultiScaleMaskedReferringDecoder


class _SelfAttentionLayer(nn.Module):

  def __init__(self, d_model, nhead):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
    self.norm = nn.LayerNorm(d_model)

  def forward(self, tgt, query_pos):
    q = k = tgt + query_pos
    tgt2 = self.self_attn(q, k, value=tgt, attn_mask=None, key_padding_mask=None)[0]
    return self.norm(tgt + tgt2)


class _CrossAttentionLayer(nn.Module):

  def __init__(self, d_model, nhead):
    super().__init__()
    self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
    self.norm = nn.LayerNorm(d_model)

  def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
    q = tgt if query_pos is None else tgt + query_pos
    k = memory if pos is None else memory + pos
    tgt2 = self.multihead_attn(query=q, key=k, value=memory, attn_mask=memory_mask, key_padding_mask=None)[0]
    return self.norm(tgt + tgt2)


class _FFNLayer(nn.Module):

  def __init__(self, d_model, dim_feedforward):
    super().__init__()
    self.linear1 = nn.Linear(d_model, dim_feedforward)
    self.linear2 = nn.Linear(dim_feedforward, d_model)
    self.norm = nn.LayerNorm(d_model)

  def forward(self, tgt):
    return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class _ReferringDecoder(nn.Module):
  NUM_LEVELS = 3

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    d = cfg.hidden_dim
    self.hidden_dim, self.num_heads, self.num_layers, self.rla_weight = d, cfg.num_heads, cfg.dec_layers, \
        cfg.rla_weight
    self.RLA_vision = nn.ModuleList([_SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.dec_layers)])
    self.RIA_layers = nn.ModuleList([_CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.dec_layers)])
    self.transformer_ffn_layers = nn.ModuleList([_FFNLayer(d, cfg.dec_ffn) for _ in range(cfg.dec_layers)])
    self.decoder_norm = nn.LayerNorm(d)
    self.query_feat = nn.Embedding(cfg.num_queries, d)
    self.query_embed = nn.Embedding(cfg.num_queries, d)
    self.lang_proj = nn.Linear(cfg.lang_dim, d, bias=False)
    self.lang_weight = nn.Parameter(torch.as_tensor(0.))
    self.RLA_lang_att = _CrossAttentionLayer(d, cfg.num_heads)
    self.level_embed = nn.Embedding(self.NUM_LEVELS, d)
    # The pixel decoder's features already have hidden_dim channels, so the release's projections are empty.
    self.input_proj = nn.ModuleList([nn.Sequential() for _ in range(self.NUM_LEVELS)])
    self.minimap_embed = nn.Linear(d, 2)  # num_classes (1) + 1
    self.nt_embed = _MLP(d, d, 2, 2)
    self.mask_embed = _MLP(d, d, d, 3)

  def forward(self, x, mask_features, lang_feat):
    src, pos, size_list = [], [], []
    for i in range(self.NUM_LEVELS):
      size_list.append(x[i].shape[-2:])
      pos.append(_sine_position(x[i], self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
      src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    bs = src[0].shape[1]
    query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
    _, attn_mask, tgt_mask, nt_label = self._heads(output, mask_features, size_list[0])
    for i in range(self.num_layers):
      level = i % self.NUM_LEVELS
      attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
      output = self.RIA_layers[i](output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_embed)
      if i == 0:
        lang = self.lang_proj(lang_feat.permute(0, 2, 1))
        lang = self.RLA_lang_att(output, lang.permute(1, 0, 2)) * torch.sigmoid(self.lang_weight)
        output = output + lang * self.rla_weight
      output = self.RLA_vision[i](output, query_pos=query_embed)
      output = self.transformer_ffn_layers[i](output)
      _, attn_mask, tgt_mask, nt_label = self._heads(output, mask_features, size_list[(i + 1) % self.NUM_LEVELS])
    return {"pred_masks": tgt_mask, "nt_label": nt_label}

  def _heads(self, output, mask_features, target_size):
    region = self.decoder_norm(output).transpose(0, 1)
    region_embed = self.mask_embed(region)
    all_mask = torch.einsum("bqc,bchw->bqhw", region_embed, mask_features)
    minimap = self.minimap_embed(region)
    tgt_embed = torch.einsum("bqa,bqc->bac", minimap, region_embed)
    tgt_mask = torch.einsum("bac,bchw->bahw", tgt_embed, mask_features)
    nt_label = self.nt_embed(region).mean(dim=1)
    attn_mask = F.interpolate(all_mask, size=target_size, mode="bilinear", align_corners=False)
    attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
                 < 0.5).bool().detach()
    return all_mask, attn_mask, tgt_mask, nt_label


class _ReferringHead(nn.Module):

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    self.pixel_decoder = _PixelDecoder(cfg)
    self.predictor = _ReferringDecoder(cfg)

  def forward(self, features, lang_feat):
    mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
    return self.predictor(multi_scale, mask_features, lang_feat)  # the release passes lang_mask=None here


# ----------------------------------------------------------------------------------------------------------------
# prompt_encoder: a deformable decoder whose 20 learned prompts read the reference image's features, with the
# values outside the (nearest-resized) prompt zeroed and the downscaled prompt map added to each level.


class _PromptLayer(nn.Module):
  """DeformableTransformerDecoderLayer: deformable cross-attention, then self-attention, then the FFN."""

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    d = cfg.hidden_dim
    self.cross_attn = _MSDeformAttn(d, cfg.prompt_levels, cfg.num_heads, cfg.prompt_points)
    self.norm1 = nn.LayerNorm(d)
    self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=0.0, batch_first=True)
    self.norm2 = nn.LayerNorm(d)
    self.linear1 = nn.Linear(d, cfg.prompt_ffn)
    self.linear2 = nn.Linear(cfg.prompt_ffn, d)
    self.norm3 = nn.LayerNorm(d)

  def forward(self, tgt, query_pos, reference_points, memory, key_padding_mask, spatial_shapes):
    tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, key_padding_mask)
    tgt = self.norm1(tgt + tgt2)
    q = k = tgt + query_pos
    tgt2 = self.self_attn(q, k, tgt, attn_mask=None)[0]
    tgt = self.norm2(tgt + tgt2)
    tgt2 = self.linear2(F.relu(self.linear1(tgt)))
    return self.norm3(tgt + tgt2)


class _PromptEncoder(nn.Module):
  IN_FEATURES = ("res2", "res3", "res4", "res5")

  def __init__(self, cfg: ReleaseConfig):
    super().__init__()
    d, c = cfg.hidden_dim, cfg.mask_in_chans
    self.hidden_dim, self.grid = d, cfg.prompt_grid
    self.layers = nn.ModuleList([_PromptLayer(cfg) for _ in range(cfg.prompt_layers)])
    self.norm = nn.LayerNorm(d)
    self.ref_point_head = _MLP(2 * d, d, d, 2)  # never used (query_dim 4 // 2 * d_model inputs)
    widths = dict(zip(self.IN_FEATURES, cfg.swin_widths))
    self.input_proj = nn.ModuleList([
        nn.Sequential(nn.Conv2d(widths[f], d, kernel_size=1), nn.GroupNorm(cfg.group_norm_groups, d))
        for f in self.IN_FEATURES[::-1]])
    self.vis_prompts_pos = nn.Embedding(cfg.num_prompts, d)
    self.level_embed = nn.Parameter(torch.zeros(cfg.prompt_levels, d))  # only reaches memory_pos: unused
    self.refpoint_embed = nn.Embedding(cfg.num_prompts, 4)  # never used
    self.reference_points = nn.Parameter(torch.zeros(cfg.num_prompts, 4, 2))  # never used
    self.downscale1 = nn.Sequential(
        nn.Conv2d(1, c // 4, kernel_size=2, stride=2), _LayerNorm2d(c // 4), nn.ReLU(),
        nn.Conv2d(c // 4, c, kernel_size=2, stride=2), _LayerNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, d, kernel_size=1))
    for i in (2, 3, 4):
      self.add_module(f"downscale{i}", nn.Sequential(nn.Conv2d(d, d, kernel_size=2, stride=2), _LayerNorm2d(d),
                                                     nn.ReLU()))

  def _grid_points(self, device):
    h, w = self.grid
    ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                  torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                  indexing="ij")
    ref = torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1)
    return ref[:, :, None]  # (1, num_prompts, 1, 2): broadcast over batch and levels

  def forward(self, supp_features, supp_masks, target):
    srcs, pos, masks, keep = [], [], [], []
    prompt = supp_masks.unsqueeze(1).float()
    for idx, f in enumerate(self.IN_FEATURES[::-1]):
      x = supp_features[f].float()
      srcs.append(self.input_proj[idx](x))
      pos.append(_sine_position(x, self.hidden_dim // 2))
      prompt = getattr(self, f"downscale{idx + 1}")(prompt)  # strides 4, 8, 16, 32 in turn
      keep.append(F.interpolate(supp_masks.unsqueeze(1).float(), size=x.shape[-2:], mode="nearest")
                  .squeeze(1).to(torch.int64))
      masks.append(prompt)
    src_flat, keep_flat, shapes = [], [], []
    for src, mask, kp in zip(srcs, masks[::-1], keep):
      if src.shape != mask.shape:
        raise ValueError(f"prompt map {tuple(mask.shape)} does not match features {tuple(src.shape)}: the "
                         "reference image must be a multiple of 32 on each side")
      shapes.append(src.shape[-2:])
      src_flat.append((src + mask).flatten(2).transpose(1, 2))
      keep_flat.append(kp.flatten(1).to(torch.bool))
    memory = torch.cat(src_flat, 1)
    keep_flat = torch.cat(keep_flat, 1)
    spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=memory.device)
    output = target
    output_pos = self.vis_prompts_pos.weight.unsqueeze(0).repeat(memory.shape[0], 1, 1)
    ref = self._grid_points(output.device)
    for layer in self.layers:
      output = layer(output, output_pos, ref, memory, ~keep_flat, spatial_shapes)
    return self.norm(output)


# ----------------------------------------------------------------------------------------------------------------
# The top-level model


class ReleaseOmniSegNet(nn.Module):
  """The released OmniSegNet (eval forward), with the release's state_dict names and shapes."""

  def __init__(self, cfg: ReleaseConfig | None = None):
    super().__init__()
    cfg = cfg or ReleaseConfig()
    self.cfg = cfg
    self.backbone = _MultiModalSwin(cfg)
    self.sem_seg_head = _ReferringHead(cfg)
    self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    bert_cfg = copy.deepcopy(cfg.bert)
    bert_cfg._attn_implementation = "eager"  # pylint: disable=protected-access
    self.text_encoder = transformers.BertModel(bert_cfg, add_pooling_layer=False)
    self.feature_map_proj = nn.Conv2d(sum(cfg.swin_widths), cfg.hidden_dim, kernel_size=1)  # never used
    self.lang_in_linear = nn.Linear(cfg.hidden_dim, cfg.lang_dim)
    self.lang_in_norm = nn.LayerNorm(cfg.lang_dim)
    self.lang_norm = nn.LayerNorm(cfg.lang_dim)
    self.prompt_encoder = _PromptEncoder(cfg)
    self.vis_prompts = nn.Embedding(cfg.num_prompts, cfg.hidden_dim)

  def _pad(self, images: torch.Tensor) -> torch.Tensor:
    """Normalise, then pad bottom/right with zeros to a multiple of size_divisibility (ImageList.from_tensors)."""
    images = (images - self.pixel_mean) / self.pixel_std
    s = self.cfg.size_divisibility
    h, w = images.shape[-2:]
    hp, wp = (h + s - 1) // s * s, (w + s - 1) // s * s
    return F.pad(images, [0, wp - w, 0, hp - h], value=0.0)

  def forward(self, ref_data=None, supp_data=None, condition: str = "mask"):
    ref_data = ref_data or {}
    supp_data = supp_data or {}
    ref_image, supp_target = ref_data.get("image"), supp_data.get("image")
    if ref_image is not None and supp_target is not None:
      images = torch.cat([ref_image, supp_target], dim=0)
    elif supp_target is not None:
      images = supp_target
    elif ref_image is not None:
      images = ref_image
    else:
      raise ValueError("no target image")
    images = self._pad(images.float())

    ref_feat = ref_mask = None
    if ref_data.get("lang_tokens") is not None:
      tokens = ref_data["lang_tokens"].squeeze(1)
      lang_mask = ref_data["lang_mask"].squeeze(1)
      lang = self.lang_norm(self.text_encoder(tokens, attention_mask=lang_mask)[0])
      ref_feat = lang.permute(0, 2, 1)  # (B, lang_dim, L)
      ref_mask = lang_mask.unsqueeze(dim=-1)  # (B, L, 1)

    supp_feat = supp_mask = None
    if supp_data.get("supp_image") is not None:
      supp_images = supp_data["supp_image"]
      prompts = supp_data["supp_mask"]
      if condition == "box":
        prompts = release_box(prompts)
      elif condition != "mask":
        raise NotImplementedError(f"condition {condition!r}: give a scribble as supp_mask with condition='mask'")
      feats = self.backbone(supp_images, None, None)
      target = self.vis_prompts.weight.unsqueeze(0).repeat(supp_images.shape[0], 1, 1)
      tokens = self.prompt_encoder(feats, prompts, target)
      visual_masks = torch.ones(tokens.shape[0], tokens.shape[1], device=tokens.device)
      tokens = self.lang_in_norm(self.lang_in_linear(tokens))
      supp_feat = tokens.permute(0, 2, 1)
      supp_mask = visual_masks.unsqueeze(dim=-1)

    if ref_feat is not None and supp_feat is not None:
      if ref_feat.shape[-1] != supp_feat.shape[-1]:
        raise ValueError(f"the release concatenates text ({ref_feat.shape[-1]} tokens) and visual prompts "
                         f"({supp_feat.shape[-1]}) along the batch: lengths must match (MAX_TOKENS 20)")
      all_feat = torch.cat([ref_feat, supp_feat], dim=0)
      all_mask = torch.cat([ref_mask, supp_mask], dim=0)
    elif ref_feat is not None:
      all_feat, all_mask = ref_feat, ref_mask
    elif supp_feat is not None:
      all_feat, all_mask = supp_feat, supp_mask
    else:
      raise ValueError("no prompt: give lang_tokens or supp_image")

    features = self.backbone(images, all_feat, all_mask)
    outputs = self.sem_seg_head(features, all_feat)
    full = F.interpolate(outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False)
    return {"pred_masks": outputs["pred_masks"], "nt_label": outputs["nt_label"], "pred_masks_full": full}


# ----------------------------------------------------------------------------------------------------------------
# Random parameters that make every path matter


_NORMS = (nn.LayerNorm, nn.GroupNorm, _LayerNorm2d)


@torch.no_grad()
def randomize_(model: ReleaseOmniSegNet, seed: int = 0) -> ReleaseOmniSegNet:
  """Give every parameter random values with signal on every path; deterministic in `seed`.

  Matrices and convs: normal with std 1/sqrt(fan_in) (activations stay O(1)); biases std 0.02; norm weights
  1 + N(0, 0.1), their biases N(0, 0.05); embeddings, level embeddings and the relative position tables std 0.5;
  the zero-initialised gates of the release (res_gate, lang_proj, lang_weight) random and nonzero; deformable
  sampling_offsets keep the polar bias plus N(0, 0.1) noise, with a small weight (std 0.02).
  """
  g = torch.Generator().manual_seed(seed)
  owners = {}
  for mname, module in model.named_modules():
    for pname, _ in module.named_parameters(recurse=False):
      owners[f"{mname}.{pname}" if mname else pname] = (module, pname)

  def randn(shape):
    return torch.randn(shape, generator=g, dtype=torch.float32)

  for name, p in model.named_parameters():
    module, pname = owners[name]
    shape = tuple(p.shape)
    if isinstance(module, _NORMS):
      value = 1.0 + 0.1 * randn(shape) if pname == "weight" else 0.05 * randn(shape)
    elif isinstance(module, nn.Embedding) or pname in ("level_embed", "relative_position_bias_table"):
      value = 0.5 * randn(shape)
    elif pname == "reference_points":
      value = torch.rand(shape, generator=g)
    elif pname == "lang_weight":
      value = randn(shape)
    elif isinstance(module, nn.Linear) and name.endswith("sampling_offsets.weight"):
      value = 0.02 * randn(shape)
    elif isinstance(module, nn.Linear) and name.endswith("sampling_offsets.bias"):
      owner = _find_deform(model, name)
      value = _polar_offsets(owner.n_heads, owner.n_levels, owner.n_points) + 0.1 * randn(shape)
    elif p.dim() >= 2:
      fan_in = p.shape[1] * math.prod(p.shape[2:])
      value = randn(shape) / math.sqrt(fan_in)
    else:
      value = 0.02 * randn(shape)
    p.copy_(value.to(p.device, p.dtype))
  return model


def _find_deform(model: nn.Module, param_name: str) -> _MSDeformAttn:
  owner = model.get_submodule(param_name.rsplit(".", 2)[0])
  assert isinstance(owner, _MSDeformAttn), param_name
  return owner


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint file the release's train_net.py writes


def _release_args(condition: str, cfg: ReleaseConfig) -> argparse.Namespace:
  """args.py's parser defaults with train.sh's settings: what train_net.py pickles as 'args'."""
  return argparse.Namespace(
      dataset="OmniRef", img_size=cfg.image_size, split="test", splitBy="unc", image_root="./data/images",
      refer_root="./datasets/OmniRef", model="omnisegnet", model_id="OmniRef", bert_tokenizer="bert-base-uncased",
      ck_bert="bert-base-uncased", swin_type="base", pretrained_swin_weights="swin_base_patch4_window12_384_22k.pth",
      clip_path="", amsgrad=False, clip_grads=True, clip_value=0.01, batch_size=8, epochs=50, lr=0.0001, min_lr=0,
      weight_decay=0.01, warmup=True, warmup_iters=7500, warmup_ratio=0.001, ddp_trained_weights=False,
      device="cuda:0", window12=False, eval_ori_size=False, local_rank=0, output_dir="./outputs/OmniSegNet",
      pin_mem=True, print_freq=100, resume="", workers=8, mix=False, config_file="./configs/referring_swin_base.yaml",
      condition=condition, training=True, model_name="OmniSegNet", fold=0, logpath="", benchmark="")


def _release_optimizer_state(model: ReleaseOmniSegNet, base_lr=1e-5, weight_decay=0.05) -> dict:
  """The shape of build_optimizer's AdamW state_dict: one group per non-BERT parameter, then BERT layers 0..9."""
  norm_types = (nn.GroupNorm, nn.InstanceNorm1d, nn.LayerNorm)
  params, memo = [], set()
  for mname, module in model.named_modules():
    for pname, value in module.named_parameters(recurse=False):
      if "text_encoder" in mname or id(value) in memo:
        continue
      memo.add(id(value))
      wd = weight_decay
      if "relative_position_bias_table" in pname or isinstance(module, (norm_types, nn.Embedding)):
        wd = 0.0
      params.append({"params": [value], "lr": base_lr, "weight_decay": wd})
  layers = model.text_encoder.encoder.layer
  params.append({"params": [p for i in range(min(10, len(layers))) for p in layers[i].parameters()],
                 "lr": base_lr, "weight_decay": weight_decay})
  return torch.optim.AdamW(params, base_lr).state_dict()


def save_release_checkpoint(model: ReleaseOmniSegNet, path, *, condition: str = "mask", epoch: int = 7,
                            with_position_ids: bool = False) -> dict:
  """torch.save the dict train_net.py saves ('model', 'optimizer', 'epoch', 'args', 'lr_scheduler', 'scaler').

  with_position_ids adds 'text_encoder.embeddings.position_ids' (1, max_position_embeddings) int64, a persistent
  buffer in the transformers versions of the release's time. Returns the saved dict.
  """
  state = model.state_dict()
  if with_position_ids:
    n = model.cfg.bert.max_position_embeddings
    new_state = type(state)()
    for key, value in state.items():
      if key == "text_encoder.embeddings.word_embeddings.weight":
        new_state["text_encoder.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).expand((1, -1))
      new_state[key] = value
    state = new_state
  optimizer = _release_optimizer_state(model)
  n_groups = len(optimizer["param_groups"])
  iters = (epoch + 1) * 1000
  checkpoint = {
      "model": state,
      "optimizer": optimizer,
      "epoch": epoch,
      "args": _release_args(condition, model.cfg),
      "lr_scheduler": {"base_lrs": [1e-5] * n_groups, "last_epoch": iters},
      "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                 "_growth_tracker": 0},
  }
  torch.save(checkpoint, path)
  return checkpoint
