"""Flax modules of OmniSegNet. Nothing here names a mesh axis: parameters and activations carry logical axis names (see layers.py)."""
