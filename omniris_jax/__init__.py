"""omniris_jax: Omni-Referring Image Segmentation (OmniRIS) and its OmniSegNet baseline in JAX/Flax.

Layout (each piece has its own room):
  models/    Flax modules: Swin, BERT, deformable attention, pixel/prompt encoders, mask decoder, OmniSegNet
  kernels/   Pallas kernels (the jnp versions in models/ are their references)
  data/      the grain input pipeline, transforms, spatial prompts, tokenizer
  metrics.py the OmniRIS/GRES metrics (cIoU, gIoU, N-acc, T-acc, Pr@X)
The TFDS dataset builders live in the sibling package `tfds_omniref`.
"""

__version__ = "0.1.0"
