"""Imported first by every benchmark script: ``benchmarks/attacks.py`` is named like the
``attacks`` package, so a script's own folder (put on ``sys.path`` by Python) would shadow the
package. This removes that folder from ``sys.path``, and appends the project root, so that the
helpers benchmarks share with the tests import as ``tests._support`` (sample images, the textbook
Inverting Gradients loop)."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.append(str(_HERE.parent))
