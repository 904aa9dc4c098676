"""The `omniref` TFDS dataset: OmniRIS examples behind one feature spec (importing this registers the builder).

  features.py                    the OmniRIS feature spec (`omniris_features()`) and PNG encoding
  shapes.py                      the procedural `shapes` scenes (plain numpy; also usable without TFDS)
  omniref_dataset_builder.py     the TFDS `Builder` (configs `shapes`, `shapes_tiny`) and `data_source(...)`
"""

from tfds_omniref.omniref.omniref_dataset_builder import Builder
from tfds_omniref.omniref.omniref_dataset_builder import data_source
from tfds_omniref.omniref.omniref_dataset_builder import OmnirefConfig

__all__ = ["Builder", "OmnirefConfig", "data_source"]
