"""Helpers that tests and benchmark scripts share (not part of any package Obscura ships):
real sample images (:mod:`tests._support.samples`) and the textbook Inverting Gradients loop
(:mod:`tests._support.reference`). Importable from the project root (``python -m pytest``);
benchmark scripts reach them through ``benchmarks/_isolate.py``, which puts the root on the
path."""
