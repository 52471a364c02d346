"""Task heads over backbone features, shaped like scikit-learn estimators."""
from catalens.heads.estimator import HEADS, MultiTaskHead, create_head

__all__ = ["HEADS", "MultiTaskHead", "create_head"]
