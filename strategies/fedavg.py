"""FedAvg's server (McMahan et al., AISTATS 2017): the sample-weighted mean of every tensor uploaded.

Also the server of every method whose clients share a fixed set of tensors (FedPer, FedRep, FedBN,
FedRoD, pFedSD, pFedGate, the adapter methods, pFedLoRA, PF2LoRA): w̄ = Σ_k (n_k / n)·w_k over the
participants' uploads, BatchNorm statistics included (integer counters rounded).
"""

from strategies.base import PersonalizedStrategy


class FedAvgStrategy(PersonalizedStrategy):
    default_aggregation = "weighted"
