"""TFDS builder `omniref`: OmniRIS examples from several sources behind one feature spec.

Configs (`tfds.data_source('omniref/<config>', ...)`):
  shapes        procedural scenes (no download; shapes.py), 128x128, 3000 train + 3 x 300 test examples
  shapes_tiny   the same generator at 64x64 with 18 + 3 x 9 examples, for tests
  released      the authors' OmniRef files + COCO train2014 images from the manual directory (released.py;
                `MANUAL_DOWNLOAD_INSTRUCTIONS` says where each file comes from); train = visual-train
  rebuilt       the paper's four-step construction (Sec. 4.2) from COCO instances + gRefCOCO + RefCOCOg in the
                manual directory (rebuilt.py: selection criteria, split assignment); train is visual-only
The RIS benchmarks (builder `ris`, tfds_omniref/ris/) yield the same features (features.py).

Splits: `train` (all modalities mixed), `text_test`, `visual_test`, `omni_test` (each one third single-target,
one third multi-target, one third no-target). Files are array_record, so reading needs no TensorFlow:

  import tfds_omniref  # registers the builder
  builder = tfds.builder('omniref/shapes', data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  source = tfds.data_source('omniref/shapes', data_dir=data_dir, split='train')  # random access for grain
"""

from __future__ import annotations

import dataclasses

from etils import epath
import tensorflow_datasets as tfds

from tfds_omniref.omniref import features as features_lib
from tfds_omniref.omniref import rebuilt as rebuilt_lib
from tfds_omniref.omniref import released as released_lib
from tfds_omniref.omniref import shapes as shapes_lib

_SOURCES = ("shapes", "released", "rebuilt")


@dataclasses.dataclass(eq=False)
class OmnirefConfig(tfds.core.BuilderConfig):
  """A builder config: which source to read, and that source's parameters.

  Attributes:
    source: 'shapes' for now (later also 'released', 'rebuilt' and the RIS benchmarks).
    shapes: the generator parameters when `source == 'shapes'`.
  """

  source: str = "shapes"
  shapes: shapes_lib.ShapesConfig | None = None
  released: released_lib.ReleasedConfig | None = None
  rebuilt: rebuilt_lib.RebuiltConfig | None = None

  def __post_init__(self):
    if self.source not in _SOURCES:
      raise ValueError(f"OmnirefConfig {self.name!r}: {self.source=} must be one of {_SOURCES}.")
    if self.source == "shapes" and not isinstance(self.shapes, shapes_lib.ShapesConfig):
      raise ValueError(f"OmnirefConfig {self.name!r} with source 'shapes' needs shapes=ShapesConfig(...); "
                       f"got {self.shapes!r}.")
    if self.source == "released" and not isinstance(self.released, released_lib.ReleasedConfig):
      raise ValueError(f"OmnirefConfig {self.name!r} with source 'released' needs released=ReleasedConfig(...); "
                       f"got {self.released!r}.")
    if self.source == "rebuilt" and not isinstance(self.rebuilt, rebuilt_lib.RebuiltConfig):
      raise ValueError(f"OmnirefConfig {self.name!r} with source 'rebuilt' needs rebuilt=RebuiltConfig(...); "
                       f"got {self.rebuilt!r}.")


# The shapes configs' own version: their examples change with the generator, the real datasets' do not.
_SHAPES_VERSION = "1.1.0"
_SHAPES_RELEASE_NOTES = {
    "1.0.0": "First release of the procedural scenes.",
    "1.1.0": "No-target text prompts are worded like the targeted ones (colour, size, position, category "
             "groups, conjunctions); in 1.0.0, 95% of them read 'the <colour> <category>', which gave the answer "
             "away. Visual prompts are unchanged.",
}
SHAPES = OmnirefConfig(
    name="shapes",
    version=_SHAPES_VERSION,
    release_notes=_SHAPES_RELEASE_NOTES,
    description="Procedural OmniRIS scenes (128x128): 3000 train, 300 per test split; no download.",
    source="shapes",
    shapes=shapes_lib.ShapesConfig(),
)
SHAPES_TINY = OmnirefConfig(
    name="shapes_tiny",
    version=_SHAPES_VERSION,
    release_notes=_SHAPES_RELEASE_NOTES,
    description="Procedural OmniRIS scenes (64x64), 18 train and 9 per test split, for tests.",
    source="shapes",
    shapes=shapes_lib.ShapesConfig(image_size=64, num_train=18, num_text_test=9, num_visual_test=9,
                                   num_omni_test=9, seed=1),
)
RELEASED = OmnirefConfig(
    name="released",
    description=("The authors' released OmniRef (manual download: OmniRef.json, instances.json, "
                 "SuppImageAnns.json, COCO train2014 images); test-split references and scribbles fixed by seed."),
    source="released",
    released=released_lib.ReleasedConfig(),
)
REBUILT = OmnirefConfig(
    name="rebuilt",
    description=("OmniRef rebuilt by the paper's four steps from COCO train2014 instances + images, gRefCOCO and "
                 "RefCOCOg (manual download); selection criteria and split assignment in rebuilt.py."),
    source="rebuilt",
    rebuilt=rebuilt_lib.RebuiltConfig(),
)


def shapes_generator(dataset_name: str) -> shapes_lib.ShapesConfig:
  """The generator parameters behind a shapes dataset name ('omniref/shapes', 'omniref/shapes_tiny:1.1.0'), for
  tools that regenerate an example's scene; a ValueError for any other dataset."""
  builder, _, config = dataset_name.partition("/")
  name = config.split(":")[0]
  for candidate in (SHAPES, SHAPES_TINY):
    if builder == "omniref" and name == candidate.name:
      return candidate.shapes
  raise ValueError(f"{dataset_name!r} is not a synthetic shapes dataset ('omniref/{SHAPES.name}' or "
                   f"'omniref/{SHAPES_TINY.name}'): only those have scenes to regenerate.")


class Builder(tfds.core.GeneratorBasedBuilder):
  """OmniRIS dataset builder; the data contract is `features.omniris_features()`."""

  VERSION = tfds.core.Version("1.0.0")  # of `released` and `rebuilt`; `shapes*` carry their own (_SHAPES_VERSION)
  RELEASE_NOTES = {
      "1.0.0": "First release: the OmniRIS feature spec and the procedural `shapes` and `shapes_tiny` configs.",
  }
  BUILDER_CONFIGS = [SHAPES, SHAPES_TINY, RELEASED, REBUILT]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (released_lib.MANUAL_DOWNLOAD_INSTRUCTIONS + "\n" +
                                  rebuilt_lib.MANUAL_DOWNLOAD_INSTRUCTIONS)
  DEFAULT_CONFIG_NAME = "shapes"
  # Where TFDS finds README.md and CITATIONS.bib (the description and citation it reports) and checksums.tsv:
  # beside this file. Given from __file__ because TFDS's own inference goes through importlib.resources, which
  # fails when an editable install maps tfds_omniref as a namespace package.
  pkg_dir_path = epath.Path(__file__).parent
  code_path = epath.Path(__file__)

  def __init__(self, *, config: str | OmnirefConfig | None = None, **kwargs):
    # TFDS only lists configs whose names are close to an unknown one (often none); list them all instead.
    if isinstance(config, str):
      name = config.split(":")[0]
      known = [c.name for c in self.BUILDER_CONFIGS]
      if name not in known:
        raise ValueError(f"Unknown omniref config {name!r}; known configs: {known}. "
                         "Pass one of them, e.g. tfds.builder('omniref/shapes').")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features_lib.omniris_features(),
        # Stored in generation order, so index i of a split is example i ('<config>/<split>/<i:06d>');
        # grain shuffles at read time.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.source == "released":
      return self._released_split_generators(dl_manager)
    if config.source == "rebuilt":
      return self._rebuilt_split_generators(dl_manager)
    return {split: self._generate_examples(split=split) for split in config.shapes.split_sizes()}

  def _generate_examples(self, split: str):
    """Yields (key, example) for one split of the shapes source; the key is the example id."""
    config = self.builder_config
    for example in shapes_lib.generate_split(config.shapes, split, config_name=config.name):
      yield example["id"], features_lib.encode_example(example)

  def _released_split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Reads and validates every record of the release before any split is written (released.py)."""
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as error:  # TFDS: the manual directory does not exist or is empty
      raise FileNotFoundError(f"omniref/{self.builder_config.name}: {error}") from None
    files = released_lib.load(manual_dir, self.builder_config.released)
    plans = {split: files.plan_split(split) for split in released_lib.SPLIT_KEYS}
    return {split: self._generate_released_examples(files, split, plans[split]) for split in plans}

  def _generate_released_examples(self, files: released_lib.ReleasedFiles, split: str, plans):
    """Yields (key, example) for one split of the released OmniRef; the key is the example id."""
    for example in released_lib.generate_split(files, split, config_name=self.builder_config.name, plans=plans):
      yield example["id"], features_lib.encode_example(example)

  def _rebuilt_split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Runs the four steps on ids (reading and validating every source file) before any split is written.

    Each split is a sized iterable (its length drives build.py's overall ETA); decoding and PNG encoding run in
    $OMNIREF_BUILD_WORKERS forked processes (default 1), in the same order whatever the number.
    """
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as error:  # TFDS: the manual directory does not exist or is empty
      raise FileNotFoundError(f"omniref/{self.builder_config.name}: {error}\n"
                              f"{rebuilt_lib.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    sources = rebuilt_lib.load(manual_dir, self.builder_config.rebuilt)
    construction = rebuilt_lib.plan(sources)
    rebuilt_lib.check_not_empty(construction, manual_dir)
    return {split: rebuilt_lib.SplitExamples(sources, construction.examples[split], self.builder_config.name)
            for split in rebuilt_lib.SPLITS}


def data_source(config_name: str, split: str, *, data_dir: str, manual_dir: str | None = None):
  """Random-access examples of `omniref/<config_name>` `split`, building the dataset in `data_dir` first if needed.

  The one call the pipeline and the main command need: it builds array_record files (no TensorFlow), never
  looks for a prebuilt copy on the public TFDS bucket (this dataset is not there; stay offline), and returns
  `tfds.data_source`'s sequence (`len(source)`, `source[i]` -> a dict of numpy values, see features.py).

  Args:
    config_name: a name in `Builder.BUILDER_CONFIGS` ('shapes', 'shapes_tiny').
    split: 'train', 'text_test', 'visual_test' or 'omni_test'.
    data_dir: the TFDS data directory (the dataset lands in `<data_dir>/omniref/<config_name>/<version>/`).
    manual_dir: where the manually downloaded files are, for configs that need them ('released'); TFDS's
      default is `<data_dir>/downloads/manual`.
  """
  builder = Builder(config=config_name, data_dir=data_dir, file_format="array_record")
  splits = list(builder.builder_config.shapes.split_sizes()) if builder.builder_config.shapes else []
  if splits and split not in splits:
    raise ValueError(f"{split=} is not a split of omniref/{config_name}; its splits are {splits}.")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                                           manual_dir=manual_dir))
  return builder.as_data_source(split=split)
