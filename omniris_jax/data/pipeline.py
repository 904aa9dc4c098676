"""The grain input pipeline: OmniRIS records from any random-access source -> batches of the batch contract.

Every dataset (shapes, OmniRef, the RIS benchmarks) yields records with the same features
(`tfds_omniref/omniref/features.py`), so one pipeline serves all of them, for training, evaluation and the demo.

Batch contract (numpy arrays with a leading batch dimension B; the model and trainer consume exactly this):

  image                uint8   (B, S, S, 3)  target image, non-uniformly resized to S x S (bilinear)
  text_ids             int32   (B, L)        BERT WordPiece ids: [CLS] ... [SEP] [PAD]...; all 0 when no text
  text_attention_mask  int32   (B, L)        1 on [CLS], tokens and [SEP]; all 0 when the example has no text
  ref_image            uint8   (B, S, S, 3)  reference image (bilinear); all 0 when no visual prompt
  ref_prompt           float32 (B, S, S)     the chosen spatial prompt (mask, box or scribble) of {0., 1.},
                                             nearest-resized; all 0 when no visual prompt
  has_text             bool    (B,)          the example has a text prompt (modality text or omni)
  has_visual           bool    (B,)          the example has a visual prompt (modality visual or omni)
  mask                 uint8   (B, S, S)     ground truth, union of the referents, {0, 1}, nearest-resized
  text_mask            uint8   (B, S, S)     ground truth of the text referent (all 0 when absent)
  visual_mask          uint8   (B, S, S)     ground truth of the visual referent (all 0 when absent)
  no_target            bool    (B,)          the prompt refers to nothing in the image
  modality             int32   (B,)          0 text, 1 visual, 2 omni
  setting              int32   (B,)          0 one_vs_one, 1 one_vs_many, 2 many_vs_one, 3 many_vs_many,
                                             4 no_target
  prompt_type          int32   (B,)          the spatial prompt actually used: 0 none, 1 mask, 2 box, 3 scribble
  index                int64   (B,)          the record's index in its source (to find it when it is wrong);
                                             -1 marks a padding row (only with `pad_to_full_batches`)

S = `resolution` (paper: 480), L = `max_text_len` (paper: 20).

Pipeline order (grain's recommended shape: random-access steps, then `to_iter_dataset`, then streaming):
source -> attach index -> seed -> shuffle -> repeat -> shard `[process_index::process_count]` -> (mix) ->
transforms -> batch -> `to_iter_dataset` (threads) -> `mp_prefetch` (worker processes, when worker_count > 0).
Shuffling before repeating reshuffles every epoch; sharding after both lets every process walk the same global
order and keep every `process_count`-th element, so the shards are disjoint and together cover each epoch.
Random choices (the shuffle, the training prompt type, regenerated scribbles) are seeded by grain from `seed`
and the element's position, so the output depends only on the seed, never on thread or worker timing.

Checkpointing: `it = iter(dataset)`; `it.get_state()` is a small dict; `it.set_state(state)` on a fresh
iterator of the same pipeline continues with exactly the batches the original would have produced. Orbax saves
it with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` next to the train state.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import grain

from omniris_jax.data import prepare
from omniris_jax.data import transforms

# The paper's best batch sample ratio of text-guided to visual-guided examples in joint training (Table 5).
DEFAULT_MIX_RATIO = (7, 2)
# What `make_mixed_dataset` interleaves at its ratio: single examples (every batch mixes both sources) or whole
# batches (every batch comes from one source).
MIX_UNITS = ("example", "batch")


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int.")


def _check_common_args(*, resolution, max_text_len, batch_size, num_epochs, process_index, process_count,
                       worker_count, prompt_types) -> None:
  _check_positive(resolution=resolution, batch_size=batch_size, process_count=process_count)
  if not isinstance(max_text_len, int) or max_text_len < 3:
    raise ValueError(f"{max_text_len=} must be an int of at least 3 ([CLS], one token, [SEP]).")
  if num_epochs is not None:
    _check_positive(num_epochs=num_epochs)
  if not 0 <= process_index < process_count:
    raise ValueError(f"{process_index=} must be in [0, {process_count=}).")
  if worker_count < 0:
    raise ValueError(f"{worker_count=} must be non-negative (0 runs the transforms in this process).")
  if prompt_types is not None:
    unknown = [name for name in prompt_types if name not in transforms.SPATIAL_PROMPT_TYPES]
    if isinstance(prompt_types, str) or not prompt_types or unknown:
      raise ValueError(f"{prompt_types=} must be None (use each record's stored prompt) or a non-empty sequence "
                       f"drawn from {transforms.SPATIAL_PROMPT_TYPES}.")


def _records(source: Any, *, seed: int, shuffle: bool, num_epochs: int | None, process_index: int,
             process_count: int, name: str) -> grain.MapDataset:
  """The source's records with their indices, shuffled per epoch, repeated and sharded for this process."""
  try:
    num_records = len(source)
  except TypeError as error:
    raise TypeError(f"{name} must be a random-access data source (len() and [i]), such as tfds.data_source(...) "
                    f"or a list of record dicts; got {type(source).__name__}.") from error
  if num_records == 0:
    raise ValueError(f"{name} is empty (len 0); check the split name and that the dataset was built.")
  dataset = grain.MapDataset.source(source).map_with_index(transforms.AttachIndex(num_records)).seed(seed)
  if shuffle:
    dataset = dataset.shuffle()
  dataset = dataset.repeat(num_epochs)
  return dataset[process_index::process_count]


def _padded_to_full_batches(records: grain.MapDataset, first_record: grain.MapDataset, *, num_records: int,
                            process_count: int, batch_size: int) -> grain.MapDataset:
  """This process's finite shard, topped up with padding rows to the same whole number of batches everywhere.

  Multi-host evaluation runs one jitted step per batch on every process together, so every process must yield
  the same number of full batches although the shards differ in length by one and the last batch is partial.
  """
  per_process = -(-num_records // process_count)
  target = -(-per_process // batch_size) * batch_size
  missing = target - len(records)
  if missing == 0:
    return records
  padding = first_record.repeat(missing).map(transforms.MarkPadding())
  return grain.MapDataset.concatenate([records, padding])


def _transformed(records: grain.MapDataset, *, resolution: int, max_text_len: int,
                 prompt_types: Sequence[str] | None, regenerate_prompts: bool,
                 vocab_path: str | None, keep_sep: bool) -> grain.MapDataset:
  """Records -> examples of the batch contract (without the batch dimension)."""
  dataset = records.map(transforms.DecodeAndValidate())
  if prompt_types is None:
    dataset = dataset.map(transforms.SelectStoredPrompt())
  else:
    dataset = dataset.random_map(transforms.SampleSpatialPrompt(prompt_types, regenerate=regenerate_prompts))
  return (dataset.map(transforms.ResizeToResolution(resolution))
          .map(transforms.Tokenize(max_text_len, vocab_path, keep_sep))
          .map(transforms.AssembleContract()))


def _batched_iterable(examples: grain.MapDataset, *, batch_size: int, drop_remainder: bool, worker_count: int,
                      read_threads: int, prefetch_batches: int) -> grain.IterDataset:
  """Batches and turns the random-access pipeline into a prefetching (optionally multi-process) stream."""
  return _stream(examples.batch(batch_size, drop_remainder=drop_remainder), worker_count=worker_count,
                 read_threads=read_threads, prefetch_batches=prefetch_batches)


def _stream(batches: grain.MapDataset, *, worker_count: int, read_threads: int,
            prefetch_batches: int) -> grain.IterDataset:
  """A random-access dataset of batches -> a prefetching (optionally multi-process) stream."""
  # The read buffer counts batches (elements after `batch`); grain's default of 500 would hold gigabytes.
  read_options = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=max(prefetch_batches, read_threads))
  stream = batches.to_iter_dataset(read_options)
  if worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                             per_worker_buffer_size=prefetch_batches))
  return stream


def make_dataset(
    source: Any,
    *,
    resolution: int,
    batch_size: int,
    max_text_len: int = 20,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    prompt_types: Sequence[str] | None = None,
    regenerate_prompts: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
    pad_to_full_batches: bool = False,
    vocab_path: str | None = None,
    keep_sep: bool = True,
    read_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
  """Batches of the batch contract (module docstring) from one random-access source of OmniRIS records.

  Training: `shuffle=True, num_epochs=None, prompt_types=('mask', 'box', 'scribble'), regenerate_prompts=True`.
  Evaluation: `shuffle=False, num_epochs=1, prompt_types=None, drop_remainder=False`, so each record is seen once
  with its stored prompt; on several processes add `pad_to_full_batches=True` and drop rows with `index == -1`.

  Args:
    source: `tfds.data_source(...)` split (see `from_tfds`) or any sequence of record dicts.
    resolution: S, the square side that images, masks and prompts are resized to (paper: 480).
    batch_size: examples per batch on this process: the global batch // process_count.
    max_text_len: L, the token length (paper: 20).
    seed: seeds the shuffle and all random choices; the same seed gives the same batches.
    shuffle: shuffle the records, differently each epoch.
    num_epochs: passes over the data; None repeats forever.
    prompt_types: None uses each record's stored `prompt_type` (evaluation, repeatable); a sequence drawn from
      ('mask', 'box', 'scribble') picks one at random per visual example (training).
    regenerate_prompts: with `prompt_types`, draw fresh boxes/scribbles from `ref_mask` instead of the stored ones.
    process_index: this process's index (`jax.process_index()`).
    process_count: how many processes read disjoint shards (`jax.process_count()`).
    worker_count: grain worker processes for the transforms; 0 runs them in this process (tests, debugging).
    drop_remainder: drop a last partial batch (keep it for evaluation).
    pad_to_full_batches: (finite `num_epochs` only) top every process's shard up with padding rows (copies of
      record 0 with `index = -1`) so that all processes yield the same number of full batches; for multi-host
      evaluation, where a partial or missing batch on one process would stall the others.
    vocab_path: the tokenizer's vocab.txt; None uses the pretrained MiniLM vocabulary.
    keep_sep: a cut text keeps [SEP] last (False: cut as the release does; see `Tokenizer`).
    read_threads: threads per process that produce batches ahead of `next()`, so input work overlaps the jitted
      step (which releases the GIL); 0 produces each batch inside `next()`.
    prefetch_batches: batches buffered ahead, per thread pool and per worker.

  Returns:
    A `grain.IterDataset`; `iter()` gives a `grain.DatasetIterator` with `get_state`/`set_state`.
  """
  _check_common_args(resolution=resolution, max_text_len=max_text_len, batch_size=batch_size,
                     num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                     worker_count=worker_count, prompt_types=prompt_types)
  records = _records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                     process_count=process_count, name="source")
  if pad_to_full_batches:
    if num_epochs is None:
      raise ValueError("pad_to_full_batches=True needs a finite num_epochs (it pads the end of the data).")
    first_record = _records(source, seed=seed, shuffle=False, num_epochs=1, process_index=0, process_count=1,
                            name="source")[0:1]
    records = _padded_to_full_batches(records, first_record, num_records=len(source) * num_epochs,
                                      process_count=process_count, batch_size=batch_size)
  examples = _transformed(records, resolution=resolution, max_text_len=max_text_len, prompt_types=prompt_types,
                          regenerate_prompts=regenerate_prompts, vocab_path=vocab_path, keep_sep=keep_sep)
  return _batched_iterable(examples, batch_size=batch_size, drop_remainder=drop_remainder,
                           worker_count=worker_count, read_threads=read_threads, prefetch_batches=prefetch_batches)


def make_mixed_dataset(
    text_source: Any,
    visual_source: Any,
    *,
    ratio: tuple[int, int] = DEFAULT_MIX_RATIO,
    mix_unit: str = "example",
    resolution: int,
    batch_size: int,
    max_text_len: int = 20,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    prompt_types: Sequence[str] | None = transforms.SPATIAL_PROMPT_TYPES,
    regenerate_prompts: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
    vocab_path: str | None = None,
    keep_sep: bool = True,
    read_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
  """Joint training (stage 3): text-guided and visual-guided examples interleaved at `ratio` (paper: 7:2).

  Each source is shuffled, repeated and sharded on its own (with its own seed derived from `seed`), then grain's
  `MapDataset.mix` interleaves them deterministically in the exact proportion: every run of
  `ratio[0] + ratio[1]` consecutive examples holds `ratio[0]` text-guided and `ratio[1]` visual-guided ones, so
  with `batch_size = 9` every batch is 7:2 as in the paper, and with other batch sizes the ratio holds over
  consecutive batches. With `mix_unit='batch'` the interleaved units are whole batches, each from one source:
  every run of `ratio[0] + ratio[1]` consecutive batches holds `ratio[0]` text-guided ones, and each batch carries
  `source` (B,) int32, 0 text / 1 visual. The mix is a function of the batch's position alone, so every process
  sees the same source at the same step, and the trainer can give text batches a step that skips the reference
  image's backbone pass and the visual decode without asking the other processes. With a finite `num_epochs` the
  stream ends when either source runs out.

  Args:
    text_source: records with text prompts (e.g. gRefCOCO train).
    visual_source: records with visual (or omni) prompts (e.g. OmniRef visual train).
    ratio: (text, visual) positive weights.
    mix_unit: 'example' (the paper's batch sample ratio) or 'batch', one of MIX_UNITS.
    Other arguments: as for `make_dataset`; `prompt_types` defaults to all three (training). `index` in a batch
      is the index within whichever source the example came from.

  Returns:
    A `grain.IterDataset` of batches of the batch contract, checkpointable like `make_dataset`'s.
  """
  _check_common_args(resolution=resolution, max_text_len=max_text_len, batch_size=batch_size,
                     num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                     worker_count=worker_count, prompt_types=prompt_types)
  if len(ratio) != 2 or any(not isinstance(weight, int) or weight < 1 for weight in ratio):
    raise ValueError(f"{ratio=} must be two positive ints (text, visual), e.g. (7, 2).")
  if mix_unit not in MIX_UNITS:
    raise ValueError(f"{mix_unit=} must be one of {MIX_UNITS}.")
  common = dict(shuffle=shuffle, num_epochs=num_epochs, process_index=process_index, process_count=process_count)
  # Distinct seeds so the two shuffles are unrelated even when the sources have the same length.
  text_records = _records(text_source, seed=seed, name="text_source", **common)
  visual_records = _records(visual_source, seed=seed + 1_000_003, name="visual_source", **common)
  streaming = dict(worker_count=worker_count, read_threads=read_threads, prefetch_batches=prefetch_batches)
  transforms_args = dict(resolution=resolution, max_text_len=max_text_len, prompt_types=prompt_types,
                         regenerate_prompts=regenerate_prompts, vocab_path=vocab_path, keep_sep=keep_sep)
  if mix_unit == "batch":
    text_batches, visual_batches = (
        _transformed(records, **transforms_args).batch(batch_size, drop_remainder=drop_remainder)
        .map(transforms.TagBatchSource(code)) for code, records in enumerate((text_records, visual_records)))
    return _stream(grain.MapDataset.mix([text_batches, visual_batches], weights=ratio), **streaming)
  mixed = grain.MapDataset.mix([text_records, visual_records], weights=ratio).seed(seed)
  return _batched_iterable(_transformed(mixed, **transforms_args), batch_size=batch_size,
                           drop_remainder=drop_remainder, **streaming)


def from_tfds(name: str, split: str, data_dir: str | None = None) -> Any:
  """Opens a built TFDS dataset split as a random-access source, with a clear error when it is not built yet.

  Never downloads or builds (that would be a long, silent side effect of reading); build first with
  `python -m tfds_omniref.build --config=shapes --data_dir=...` (TFDS's own `tfds build` needs TensorFlow).

  Args:
    name: 'builder/config', e.g. 'omniref/shapes'.
    split: e.g. 'train', 'test'.
    data_dir: where the dataset was built (TFDS's default, ~/tensorflow_datasets, when None).

  Returns:
    The split's `tfds.data_source`: `len()` and `[i]` give decoded record dicts.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when reading TFDS)

  builder_name = name.split("/")[0].split(":")[0]
  try:  # Importing a builder's module registers it with TFDS.
    importlib.import_module(f"tfds_omniref.{builder_name}")
  except ImportError:
    pass  # Not one of ours (or not installed): TFDS may still know it.
  how_to_build = f"build it first with `{prepare.build_command(name, data_dir)}`"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"TFDS does not know the dataset {name!r}; is its builder package (tfds_omniref) installed? "
                     f"({str(error).splitlines()[0]})") from error
  except (AssertionError, FileNotFoundError, OSError, NotImplementedError) as error:
    raise FileNotFoundError(f"The TFDS dataset {name!r} split={split!r} is not built in "
                            f"data_dir={data_dir!r}: {how_to_build}. ({str(error).splitlines()[0]})") from error
  except ValueError as error:
    if "split" in str(error).lower():
      raise ValueError(f"{split=} is not a split of the TFDS dataset {name!r}: {error}") from error
    raise
