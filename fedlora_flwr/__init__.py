"""fedlora-flwr: personalized federated learning with low-rank adaptation on Flower.

:func:`load_runs` and :func:`load_client_accuracies` (``fedlora_flwr.runs``) load run folders
into pandas; they are imported on first use, so that the apps do not import pandas.
"""

__all__ = ["load_client_accuracies", "load_runs"]


def __getattr__(name: str):
    if name in __all__:
        from fedlora_flwr import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'fedlora_flwr' has no attribute {name!r}")
