"""The main job: `python -m omniris_jax.main --config=configs/joint.py:demo --workdir=DIR`.

Deliberately thin (the flax examples' rule): the work lives in library modules that can be imported, tested and
used from Colab. The job
  1. initialises multi-host JAX when asked (`--multihost`: TPU pods, SLURM GPU clusters),
  2. checks the config before anything is written (the mesh, the batch sizes, the model, the data, the checkpoints
     it resumes or starts from); a bad flag or config field is answered by one `error:` line and exit status 2,
     the workdir untouched,
  3. makes sure the data exists (the synthetic set is built on first use; a missing real dataset fails at once,
     naming it and the command that builds it), prints its statistics and writes `WORKDIR/preview.png`,
  4. trains and evaluates: the config's stage, preceded by `config.run_before` stages (the demo runs all three),
     see omniris_jax/train.py for what lands in the workdir.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, results, event files and previews go.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else "
                               "(one process per host; coordinator from the environment).")
_CHECK_PIPELINE = flags.DEFINE_bool("check_pipeline", False, "Also draw and time a few training batches.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/omniris_jax/jax_compilation_cache",
    "JAX's persistent compilation cache: a later stage or run whose step compiles to the same program loads it "
    "instead of compiling (the demo's joint stage reuses its visual stage's step, every evaluation after the "
    "first reuses the first's). '' turns it off; JAX_COMPILATION_CACHE_DIR, when set, is used instead.")
_COMPILATION_CACHE_MAX_MB = flags.DEFINE_integer(
    "compilation_cache_max_mb", 1024,
    "Size cap of that cache in MiB; JAX evicts the least recently used programs beyond it (a demo_long run writes "
    "about 9 MiB). -1: no cap; JAX_COMPILATION_CACHE_MAX_SIZE (bytes), when set, is used instead.")
flags.mark_flags_as_required(["config", "workdir"])


def _dataset_names(config) -> list[str]:
  names = [config.dataset.test_name]
  for source in (config.dataset.text_source, config.dataset.visual_source):
    if source.name not in names:
      names.append(source.name)
  return names


def prepare_data(config, workdir: str, *, time_pipeline: bool = True) -> None:
  """Builds (if synthetic) or checks every dataset the config reads, prints the statistics of the main one,
  writes a preview of test examples, and (optionally) draws and times training batches."""
  import time  # pylint: disable=g-import-not-at-top

  from omniris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top

  data_dir = config.dataset.data_dir
  for dataset_name in _dataset_names(config):  # fail fast, before any compile, naming what is missing
    prepare.ensure_built(dataset_name, data_dir)
  name = config.dataset.name
  splits = (config.dataset.train_split, *config.dataset.test_splits)
  statistics = {split: prepare.split_statistics(prepare.open_split(name, split, data_dir, decode_images=False))
                for split in splits}
  print(f"\n{name}: examples per split\n{prepare.format_statistics(statistics)}\n", flush=True)

  examples = []
  for split in config.dataset.test_splits:
    indices = prepare.one_per_target_kind(prepare.open_split(name, split, data_dir, decode_images=False))
    source = prepare.open_split(name, split, data_dir)
    examples += [source[i] for i in indices]
  os.makedirs(workdir, exist_ok=True)
  preview_path = os.path.join(workdir, "preview.png")
  visualize.render_preview(examples, preview_path, title=f"{name}: test examples (ground truth and prompts)")
  print(f"Wrote {preview_path}", flush=True)
  if not time_pipeline:
    return

  dataset = pipeline.make_dataset(
      pipeline.from_tfds(name, config.dataset.train_split, data_dir), resolution=config.input.resolution,
      batch_size=config.input.batch_size, max_text_len=config.input.max_text_len, seed=config.seed,
      prompt_types=config.input.prompt_types, regenerate_prompts=config.input.regenerate_prompts,
      worker_count=config.input.worker_count)
  iterator = iter(dataset)
  batch = next(iterator)
  print("One training batch:\n" + "\n".join(f"  {k:20s} {v.dtype!s:8s} {v.shape}" for k, v in batch.items()))
  num_batches, start = 10, time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  rate = num_batches * config.input.batch_size / (time.perf_counter() - start)
  print(f"Input pipeline: {rate:.0f} examples/s at {config.input.resolution}x{config.input.resolution} "
        f"(worker_count={config.input.worker_count}).", flush=True)


def configure_compilation_cache(directory: str, max_mb: int) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' = off), capped at `max_mb` MiB (-1 = no cap).

  JAX's own settings win: a JAX_COMPILATION_CACHE_DIR or JAX_COMPILATION_CACHE_MAX_SIZE in the environment (or an
  earlier `jax.config.update`) is left as it is.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if not directory or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  if max_mb >= 0 and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", max_mb * 2**20)


def check_config(config, workdir: str) -> None:
  """Checks what can be checked before a run writes anything, for every stage it runs (`run_before`, then the
  config's own): the mesh and the batch sizes on the devices there are, the sharding rules, the model (name, preset,
  overrides, vocabulary), that real datasets are built, and that the checkpoints a stage resumes from (its own) or
  starts from (`init_from`) hold this model's parameters.

  Raises:
    ValueError, FileNotFoundError: naming the field or file and what to do.
  """
  from omniris_jax import sharding  # pylint: disable=g-import-not-at-top
  from omniris_jax import train  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from omniris_jax.models import factory  # pylint: disable=g-import-not-at-top

  stages = [train.stage_config(config, name) for name in config.get("run_before", ())] + [config]
  run_earlier: set[str] = set()
  for stage in stages:
    mesh = sharding.make_mesh(stage.mesh)
    sharding.make_rules(stage.sharding.rules)
    sharding.check_batch_size(stage.input.batch_size, mesh)
    sharding.check_batch_size(stage.eval.batch_size, mesh, name="config.eval.batch_size")
    for name in _dataset_names(stage):
      if name not in prepare.SYNTHETIC_CONFIGS:  # synthetic data is built on first use, in prepare_data
        prepare.ensure_built(name, stage.dataset.data_dir)
    model = factory.make_model(stage)
    _check_checkpoints(stage, workdir, lambda stage=stage, model=model: factory.param_shapes(stage, model),
                       run_earlier)
    run_earlier.add(stage.stage)


def _check_checkpoints(stage, workdir: str, wanted, run_earlier: set[str]) -> None:
  """The stage's own newest checkpoint (resumed) must hold exactly its model; else `init_from`'s newest must exist
  and hold at least half of the model's parameter arrays (the trainer initialises the rest afresh, by design)."""
  from omniris_jax import checkpointing  # pylint: disable=g-import-not-at-top

  own = checkpointing.latest_step_directory(os.path.join(workdir, stage.stage, "checkpoints"))
  if own is not None:
    try:
      saved = checkpointing.param_shapes_in(own)
    except ValueError:
      return  # unreadable: the trainer names it and resumes from the one before (checkpointing.restore_latest)
    differences = checkpointing.param_mismatches(saved, wanted())
    if differences:
      raise ValueError(
          f"{own}, the checkpoint stage {stage.stage!r} resumes from, was trained with another model than this "
          f"config describes (model {stage.model.get('name', 'omnisegnet')!r}, preset {stage.model.preset!r}): "
          f"{differences}. Run with the config it was trained with (saved in "
          f"{os.path.join(workdir, stage.stage, 'config.json')}), or give a new --workdir.")
    return
  if not stage.init_from or stage.init_from in run_earlier:
    return
  directory = checkpointing.init_directory(stage.init_from, workdir)
  step_dir = checkpointing.latest_step_directory(directory)
  if step_dir is None:
    raise FileNotFoundError(
        f"config.init_from={stage.init_from!r}: {directory!r} holds no checkpoint. Run the stage it names first, "
        "point it at a checkpoint directory or a trained workdir (an absolute path), or set "
        "--config.init_from=None to start from scratch.")
  try:
    saved = checkpointing.param_shapes_in(step_dir)
  except ValueError as error:
    raise ValueError(f"config.init_from={stage.init_from!r}: {error}") from None
  shapes = wanted()
  loadable = sum(1 for path, shape in shapes.items() if saved.get(path) == shape)
  if 2 * loadable < len(shapes):
    raise ValueError(
        f"config.init_from={stage.init_from!r}: {step_dir} holds only {loadable} of the {len(shapes)} parameter "
        f"arrays of this config's model (model {stage.model.get('name', 'omnisegnet')!r}, preset "
        f"{stage.model.preset!r}): {checkpointing.param_mismatches(saved, shapes)}. It was trained with another model "
        "size or preset; point init_from at a checkpoint of this model, set the model fields it was trained with "
        "(config.model.*), or set --config.init_from=None to start from scratch.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the progress lines readable
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top

  configure_compilation_cache(_COMPILATION_CACHE.value, _COMPILATION_CACHE_MAX_MB.value)
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from omniris_jax import train  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    check_config(config, workdir)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    prepare_data(config, workdir, time_pipeline=_CHECK_PIPELINE.value)
  else:
    from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
    for dataset_name in _dataset_names(config):
      prepare.ensure_built(dataset_name, config.dataset.data_dir)
  train.run_stages(config, workdir)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or config override answered by one `error:` line that says
  what to do (exit status 2) instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.get("stage")  # ml_collections defers a config file's load error to the first access
  except flags.Error as error:
    _exit_with_error(_flag_error(str(error)))
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    _exit_with_error(_override_error(argv, error))
  return remaining


def _exit_with_error(message: str) -> None:
  print(f"error: {message}\nEvery config field is commented in configs/common.py; see --helpfull for the flags.",
        file=sys.stderr)
  sys.exit(2)


def _flag_error(message: str) -> str:
  """absl's message for a flag whose value does not parse, with a config file's own error pulled out of the
  traceback that ml_collections puts in it, and the field's type for a config override."""
  match = re.match(r"flag (--\S+?): Error whilst parsing config file:(.*)", message, re.S)
  if match:  # the config file raised: its last line is the error (e.g. an unknown variant)
    last_line = match.group(2).strip().splitlines()[-1].strip()
    return f"{match.group(1)}: {re.sub(r'^[A-Za-z]*(Error|Exception): ', '', last_line)}"
  match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message, re.S)
  if not match:
    return message.removeprefix("flag ")
  path, value, problem = match.groups()
  current = _config_field(path.split("."))
  if current is _NOT_A_FIELD or current is None:
    return f"--config.{path}={value}: {problem}"
  if hasattr(current, "keys"):
    return (f"--config.{path}={value}: {problem}; config.{path} is a group of fields ({', '.join(sorted(current))}): "
            f"set one of them, e.g. --config.{path}.{sorted(current)[0]}=...")
  kind = type(current).__name__
  article = "an" if kind[0] in "aeiou" else "a"
  return (f"--config.{path}={value}: {problem}; config.{path} is of type {kind} (now {current!r}): give {article} "
          f"{kind}.")


_NOT_A_FIELD = object()


def _config_field(path: list[str], root=None):
  """The parsed config's value at `path` (_NOT_A_FIELD when there is none or the config did not load)."""
  try:
    value = flags.FLAGS["config"].value if root is None else root
    for key in path:
      value = value[key]
  except Exception:  # pylint: disable=broad-except  (any failure: no field to describe)
    return _NOT_A_FIELD
  return value


def _override_error(argv: list[str], error: Exception) -> str:
  """The message for a config file that does not load, or a --config.a.b=... naming a field the config lacks."""
  spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), "")
  if isinstance(error, OSError):
    if "No such file" in str(error) or "Errno 2" in str(error):
      return (f"--config={spec}: no such config file; give one of configs/alignment.py, configs/visual.py, "
              "configs/joint.py, with a variant after a colon (e.g. --config=configs/joint.py:demo).")
    return f"--config={spec}: the config file does not load: {str(error).strip().splitlines()[-1].strip()}"
  try:  # the override was refused while the config flag parsed, so its value was never set: load it again
    root = config_flags.config_flags.ConfigFileFlagParser("config").parse(spec)
  except Exception:  # pylint: disable=broad-except
    root = None
  for arg in argv:
    if not arg.startswith("--config.") or root is None:
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    for depth, key in enumerate(path):
      parent = _config_field(path[:depth], root)
      where = "config" + "".join(f".{part}" for part in path[:depth])
      if not hasattr(parent, "keys"):
        return (f"--config.{'.'.join(path)}: {where} is of type {type(parent).__name__}, not a group of fields; "
                f"set it as --{where}=...")
      if key not in parent:
        close = difflib.get_close_matches(key, list(parent.keys()), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (f"--config.{'.'.join(path)}: {where} has no field {key!r}; {hint}its fields are "
                f"{', '.join(sorted(parent.keys()))}.")
  return f"a --config override failed: {type(error).__name__}: {str(error).strip().splitlines()[-1]}"


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
