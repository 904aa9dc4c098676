"""TFDS dataset packages of omniris_jax; importing this package registers the `omniref` builder with TFDS.

  import tfds_omniref
  source = tfds_omniref.omniref.data_source('shapes', 'train', data_dir='~/tensorflow_datasets')

or, once registered, the plain TFDS calls: `tfds.builder('omniref/shapes', data_dir=...)`,
`tfds.data_source('omniref/shapes', split='train', data_dir=...)`. See README.md.
"""

from tfds_omniref import omniref
from tfds_omniref import ris  # registers the `ris` builder (RIS benchmarks) too

__all__ = ["omniref"]
