"""The `ris` TFDS dataset: the RIS benchmarks of the paper's Table 3 as OmniRIS text examples (importing this
registers the builder).

  refer_files.py           readers for refer pickles (`refs(unc).p`, `refs(umd).p`), gRefCOCO's `grefs(unc).json`
                           and COCO `instances.json`, checked record by record; target masks via pycocotools
  ris_dataset_builder.py   the TFDS `Builder` (configs grefcoco, refcoco, refcoco_plus, refcocog), `build(...)`
                           and `data_source(...)`
"""

from tfds_omniref.ris.ris_dataset_builder import build
from tfds_omniref.ris.ris_dataset_builder import Builder
from tfds_omniref.ris.ris_dataset_builder import data_source
from tfds_omniref.ris.ris_dataset_builder import MANUAL_DOWNLOAD_INSTRUCTIONS
from tfds_omniref.ris.ris_dataset_builder import RisConfig

__all__ = ["Builder", "MANUAL_DOWNLOAD_INSTRUCTIONS", "RisConfig", "build", "data_source"]
