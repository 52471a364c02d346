"""Sub-commands of the ``catalens`` CLI; each module exposes ``register(subparsers)``."""
