"""OmniSegNet with the additions that let a small model learn the synthetic `shapes` data on a CPU.

Neither the paper nor the authors' release has them; `configs/proj/shapes/` turns them on for the demo variants.
"""
