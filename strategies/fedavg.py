"""FedAvg server (McMahan et al., 2017; METHODS.md E.1): sample-weighted mean of every tensor."""

from strategies.base import PersonalizedStrategy


class FedAvgStrategy(PersonalizedStrategy):
    default_aggregation = "weighted"
