"""Restoration pipelines: tiling, and the tasks (super-resolution, inpainting, faces) built on it."""
