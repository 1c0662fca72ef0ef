"""MLflow fixtures: a real tracking server on loopback with a registered scikit-learn model
(`mlflow_support`), and the session app's API pointed at it (`configured`)."""

from __future__ import annotations

from mlflow_support import configured, mlflow_server, tracking

__all__ = ["configured", "mlflow_server", "tracking"]  # importing them here is what registers them
