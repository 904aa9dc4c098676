"""Pallas kernels. Each has a plain jax.numpy reference in omniris_jax.models that its tests compare against."""
