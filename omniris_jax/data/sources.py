"""The training data of a stage: dataset splits as random-access sources, and the stream the train loop reads.

A source config (`config.dataset.text_source` / `visual_source`) names a TFDS split, optionally restricted to some
modalities; with `generated`, a procedural dataset's (shapes') train examples are made on demand instead, so no
scene is seen twice. `make_train_iterator` reads one source or mixes the two at `config.mix_ratio`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from omniris_jax import metrics
from omniris_jax.data import pipeline, prepare
from omniris_jax.models import factory

MODALITY_CODES = {name: code for code, name in enumerate(metrics.MODALITY_NAMES)}


class Subset:
  """A random-access view of some records of a source (those of the wanted modalities)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[self._indices[index]]


def open_training_source(source_config: Any) -> Any:
  """A dataset split as a random-access source, restricted to `source_config.modalities` when given; with
  `source_config.generated`, a procedural dataset's train examples made on demand instead of the stored split."""
  builder = prepare.ensure_built(source_config.name, source_config.data_dir)
  modalities = source_config.get("modalities")
  unknown = [m for m in (modalities or ()) if m not in MODALITY_CODES]
  if unknown:
    raise ValueError(f"modalities={tuple(modalities)} of {source_config.name}:{source_config.split}: {unknown} "
                     f"are not among {metrics.MODALITY_NAMES}.")
  if source_config.get("generated"):
    return _generated_source(builder, source_config, modalities)
  source = pipeline.from_tfds(source_config.name, source_config.split, source_config.data_dir)
  if not modalities:
    return source
  wanted = {MODALITY_CODES[m] for m in modalities}
  light = prepare.open_split(source_config.name, source_config.split, source_config.data_dir, decode_images=False)
  indices = [i for i in range(len(light)) if int(light[i]["modality"]) in wanted]
  if not indices:
    raise ValueError(f"{source_config.name}:{source_config.split} has no examples of modalities "
                     f"{tuple(modalities)}.")
  return Subset(source, indices)


def _generated_source(builder: Any, source_config: Any, modalities: Sequence[str] | None) -> Any:
  """The train examples of a procedural (shapes) dataset config, generated on demand (shapes.GeneratedTrainSource)."""
  generator_config = getattr(builder.builder_config, "shapes", None)
  if generator_config is None or source_config.split != "train":
    raise ValueError(f"generated=True needs the train split of a procedural dataset (omniref/shapes, "
                     f"omniref/shapes_tiny); {source_config.name}:{source_config.split} is stored data: set "
                     "generated=False to read it as it is.")
  from tfds_omniref.omniref import shapes  # pylint: disable=g-import-not-at-top  (only for synthetic data)
  return shapes.GeneratedTrainSource(generator_config, modalities, config_name=builder.builder_config.name,
                                     category_maps=bool(source_config.get("category_maps")))


def make_train_iterator(config: Any, local_batch: int) -> Any:
  """The training stream of this stage: one source, or text and visual sources mixed at `config.mix_ratio`."""
  common = dict(resolution=config.input.resolution, batch_size=local_batch, max_text_len=config.input.max_text_len,
                seed=config.seed, prompt_types=tuple(config.input.prompt_types),
                regenerate_prompts=config.input.regenerate_prompts, process_index=jax.process_index(),
                process_count=jax.process_count(), worker_count=config.input.worker_count,
                vocab_path=factory.text_encoder_vocab(config), keep_sep=config.input.get("keep_sep", True))
  if config.train_data == "mixed":
    dataset = pipeline.make_mixed_dataset(open_training_source(config.dataset.text_source),
                                          open_training_source(config.dataset.visual_source),
                                          ratio=tuple(config.mix_ratio),
                                          mix_unit=config.get("mix_unit", "example"), **common)
  elif config.train_data in ("text", "visual"):
    dataset = pipeline.make_dataset(open_training_source(config.dataset[f"{config.train_data}_source"]), **common)
  else:
    raise ValueError(f"config.train_data={config.train_data!r} must be 'text', 'visual' or 'mixed'.")
  return iter(dataset)
