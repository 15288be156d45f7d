"""Local training's server: nothing is shared, so nothing is aggregated.

Clients reply with an empty ArrayRecord; the server only schedules rounds and collects the
evaluation of each client's own model.
"""

from strategies.base import PersonalizedStrategy


class LocalStrategy(PersonalizedStrategy):
    """The base strategy with an empty shared set: it sends and averages zero tensors."""

    shares_arrays = False
