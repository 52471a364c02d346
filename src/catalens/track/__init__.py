"""Experiment tracking (MLflow): :func:`log_training` after every train, run listing and comparison, a preset run's leaderboard."""
from catalens.track.mlflow_tracking import (compare_runs, list_runs, log_training, run_leaderboard,
                                            tracking_enabled, tracking_uri)

__all__ = ["compare_runs", "list_runs", "log_training", "run_leaderboard", "tracking_enabled", "tracking_uri"]
