"""Study orchestrator: Ray Tune x Optuna Pareto studies, MLflow tracking, Parquet results.

```python
from orchestrator import Study, register_objective
results = Study.from_yaml("studies/quickstart.yaml").run()
```
"""

from orchestrator.analysis import StudyResults
from orchestrator.config import StudyConfig, StudyFileError, load_study
from orchestrator.metrics import register_objective
from orchestrator.study import Study

__all__ = [
    "Study",
    "StudyConfig",
    "StudyFileError",
    "StudyResults",
    "load_study",
    "register_objective",
]
