"""catalens.train: the training pipeline (ingest → embed → heads → model folder), fine-tuning,
k-fold, search.

``catalens.train(data, out, label=...)`` is the one-line training call (:func:`catalens.api.train`).
Python binds a package's name to the package once it is imported, so this package is itself
callable and forwards to that function: ``catalens.train(df, "models/x", label="category")``
works whether or not ``catalens.train.pipeline`` was imported before.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from catalens.api import train

        return train(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        from catalens.api import train

        return inspect.signature(train)


sys.modules[__name__].__class__ = _CallablePackage
