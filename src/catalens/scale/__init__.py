"""Scaling out: the embed/predict pipeline on a Ray cluster (:mod:`catalens.scale.ray_runner`)."""
from catalens.scale.ray_runner import (ClusterPlan, RayOptions, connect, plan_cluster, ray_embed_to_folder,
                                       ray_predict_catalogue)

__all__ = ["ClusterPlan", "RayOptions", "connect", "plan_cluster", "ray_embed_to_folder", "ray_predict_catalogue"]
