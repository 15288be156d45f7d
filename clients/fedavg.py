"""FedAvg's clients: the plain model (:class:`FedAvgClient`) and the decomposed one (:class:`FedAvgLoRAClient`)."""

from clients.base import MethodClient
from clients.params import Decomposition
from fedlora_flwr.requirements import Requirements


class FedAvgClient(MethodClient):
    """FedAvg: "Communication-Efficient Learning of Deep Networks from Decentralized Data"
    (McMahan et al., AISTATS 2017, arXiv 1602.05629).

    Every tensor is shared, BatchNorm running statistics included; nothing is personal or frozen.
    Round t: client k loads the global model w^t and runs E = ``local-epochs`` epochs of SGD (the
    run's ``lr``/``momentum``, a fresh optimizer every round) on its cross-entropy F_k(w) over all
    parameters, then uploads w_k^{t+1}. Server (:class:`strategies.fedavg.FedAvgStrategy`):
    w^{t+1} = Σ_k (n_k / n)·w_k^{t+1} over the participants, n_k their training sizes, buffers
    included (PFLlib averages ``parameters()`` only, so its BN statistics are the first
    uploader's). Every client evaluates w^{t+1} on its own test split.

    Parameters
    ----------
    None: the run's core keys only.
    """


class FedAvgLoRAClient(FedAvgClient):
    """FedAvg w/ LoRA: the FedLoRA paper's Table 4 control (same paper as ``fedlora``).

    The model is decomposed as in FedLoRA (θ = σ + B·A on every conv/linear layer); σ and τ = (A, B)
    are trained jointly for E epochs as one FedAvg model and both are shared and sample-weighted
    averaged (:class:`strategies.fedavg.FedAvgStrategy`). The official code has no switch for this
    control; joint training with both averaged is our reading of the table.

    Parameters
    ----------
    rank-conv : float, default 0.6
        R_c: conv rank R = int(R_c·O).
    rank-linear : float, default 0.6
        R_l: linear rank r = round(R_l·min(in, out)).
    """

    params = Decomposition
    requires = Requirements(decomposable=True)
    decomposed = True
