"""Reconstruction attacks on federated updates, and the one metric protocol that scores them.

```python
from attacks import get_attack
rec = get_attack("idlg", iterations=300, seed=0).run(obs)
```

Registered attacks: ``dlg``, ``idlg``, ``inverting_gradients`` (gradient messages; the last also
FedAvg weights with a known learning rate and step count), ``dlm`` and ``dlm_plus`` (weights),
``see_through_gradients`` (GradInversion: BatchNorm statistics from the returned buffers),
``analytic`` (closed form through a fully connected first layer; gradients or FedAvg updates of
plain-SGD local steps); with public data (``capabilities.public_data``), ``learned_inversion``
and ``feature_inversion`` (:mod:`attacks.learned`) and ``gias`` (:mod:`attacks.generative`).
"""

from attacks import analytic as _analytic  # noqa: F401  (registers analytic)
from attacks import generative as _generative  # noqa: F401  (registers gias)
from attacks import gradient as _gradient  # noqa: F401  (registers dlg, idlg)
from attacks import inverting_gradients as _inverting  # noqa: F401  (registers inverting_gradients)
from attacks import learned as _learned  # noqa: F401  (registers learned_inversion, feature_inversion)
from attacks import see_through as _see_through  # noqa: F401  (registers see_through_gradients)
from attacks import weights as _weights  # noqa: F401  (registers dlm, dlm_plus)
from attacks.base import (
    ATTACKS,
    Attack,
    AttackConfigError,
    AttackParams,
    Attempt,
    UnknownAttackError,
    attack_class,
    available_attacks,
    get_attack,
    register_attack,
    unregister_attack,
)
from attacks.labels import infer_labels
from attacks.public import AttackerResources, PublicData, PublicDataError, load_public_data
from attacks.reconstruction import Reconstruction
from attacks.threat import AttackerCapabilities, PublicDataSpec, Requirements, ThreatModelError

__all__ = [
    "ATTACKS",
    "BUILTIN_ATTACKS",
    "Attack",
    "AttackConfigError",
    "AttackParams",
    "AttackerCapabilities",
    "AttackerResources",
    "Attempt",
    "PublicData",
    "PublicDataError",
    "PublicDataSpec",
    "Reconstruction",
    "Requirements",
    "ThreatModelError",
    "UnknownAttackError",
    "attack_class",
    "available_attacks",
    "get_attack",
    "infer_labels",
    "load_public_data",
    "register_attack",
    "unregister_attack",
]

#: The attacks that ship with Obscura (registered at import); anything else is a user's.
BUILTIN_ATTACKS = ATTACKS.mark_builtin()
