"""Checkpoints that survive preemption: the train state and the grain iterator, saved together by one orbax manager.

Each checkpoint step directory holds two items:
  state   the TrainState as a dict {step, params, opt_state} (orbax PyTree, sharded arrays, written async)
  data    the input iterator's position (grain's orbax handler), so a resumed run sees exactly the batches the
          uninterrupted run would have seen
The manager keeps the last `max_to_keep` steps and only ever exposes complete ones (orbax writes to a temporary
directory and renames it when done), so `kill -9` at any moment leaves the previous checkpoint intact.

Where a stage's state comes from, in the order the trainer tries them:
  1. resume (`restore_latest`): the newest readable checkpoint in this stage's directory (one that fails to read
     is named in a warning, the one before it is tried, and, once one is read, it is moved aside to
     `<step>.unreadable-<time>` so that the run can write that step again);
  2. init_from (`load_params_from`): the parameters only of the newest checkpoint in `config.init_from` (the
     previous stage); parameters it lacks, or holds with another shape, keep their fresh initialisation and are
     listed; the optimiser starts fresh;
  3. scratch: the fresh initialisation (with the pretrained text encoder when the config names one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from omniris_jax import steps

STATE, DATA = "state", "data"


class CheckpointReadError(RuntimeError):
  """No checkpoint of a directory could be read (each failure is in the message)."""


def make_manager(directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """The orbax manager of one stage's checkpoints (train state + grain iterator)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=(STATE, DATA),
                               item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                              DATA: grain.checkpoint.CheckpointHandler()})


def _state_dict(state: steps.TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save(manager: ocp.CheckpointManager, state: steps.TrainState, iterator: Any, *, force: bool = False) -> bool:
  """Starts an (async) save of the state and the iterator at `state.step`; returns whether one was started."""
  step = int(jax.device_get(state.step))
  return manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(_state_dict(state)),
                                                        DATA: grain.checkpoint.CheckpointSave(iterator)}),
                      force=force)


def _restore_args(abstract: Any) -> Any:
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                      abstract)


def _abstract(shardings: Any, shapes: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: steps.TrainState, iterator: Any,
                   log=print) -> steps.TrainState | None:
  """The newest readable checkpoint (state + iterator position), or None when the directory has none.

  `abstract_state` holds jax.ShapeDtypeStruct leaves with their shardings. A checkpoint that fails to read is
  reported by path and the previous one is tried; the unreadable ones newer than the one restored are moved aside
  (`<step>.unreadable-<time>`, which the manager ignores). CheckpointReadError when none can be read (nothing is
  moved then).
  """
  target = _state_dict(abstract_state)
  failures, unreadable = [], []
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(str(manager.directory), str(step))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
          DATA: grain.checkpoint.CheckpointRestore(iterator)}))
    except Exception as error:  # pylint: disable=broad-except  (any unreadable file: try the previous one)
      failures.append(f"{path}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
      log(f"WARNING: checkpoint {path} could not be read ({failures[-1].split(': ', 1)[1]}); trying the "
          "previous one.")
      unreadable.append(path)
      continue
    # The unreadable newer ones are moved aside (kept, not deleted): the run saves those steps again. Every
    # process renames (one succeeds), so each sees them gone before it reloads, without a collective.
    for bad in unreadable:
      aside = f"{bad}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      try:
        epath.Path(bad).rename(aside)
        log(f"WARNING: moved the unreadable checkpoint {bad} to {aside} (delete it when done with it).")
      except FileNotFoundError:  # another process moved it
        pass
    if unreadable:
      manager.reload()
    log(f"Resumed from checkpoint {path}.")
    return steps.TrainState(**restored[STATE])
  if failures:
    raise CheckpointReadError(f"No checkpoint in {manager.directory} could be read: " + "; ".join(failures) +
                              ". Delete the broken step directories to start this stage afresh.")
  return None


def latest_step_directory(directory: str) -> str | None:
  """The newest complete step directory of a checkpoint directory (None when there is none)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE, DATA))
  step = manager.latest_step()
  manager.close()
  return None if step is None else os.path.join(os.path.abspath(directory), str(step))


def latest_stage(workdir: str) -> str:
  """The stage a trained workdir ends with: the last of joint, visual, alignment that has a checkpoint, else any
  other stage directory with one (e.g. `release`, written by convert_release)."""
  candidates = ["joint", "visual", "alignment"] + sorted(
      name for name in os.listdir(workdir) if name not in ("joint", "visual", "alignment"))
  for name in candidates:
    if latest_step_directory(os.path.join(workdir, name, "checkpoints")) is not None:
      return name
  raise FileNotFoundError(f"{workdir!r} holds no trained stage (no <stage>/checkpoints with a checkpoint); train "
                          "one first, e.g. `make demo`, or convert the release's checkpoint into it.")


def init_directory(init_from: str, workdir: str) -> str:
  """The checkpoint directory `config.init_from` names: a stage of this workdir ('visual'), an absolute checkpoint
  directory, or an absolute workdir (its newest stage's checkpoints, e.g. a converted release checkpoint)."""
  if not os.path.isabs(init_from):
    return os.path.join(workdir, init_from, "checkpoints")
  if latest_step_directory(init_from) is None and os.path.isdir(init_from):
    try:
      return os.path.join(init_from, latest_stage(init_from), "checkpoints")
    except FileNotFoundError:
      pass
  return init_from


def load_params_from(directory: str, abstract_params: Any, fresh_params: Any, log=print) -> Any:
  """`fresh_params` overwritten by the newest checkpoint's parameters in `directory` that match in path and shape.

  `fresh_params` may be a function that makes them, called only when the checkpoint lacks some.

  Saved values are restored straight into the target shardings; parameters left fresh are logged.

  Raises:
    FileNotFoundError: when `directory` holds no checkpoint.
  """
  step_dir = latest_step_directory(directory)
  if step_dir is None:
    raise FileNotFoundError(f"config.init_from={directory!r} holds no checkpoint; run the previous stage first "
                            "(or set config.init_from=None to start from scratch).")
  saved = param_shapes_in(step_dir)
  wanted = traverse_util.flatten_dict(abstract_params)
  loadable = {key: value for key, value in wanted.items() if saved.get("/".join(key)) == tuple(value.shape)}
  target = {"params": traverse_util.unflatten_dict(loadable)}
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, STATE), args=ocp.args.PyTreeRestore(
      item=target, restore_args=_restore_args(target), partial_restore=True))
  loaded = traverse_util.flatten_dict(restored["params"])
  missing = sorted("/".join(key) for key in wanted if key not in loadable)
  log(f"Initialised {len(loaded)} of {len(wanted)} parameter arrays from {step_dir}"
      + (f"; freshly initialised (absent or reshaped there): {missing[:8]}"
         f"{' ...' if len(missing) > 8 else ''}" if missing else "."))
  if not missing:  # nothing to fill in: a callable `fresh_params` is never called
    return traverse_util.unflatten_dict(loaded)
  merged = traverse_util.flatten_dict(fresh_params() if callable(fresh_params) else fresh_params)
  merged.update(loaded)
  return traverse_util.unflatten_dict(merged)


def param_shapes_in(step_dir: str) -> dict[str, tuple[int, ...]]:
  """'part/.../name' -> shape of every parameter array a checkpoint step directory holds, from its metadata alone.

  Raises:
    ValueError: the metadata cannot be read (a truncated or damaged checkpoint), naming the directory.
  """
  try:  # the item's own tree metadata (the checkpointer's `metadata` also wants a per-item checkpoint metadata
    # file that CheckpointManager does not write, and warns)
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, STATE)))
    tree = getattr(metadata, "tree", metadata)["params"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(unreadable_message(step_dir, error)) from error
  return {"/".join(key): tuple(value.shape) for key, value in traverse_util.flatten_dict(tree).items()}


def param_mismatches(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> str:
  """'' when every wanted parameter is saved with its shape, else what differs, in a few words."""
  absent = sorted(path for path in wanted if path not in saved)
  reshaped = sorted(f"{path} {saved[path]} where the model has {wanted[path]}"
                    for path in wanted if path in saved and saved[path] != wanted[path])
  parts = []
  if reshaped:
    parts.append(f"{len(reshaped)} of its {len(wanted)} parameter arrays have another shape there ("
                 + "; ".join(reshaped[:3]) + ("; ..." if len(reshaped) > 3 else "") + ")")
  if absent:
    parts.append(f"{len(absent)} are absent there ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})")
  return ", and ".join(parts)


def unreadable_message(step_dir: str, error: BaseException) -> str:
  """What to say about a checkpoint step directory that cannot be read."""
  first_line = (str(error).strip().splitlines() or [""])[0][:300]
  return (f"the checkpoint {step_dir} cannot be read ({type(error).__name__}: {first_line}); it is truncated or "
          "damaged. Delete that step directory to fall back to the one before it, or train the stage again.")


def all_step_directories(directory: str) -> list[str]:
  """The complete step directories of a checkpoint directory, oldest first (for tools and tests)."""
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE, DATA))
  result = [os.path.join(os.path.abspath(directory), str(step)) for step in sorted(manager.all_steps())]
  manager.close()
  return result


def abstract_state(shardings: steps.TrainState, shapes: steps.TrainState) -> steps.TrainState:
  """ShapeDtypeStructs with shardings: the restore target of `restore_latest`."""
  return _abstract(shardings, shapes)


def params_summary(params: Mapping[str, Any]) -> int:
  """Number of parameter values (for log lines)."""
  return sum(x.size for x in jax.tree.leaves(params))
