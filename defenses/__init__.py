"""Defenses against data-reconstruction attacks, each a registered set of client hooks with a
declared search space.

```python
from defenses import get_defense, available_defenses
defense = get_defense("precode", bottleneck=256, beta=1e-3)
```
"""

from defenses import (  # noqa: F401  (importing registers the built-in defenses)
    dp_sgd,
    noise,
    obscure,
    precode,
    pruning,
    shadow,
    soteria,
    weight_dp,
)
from defenses.base import (
    DEFENSES,
    Defense,
    DefenseConfigError,
    DefenseParams,
    NoDefense,
    ParamSpec,
    UnknownDefenseError,
    available_defenses,
    defense_class,
    get_defense,
    register_defense,
    unregister_defense,
)

__all__ = [
    "BUILTIN_DEFENSES",
    "DEFENSES",
    "Defense",
    "DefenseConfigError",
    "DefenseParams",
    "NoDefense",
    "ParamSpec",
    "UnknownDefenseError",
    "available_defenses",
    "defense_class",
    "get_defense",
    "register_defense",
    "unregister_defense",
]

#: The defenses that ship with Obscura (registered at import); anything else is a user's.
BUILTIN_DEFENSES = DEFENSES.mark_builtin()
