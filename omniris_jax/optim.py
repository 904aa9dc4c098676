"""The optimiser: AdamW with a warmup + polynomial-decay (or multistep) schedule, parameter groups frozen by path
regex.

Everything is decided by parameter *paths* ('image_encoder/stage0/block0/relative_position_bias_table'), so the
config can say what trains and what decays without touching the model:

  config.optimizer.schedule = (('text_encoder/.*', None),  # frozen: zero updates and no Adam state
                               ('.*', 'default'))          # everything else follows the learning-rate schedule

(big_vision's `config.schedule`; the first regex that fully matches a path wins, a path that matches none is an
error.) Frozen parameters go through `optax.set_to_zero` inside `optax.multi_transform`, so they hold no Adam
moments at all: stage 2 of the paper (text encoder frozen) keeps BERT's 22M parameters out of the optimiser
state. Weight decay skips the paths that match `config.optimizer.no_decay` (norms, biases, embeddings,
relative-position and other learnable tables, as the paper and Swin/BERT practice do). Global-norm clipping (the
release clips at 0.01) is computed over the trainable gradients only. `config.optimizer.lr_schedule` picks the
learning-rate schedule from `SCHEDULES`: 'poly' (the paper's) or 'multistep' (the release's). It reads the stage's
length from the optimiser state (`scale_by_stage_schedule`), so stages that differ only in length share one
compiled train step.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
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


def warmup_polynomial(step: Any, total_steps: Any, *, learning_rate: float, warmup_steps: int = 0,
                      power: float = 1.0, end_learning_rate: float = 0.0) -> jax.Array:
  """Linear warmup from 0 over `warmup_steps`, then polynomial decay to `end_learning_rate` at `total_steps`.

  The values of optax's join_schedules([linear_schedule(0, lr, warmup), polynomial_schedule(lr, end, power,
  total - warmup)], [warmup]); `step` and `total_steps` may be traced arrays (see `scale_by_stage_schedule`).
  """
  step = jnp.asarray(step, jnp.float32)
  decay_steps = jnp.maximum(jnp.asarray(total_steps, jnp.float32) - warmup_steps, 1.0)
  warmup = learning_rate * step / max(warmup_steps, 1)
  fraction_left = 1.0 - jnp.clip(step - warmup_steps, 0.0, decay_steps) / decay_steps
  decay = (learning_rate - end_learning_rate) * fraction_left ** power + end_learning_rate
  return jnp.where(step < warmup_steps, warmup, decay)


def warmup_multistep(step: Any, total_steps: Any, *, learning_rate: float, warmup_steps: int = 0,
                     boundaries: Sequence[int] = (), factor: float = 0.1) -> jax.Array:
  """Linear warmup from 0 over `warmup_steps`, then `learning_rate` times `factor` once per boundary <= `step`.

  detectron2's WarmupMultiStepLR (bisect_right: the drop applies from the boundary's own step on; optax's
  piecewise_constant_schedule applies it one step later). The boundaries are absolute step numbers, so
  `total_steps` is not read; a boundary past the stage's end never applies.
  """
  del total_steps
  step = jnp.asarray(step, jnp.float32)
  drops = jnp.sum(step >= jnp.asarray(boundaries, jnp.float32))
  warmup = learning_rate * step / max(warmup_steps, 1)
  return jnp.where(step < warmup_steps, warmup, learning_rate * jnp.power(factor, drops))


# config.optimizer.lr_schedule -> (the schedule, the config.optimizer fields it reads besides learning_rate and
# warmup_steps).
SCHEDULES = {"poly": (warmup_polynomial, ("power", "end_learning_rate")),
             "multistep": (warmup_multistep, ("boundaries", "factor"))}


def _schedule(name: str) -> tuple[Callable[..., jax.Array], tuple[str, ...]]:
  if name not in SCHEDULES:
    raise ValueError(f"config.optimizer.lr_schedule={name!r}; choose one of {tuple(SCHEDULES)}.")
  return SCHEDULES[name]


def learning_rate_schedule(name: str = "poly", *, total_steps: int, **hyper: Any) -> optax.Schedule:
  """The schedule `SCHEDULES[name]` for a stage of `total_steps`, as a function of the step (for logging and plots).

  `hyper`: learning_rate, warmup_steps and the schedule's own fields (SCHEDULES).
  """
  schedule, _ = _schedule(name)
  warmup_steps = hyper.get("warmup_steps", 0)
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"{total_steps=} must be >= 1 and {warmup_steps=} in [0, total_steps].")
  return functools.partial(schedule, total_steps=total_steps, **hyper)


class StageScheduleState(NamedTuple):
  """Where the learning-rate schedule stands: `count` updates done of a stage of `total_steps`."""
  count: jax.Array  # int32 scalar
  total_steps: jax.Array  # int32 scalar


def scale_by_stage_schedule(schedule: Callable[[jax.Array, jax.Array], jax.Array],
                            total_steps: int) -> optax.GradientTransformation:
  """optax.scale_by_learning_rate(lambda count: schedule(count, total_steps)), with `total_steps` in the state.

  Kept as state rather than closed over, the stage's length is an input of the compiled train step instead of a
  constant inside it: stages that differ only in length (the demo's visual and joint stages) lower to the same
  program, and JAX's persistent compilation cache compiles it once.
  """

  def init_fn(params):
    del params
    return StageScheduleState(count=jnp.zeros([], jnp.int32), total_steps=jnp.asarray(total_steps, jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    step_size = -schedule(state.count, state.total_steps)
    updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
    return updates, StageScheduleState(count=optax.safe_increment(state.count), total_steps=state.total_steps)

  return optax.GradientTransformation(init_fn, update_fn)


def with_total_steps(opt_state: Any, total_steps: int) -> Any:
  """`opt_state` with every StageScheduleState's stage length set to `total_steps` (same device placement).

  A run resumed with a changed `total_steps` decays to the new end, as the config says, not the checkpoint's.
  """
  def update(node):
    if not isinstance(node, StageScheduleState):
      return node
    return node._replace(total_steps=jax.device_put(jnp.asarray(total_steps, jnp.int32),
                                                    node.total_steps.sharding))
  return jax.tree.map(update, opt_state, is_leaf=lambda node: isinstance(node, StageScheduleState))


def make_optimizer(config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its learning-rate schedule from `config.optimizer` (see configs/common.py).

  Args:
    config: the `optimizer` ConfigDict: learning_rate, warmup_steps, lr_schedule ('poly': power,
      end_learning_rate; 'multistep': boundaries, factor), b1, b2, eps, weight_decay, no_decay (regexes),
      grad_clip_norm (None for no clipping), schedule ((regex, None | 'default'), ...).
    total_steps: the stage's number of optimiser steps (the 'poly' decay reaches its end there).

  Returns:
    (the optax transformation, the schedule step -> learning rate, for logging).
  """
  name = config.get("lr_schedule", "poly")  # configs saved before 'multistep' existed have no such field
  schedule, fields = _schedule(name)
  hyper = dict(learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
               **{field: config[field] for field in fields})
  schedule_fn = learning_rate_schedule(name, total_steps=total_steps, **hyper)  # validates the numbers
  no_decay = tuple(config.no_decay)
  rules = tuple((pattern, rule) for pattern, rule in config.schedule)
  # AdamW (optax.adamw's chain: Adam moments, decoupled weight decay, learning rate), here with the stage's
  # length kept in the optimiser state (scale_by_stage_schedule).
  trainable = [optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
               optax.add_decayed_weights(config.weight_decay, mask=lambda params: decay_mask(params, no_decay)),
               scale_by_stage_schedule(functools.partial(schedule, **hyper), total_steps)]
  if config.grad_clip_norm is not None:
    trainable.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  tx = optax.multi_transform({TRAINABLE: optax.chain(*trainable), FROZEN: optax.set_to_zero()},
                             lambda params: map_paths(lambda path: group_of(path, rules), params))
  return tx, schedule_fn
