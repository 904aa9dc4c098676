"""TFDS builder `ris`: the referring image segmentation benchmarks of the paper's Table 3, as OmniRIS examples.

Configs (`tfds.data_source('ris/<config>', ...)`), all built from files the user downloads (manual directory):
  grefcoco       gRefCOCO (ReLA): multi-target and no-target refs (`ann_id` [-1]); splits train/val/testA/testB
  refcoco        RefCOCO, UNC splits train/val/testA/testB
  refcoco_plus   RefCOCO+, UNC splits train/val/testA/testB
  refcocog       RefCOCOg, UMD splits train/val/test

Every example is a text-modality OmniRIS example in the one feature spec of the package
(`tfds_omniref.omniref.features.omniris_features()`), so the same grain pipeline and evaluation read the RIS
benchmarks, the synthetic set and OmniRef alike:
  - ONE EXAMPLE PER SENTENCE, as ReLA and LAVT evaluate (every expression of a ref is scored on its own), in the
    order of the refs file; `id` is '<config>/<split>/<ref_id>/<sent_id>', `text` the sentence's `raw` string;
  - `mask` = `text_mask` = the union of the ref's COCO segmentations (decoded with pycocotools from polygons or
    RLE; crowd regions left out of a union that has other instances, as ReLA does); all zero for no target;
  - `setting` from the number of target instances: one_vs_one (1), one_vs_many (more), no_target (none);
    `no_target` True exactly for refs with `ann_id` [-1]; `category_ids` the targets' COCO categories;
  - the visual fields are the placeholders of a text example: `ref_image` and its prompts 1x1 zeros,
    `ref_image_id` and `ref_category_id` -1, `visual_mask` zeros; `modality` text, `prompt_type` none;
  - `image` is the COCO JPEG exactly as downloaded (a grayscale or CMYK file is converted to RGB and stored as
    PNG): decoding gives the pixels the reference loaders see, and the data dir stays about a third of the size
    it would have with re-encoded PNGs (each image is stored once per sentence).

Build (no TensorFlow), after putting the files where MANUAL_DOWNLOAD_INSTRUCTIONS says:

  python -m tfds_omniref.build --config ris/grefcoco --manual_dir ~/ris_data --data_dir ~/tensorflow_datasets

or `tfds_omniref.ris.data_source('grefcoco', 'val', data_dir=..., manual_dir=...)`, which builds on first use.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tfds_omniref.omniref import features as features_lib
from tfds_omniref.ris import refer_files

# Where the COCO train2014 images may be, relative to the manual directory: our layout first, then ReLA's
# (`datasets/images/train2014`) and refer's (`data/images/mscoco/images/train2014`), so a manual directory can be
# an existing ReLA `datasets/` or refer `data/` folder.
IMAGE_DIRS = ("train2014", os.path.join("images", "train2014"),
              os.path.join("images", "mscoco", "images", "train2014"))

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put these files in the manual directory (pass it as `--manual_dir`, or
`tfds.download.DownloadConfig(manual_dir=...)`; TFDS's default is <data_dir>/downloads/manual/):

  <manual_dir>/
    train2014/COCO_train2014_<12-digit id>.jpg
        COCO 2014 train images: http://images.cocodataset.org/zips/train2014.zip (unzip here;
        `images/train2014/` as ReLA has it, or `images/mscoco/images/train2014/` as refer has it, also work)
    grefcoco/grefs(unc).json, grefcoco/instances.json
        gRefCOCO, from the links in https://github.com/henghuiding/gRefCOCO (or ReLA's README,
        https://github.com/henghuiding/ReLA)
    refcoco/refs(unc).p, refcoco/instances.json
        RefCOCO: https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip (unzip; see
        https://github.com/lichengunc/refer)
    refcoco+/refs(unc).p, refcoco+/instances.json
        RefCOCO+: https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco+.zip
    refcocog/refs(umd).p, refcocog/instances.json
        RefCOCOg (UMD split): https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip (it holds both
        refs(google).p and refs(umd).p; the paper uses umd)

When bvisionweb1.cs.unc.edu is down, web.archive.org keeps copies of these three zips under the same URLs.
Only the folder of the config you build is needed, plus train2014/. Files are read as they are; nothing is
modified.
"""


@dataclasses.dataclass(eq=False)
class RisConfig(tfds.core.BuilderConfig):
  """A RIS benchmark: its folder in the manual directory, its refs file, and its splits.

  Attributes:
    folder: the dataset's folder in the manual directory ('grefcoco', 'refcoco', 'refcoco+', 'refcocog').
    refs_file: the refs file in that folder ('grefs(unc).json', 'refs(unc).p', 'refs(umd).p').
    splits: the split names as the refs file spells them, which are also the TFDS split names.
    homepage: where the refs file is published.
  """

  folder: str = ""
  refs_file: str = ""
  splits: tuple[str, ...] = ()
  homepage: str = "https://github.com/lichengunc/refer"

  def __post_init__(self):
    if not self.folder or not self.refs_file or not self.splits:
      raise ValueError(f"RisConfig {self.name!r} needs folder, refs_file and splits; got {self.folder=}, "
                       f"{self.refs_file=}, {self.splits=}.")


GREFCOCO = RisConfig(
    name="grefcoco", folder="grefcoco", refs_file="grefs(unc).json", splits=("train", "val", "testA", "testB"),
    homepage="https://github.com/henghuiding/gRefCOCO",
    description="gRefCOCO (ReLA): multi-target, single-target and no-target expressions; one example per sentence.")
REFCOCO = RisConfig(
    name="refcoco", folder="refcoco", refs_file="refs(unc).p", splits=("train", "val", "testA", "testB"),
    description="RefCOCO, UNC splits; one single-target example per sentence.")
REFCOCO_PLUS = RisConfig(
    name="refcoco_plus", folder="refcoco+", refs_file="refs(unc).p", splits=("train", "val", "testA", "testB"),
    description="RefCOCO+, UNC splits; one single-target example per sentence.")
REFCOCOG = RisConfig(
    name="refcocog", folder="refcocog", refs_file="refs(umd).p", splits=("train", "val", "test"),
    description="RefCOCOg, UMD splits; one single-target example per sentence.")


@dataclasses.dataclass(frozen=True)
class _Source:
  """What one config's files hold, checked: refs per split, the instances, and where the images are."""

  refs_path: str
  instances: refer_files.Instances
  image_dir: str
  refs_by_split: dict[str, list[refer_files.Ref]]


def find_image_dir(manual_dir: str) -> str:
  """The COCO train2014 image folder under `manual_dir` (see IMAGE_DIRS); FileNotFoundError when none exists."""
  for relative in IMAGE_DIRS:
    candidate = os.path.join(manual_dir, relative)
    if os.path.isdir(candidate):
      return candidate
  raise FileNotFoundError(f"No COCO train2014 image folder in the manual directory {manual_dir}: looked for "
                          f"{list(IMAGE_DIRS)}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def read_source(config: RisConfig, manual_dir: str) -> _Source:
  """Reads and checks every file `config` needs from `manual_dir`, before anything is written.

  Raises:
    FileNotFoundError: a file is missing (the message names it and gives the download instructions).
    ValueError: a record is malformed (the message names the file, the ref id and the field).
  """
  manual_dir = os.fspath(manual_dir)
  paths = {name: os.path.join(manual_dir, config.folder, name) for name in (config.refs_file, "instances.json")}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"ris/{config.name} needs {path}, which does not exist.\n"
                              f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  image_dir = find_image_dir(manual_dir)
  instances = refer_files.load_instances(paths["instances.json"])
  refs = refer_files.parse_refs(refer_files.load_ref_records(paths[config.refs_file]),
                                path=paths[config.refs_file], instances=instances, splits=config.splits,
                                image_dir=image_dir)
  refs_by_split = refer_files.group_by_split(refs, config.splits)
  empty = [split for split, rows in refs_by_split.items() if not rows]
  if empty:
    raise ValueError(f"{paths[config.refs_file]} has no refs in the splits {empty} of ris/{config.name}; is it "
                     f"the complete file ({config.refs_file}) of {config.folder}?")
  return _Source(refs_path=paths[config.refs_file], instances=instances, image_dir=image_dir,
                 refs_by_split=refs_by_split)


def _image_bytes(path: str, *, height: int, width: int, where: str) -> bytes:
  """The stored bytes of a target image: the JPEG as it is when RGB, else an RGB PNG; size checked."""
  with open(path, "rb") as file:
    data = file.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.size != (width, height):
        raise ValueError(f"{where}: {path} is {image.size[0]}x{image.size[1]} (width x height) but its 'width' "
                         f"and 'height' in instances.json say {width}x{height}.")
      if image.format == "JPEG" and image.mode == "RGB":
        return data
      return features_lib.encode_png(np.asarray(image.convert("RGB")), name=path)
  except (OSError, SyntaxError) as error:  # PIL's errors for a file that is not an image
    raise ValueError(f"{where}: {path} is not a readable image ({error}).") from error


class Builder(tfds.core.GeneratorBasedBuilder):
  """RIS benchmark builder (gRefCOCO, RefCOCO, RefCOCO+, RefCOCOg); the data contract is `omniris_features()`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: grefcoco, refcoco, refcoco_plus, refcocog as text OmniRIS examples, one per sentence.",
  }
  BUILDER_CONFIGS = [GREFCOCO, REFCOCO, REFCOCO_PLUS, REFCOCOG]
  DEFAULT_CONFIG_NAME = "grefcoco"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # README.md and CITATIONS.bib beside this file (see omniref_dataset_builder.py for why it is given explicitly).
  pkg_dir_path = epath.Path(__file__).parent
  code_path = epath.Path(__file__)

  def __init__(self, *, config: str | RisConfig | None = None, **kwargs):
    if isinstance(config, str):
      name = config.split(":")[0]
      known = [c.name for c in self.BUILDER_CONFIGS]
      if name not in known:
        raise ValueError(f"Unknown ris config {name!r}; known configs: {known}. "
                         "Pass one of them, e.g. tfds.builder('ris/grefcoco').")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features_lib.omniris_features(),
        # Examples stay in the refs file's order (ref by ref, sentence by sentence): index i of a split is the
        # i-th expression, as in ReLA's and LAVT's evaluation lists. grain shuffles at read time.
        disable_shuffling=True,
        homepage=self.builder_config.homepage,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = read_source(self.builder_config, os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(source=source, split=split) for split in self.builder_config.splits}

  def _generate_examples(self, source: _Source, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (id, example) for every sentence of every ref of `split`; masks and images are made once per ref."""
    config = self.builder_config
    for ref in source.refs_by_split[split]:
      where = f"{source.refs_path}: ref_id={ref.ref_id}"
      image = source.instances.images[ref.image_id]
      mask, used = refer_files.target_mask(ref, instances=source.instances, where=where)
      height, width = mask.shape
      if len(used) == 0:
        setting = "no_target"
      else:
        setting = "one_vs_one" if len(used) == 1 else "one_vs_many"
      mask = mask[..., None]
      placeholder_rgb, placeholder_mask = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 1), np.uint8)
      encoded = features_lib.encode_example({
          "id": f"{config.name}/{split}/{ref.ref_id}",
          "image_id": ref.image_id,
          # Replaced below by the image file's own bytes (encode_example only encodes arrays).
          "image": placeholder_rgb,
          "text": "",
          "text_mask": mask,
          "ref_image": placeholder_rgb,
          "ref_image_id": -1,
          "ref_mask": placeholder_mask,
          "ref_box": placeholder_mask,
          "ref_scribble": placeholder_mask,
          "visual_mask": np.zeros_like(mask),
          "mask": mask,
          "no_target": not used,
          "modality": "text",
          "setting": setting,
          "prompt_type": "none",
          "category_ids": sorted({int(a["category_id"]) for a in used if "category_id" in a}),
          "ref_category_id": -1,
      })
      image_file = refer_files.image_path(image, instances=source.instances, image_dir=source.image_dir,
                                          where=where)
      encoded["image"] = _image_bytes(image_file, height=height, width=width, where=where)
      for sentence in ref.sentences:
        example_id = f"{config.name}/{split}/{ref.ref_id}/{sentence.sent_id}"
        yield example_id, dict(encoded, id=example_id, text=sentence.text)


def build(config_name: str, *, data_dir: str, manual_dir: str | None = None) -> Builder:
  """Builds `ris/<config_name>` into `data_dir` (array_record, no TensorFlow; a no-op when already built)."""
  builder = Builder(config=config_name, data_dir=os.fspath(data_dir), file_format="array_record")
  download_config = tfds.download.DownloadConfig(
      try_download_gcs=False, manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
  builder.download_and_prepare(download_config=download_config)
  return builder


def data_source(config_name: str, split: str, *, data_dir: str, manual_dir: str | None = None):
  """Random-access examples of `ris/<config_name>` `split`, building the dataset from `manual_dir` first if needed.

  Args:
    config_name: 'grefcoco', 'refcoco', 'refcoco_plus' or 'refcocog'.
    split: one of the config's splits (train/val/testA/testB; refcocog: train/val/test).
    data_dir: the TFDS data directory (the dataset lands in `<data_dir>/ris/<config_name>/<version>/`).
    manual_dir: where the downloaded files are (MANUAL_DOWNLOAD_INSTRUCTIONS); TFDS's default when None.
  """
  splits = next((c.splits for c in Builder.BUILDER_CONFIGS if c.name == config_name), None)
  if splits is not None and split not in splits:
    raise ValueError(f"{split=} is not a split of ris/{config_name}; its splits are {list(splits)}.")
  return build(config_name, data_dir=data_dir, manual_dir=manual_dir).as_data_source(split=split)
