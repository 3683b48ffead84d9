"""Scoring reconstructions: the one metric protocol (images in [0, 1], ``data_range=1``, one
Hungarian assignment per batch), LPIPS, the population reference (mean image and identification
pool) and the figures that show reconstructions beside the truth.

Scoring sits apart from the attacks (as in breaching): an attack never sees the ground truth.
"""
