"""omniris_jax: Omni-Referring Image Segmentation (OmniRIS) and its OmniSegNet baseline in JAX/Flax.

Layout (each piece has its own room):
  models/      Flax modules: Swin, BERT, deformable attention, pixel/prompt encoders, mask decoder, OmniSegNet;
               models/proj/<project>/ holds a project's additions around them (the synthetic demo's: shapes)
  kernels/     Pallas kernels (the jnp versions in models/ are their references)
  data/        the grain input pipeline, training sources, transforms, spatial prompts, tokenizer
  evaluators/  the test splits scored in the paper's layout
  train.py     the stage loop (main.py is its command line)
  predict.py   a trained model on your own images: Predictor (encode once, many prompts) and its CLI
  export.py    the predictor's two halves as jax.export artifacts; serve.py: the browser demo
  metrics.py   the OmniRIS/GRES metrics (cIoU, gIoU, N-acc, T-acc, Pr@X)
The TFDS dataset builders live in the sibling package `tfds_omniref`.
"""

__version__ = "0.1.0"
