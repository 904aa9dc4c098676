"""The input pipeline: TFDS data source -> grain transforms -> batches that follow the data contract."""
