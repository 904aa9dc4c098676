"""The model of a trainer config: `config.model.name` names a module under `omniris_jax.models`.

A model module holds `Config` (a frozen dataclass with the presets `tiny_test`, `demo`, `paper`, `release`) and `Model` (a
Flax module built from it); it may hold `compute_losses(outputs, batch, loss_config)` for terms of its own
(`losses.compute_losses` otherwise). 'omnisegnet' is the paper's and the release's model; projects add theirs
under `models/proj/<project>/` (e.g. 'proj.shapes.omnisegnet', the synthetic demo's).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


def model_module(config: Any) -> ModuleType:
  """The module `omniris_jax.models.<config.model.name>`."""
  name = config.model.get("name", "omnisegnet")
  try:
    return importlib.import_module(f"omniris_jax.models.{name}")
  except ModuleNotFoundError as error:
    raise ValueError(f"config.model.name={name!r}: there is no module omniris_jax.models.{name} ({error}); use "
                     "'omnisegnet' or a project's model such as 'proj.shapes.omnisegnet'.") from error


def model_config(config: Any) -> Any:
  """The model's Config: the preset `config.model.preset` plus the field overrides `config.model.overrides`.

  `overrides` maps a part ('swin', 'bert', 'pixel_encoder', 'prompt_encoder', 'mask_decoder') to a dict of that
  part's fields, or a top-level field ('omni_fusion', ...) to its value.
  """
  config_class = model_module(config).Config
  preset = getattr(config_class, config.model.preset, None)
  if preset is None:
    raise ValueError(f"config.model.preset={config.model.preset!r} is not a {config_class.__name__} preset "
                     "(tiny_test, demo, paper, release).")
  base = preset(max_text_len=config.input.max_text_len)
  changes = {}
  for name, value in dict(config.model.get("overrides", {})).items():
    current = getattr(base, name, None)
    if dataclasses.is_dataclass(current):
      unknown = sorted(set(dict(value)) - {field.name for field in dataclasses.fields(current)})
      if unknown:
        raise ValueError(f"config.model.overrides.{name}: {type(current).__name__} has no fields {unknown}.")
      changes[name] = dataclasses.replace(current, **dict(value))
    elif hasattr(base, name):
      changes[name] = value
    else:
      raise ValueError(f"config.model.overrides.{name}: {config_class.__name__} has no field {name!r}.")
  model_cfg = dataclasses.replace(base, **changes)
  _check_vocabulary(model_cfg, text_encoder_vocab(config))
  return model_cfg


def make_model(config: Any) -> nn.Module:
  """The Flax model of a trainer config."""
  return model_module(config).Model(model_config(config))


def param_shapes(config: Any, model: nn.Module | None = None) -> dict[str, tuple[int, ...]]:
  """'part/.../name' -> shape of every parameter array of the config's model (traced only: nothing computed)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  model = make_model(config) if model is None else model
  abstract = nn.unbox(jax.eval_shape(lambda rng: model.init(rng, **dummy_inputs(config))["params"],
                                     jax.random.PRNGKey(0)))
  return {"/".join(key): tuple(value.shape) for key, value in traverse_util.flatten_dict(abstract).items()}


def loss_fn(config: Any) -> Callable:
  """(outputs, batch, loss_config) -> (loss, metrics) of the config's model."""
  from omniris_jax import losses  # pylint: disable=g-import-not-at-top
  return getattr(model_module(config), "compute_losses", losses.compute_losses)


def _check_vocabulary(model_cfg: Any, vocab_path: str | None) -> None:
  """Token ids at or above the embedding table's size silently give NaN text features; refuse that config."""
  from omniris_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  path = vocab_path or tokenizer.Tokenizer().vocab_path
  with open(path, encoding="utf-8") as f:
    vocab_size = sum(1 for _ in f)
  if vocab_size > model_cfg.bert.vocab_size:
    raise ValueError(f"The tokenizer's vocabulary ({path}) has {vocab_size} tokens but the model's text encoder "
                     f"embeds only {model_cfg.bert.vocab_size=}; set "
                     f"--config.model.overrides.bert.vocab_size={vocab_size} or use the matching vocabulary.")


def text_encoder_checkpoint(config: Any) -> str | None:
  """The HF-format BERT folder the text encoder starts from (None: random init); 'minilm' = the shipped MiniLM."""
  path = config.model.get("text_encoder_checkpoint")
  if path == "minilm":
    from omniris_jax.models import bert  # pylint: disable=g-import-not-at-top
    return str(bert.minilm_path())
  return path


def text_encoder_vocab(config: Any) -> str | None:
  """vocab.txt of the text encoder's checkpoint (None: the pipeline's default, MiniLM's uncased vocabulary)."""
  path = text_encoder_checkpoint(config)
  if path and os.path.isfile(os.path.join(path, "vocab.txt")):
    return os.path.join(path, "vocab.txt")
  return None


def dummy_inputs(config: Any) -> dict[str, jax.Array]:
  """Model inputs of batch 1 at the configured resolution (to build the parameters)."""
  size, length = config.input.resolution, config.input.max_text_len
  return {"image": jnp.zeros((1, size, size, 3), jnp.uint8), "text_ids": jnp.zeros((1, length), jnp.int32),
          "text_attention_mask": jnp.ones((1, length), jnp.int32),
          "ref_image": jnp.zeros((1, size, size, 3), jnp.uint8), "ref_prompt": jnp.zeros((1, size, size)),
          "has_text": jnp.ones((1,), bool), "has_visual": jnp.ones((1,), bool)}
