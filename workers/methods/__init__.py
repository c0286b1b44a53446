"""The segmentation methods on captured attention: DiffSeg, From Text to Mask, GEM, SLiMe.
Each is usable as a Python API without the service."""
