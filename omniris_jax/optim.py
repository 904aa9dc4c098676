"""The optimiser: AdamW with a warmup + polynomial-decay schedule, parameter groups frozen by path regex.

Everything is decided by parameter *paths* ('image_encoder/stage0/block0/relative_position_bias_table'), so the
config can say what trains and what decays without touching the model:

  config.optimizer.schedule = (('text_encoder/.*', None),  # frozen: zero updates and no Adam state
                               ('.*', 'default'))          # everything else follows the learning-rate schedule

(big_vision's `config.schedule`; the first regex that fully matches a path wins, a path that matches none is an
error.) Frozen parameters go through `optax.set_to_zero` inside `optax.multi_transform`, so they hold no Adam
moments at all: stage 2 of the paper (text encoder frozen) keeps BERT's 22M parameters out of the optimiser
state. Weight decay skips the paths that match `config.optimizer.no_decay` (norms, biases, embeddings,
relative-position and other learnable tables, as the paper and Swin/BERT practice do). Global-norm clipping (the
release clips at 0.01) is computed over the trainable gradients only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Callable

import jax
import optax
from flax import linen as nn

# Leaves whose names end in these are not weight-decayed (applied with re.search on the path).
DEFAULT_NO_DECAY = (
    r"(^|/)bias$",  # every bias, including the norms' biases
    r"(^|/)scale$",  # LayerNorm / GroupNorm scales
    r"(^|/)embedding$",  # BERT's word, position and token-type embeddings
    r"relative_position_bias_table$",  # Swin's relative-position tables
    r"(^|/)(level_embed|query_embed|query_pos|query_features|query_positions|reference_points)$",  # learnt tables
)
TRAINABLE, FROZEN = "trainable", "frozen"


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """A pytree key path as 'a/b/c' (the form every regex in the config is written against)."""
  return "/".join(_key_name(key) for key in path)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def map_paths(fn: Callable[[str], Any], params: Any) -> Any:
  """`fn(path)` for every parameter, as a tree shaped like `params` (a boxed parameter counts as one leaf)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_string(path)), params, is_leaf=_is_boxed)


def _strip_collection(path: str) -> str:
  return path[len("params/"):] if path.startswith("params/") else path


def group_of(path: str, schedule: Sequence[tuple[str, str | None]]) -> str:
  """TRAINABLE or FROZEN for one parameter path, by the first fully matching regex of `schedule`."""
  path = _strip_collection(path)
  for pattern, rule in schedule:
    if re.fullmatch(pattern, path):
      if rule is None:
        return FROZEN
      if rule == "default":
        return TRAINABLE
      raise ValueError(f"config.optimizer.schedule entry ({pattern!r}, {rule!r}): the rule must be None (frozen) "
                       "or 'default' (train with the learning-rate schedule).")
  raise ValueError(f"Parameter {path!r} matches no regex of config.optimizer.schedule "
                   f"{[pattern for pattern, _ in schedule]}; end the schedule with ('.*', 'default').")


def frozen_mask(params: Any, schedule: Sequence[tuple[str, str | None]]) -> Any:
  """True for every frozen parameter (a tree shaped like `params`)."""
  return map_paths(lambda path: group_of(path, schedule) == FROZEN, params)


def decay_mask(params: Any, no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> Any:
  """True for every parameter that is weight-decayed (paths matching none of the `no_decay` regexes)."""
  return map_paths(lambda path: not any(re.search(pattern, _strip_collection(path)) for pattern in no_decay),
                   params)


def learning_rate_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, power: float = 1.0,
                           end_learning_rate: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then polynomial decay to `end_learning_rate` at `total_steps`."""
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"{total_steps=} must be >= 1 and {warmup_steps=} in [0, total_steps].")
  decay = optax.polynomial_schedule(init_value=learning_rate, end_value=end_learning_rate, power=power,
                                    transition_steps=max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its learning-rate schedule from `config.optimizer` (see configs/common.py).

  Args:
    config: the `optimizer` ConfigDict: learning_rate, warmup_steps, power, end_learning_rate, b1, b2, eps,
      weight_decay, no_decay (regexes), grad_clip_norm (None for no clipping), schedule ((regex, None |
      'default'), ...).
    total_steps: the stage's number of optimiser steps (the decay reaches its end there).

  Returns:
    (the optax transformation, the schedule step -> learning rate, for logging).
  """
  schedule_fn = learning_rate_schedule(learning_rate=config.learning_rate, total_steps=total_steps,
                                       warmup_steps=config.warmup_steps, power=config.power,
                                       end_learning_rate=config.end_learning_rate)
  no_decay = tuple(config.no_decay)
  trainable = [optax.adamw(schedule_fn, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=lambda params: decay_mask(params, no_decay))]
  if config.grad_clip_norm is not None:
    trainable.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  rules = tuple((pattern, rule) for pattern, rule in config.schedule)
  tx = optax.multi_transform({TRAINABLE: optax.chain(*trainable), FROZEN: optax.set_to_zero()},
                             lambda params: map_paths(lambda path: group_of(path, rules), params))
  return tx, schedule_fn
