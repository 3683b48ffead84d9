"""Study orchestrator: Ray Tune x Optuna studies, MLflow tracking (not implemented yet)."""
