"""Local training's clients: the plain model (:class:`LocalClient`) and the decomposed one (:class:`LocalLoRAClient`)."""

from clients.base import MethodClient
from clients.params import Decomposition, LoRA
from fedlora_flwr.groups import ParameterPartition, everything
from fedlora_flwr.requirements import Requirements


class LocalClient(MethodClient):
    """Local: every client trains its own model alone (the no-federation baseline of FedLoRA's Table 1).

    Every tensor is personal (kept in the client's store); nothing is shared or frozen. Each round
    the client continues its own model for E = ``local-epochs`` epochs of SGD (the run's
    ``lr``/``momentum``, a fresh optimizer every round) on its cross-entropy, i.e. T·E epochs in
    all, and evaluates it every round. Server (:class:`strategies.local.LocalStrategy`): receives
    no arrays; a client's trajectory does not depend on any other client. Runs on a
    ``model-family`` (each client its own architecture).

    Parameters
    ----------
    None: the run's core keys only.
    """

    requires = Requirements(model_family=True)
    partition = ParameterPartition(personal=everything)


class LocalLoRAClient(LocalClient):
    """Local w/ LoRA: the FedLoRA paper's Table 4 control, on a model trained from scratch.

    FedLoRA's decomposed model (θ = σ + B·A) trained jointly, σ and τ together, for E epochs a
    round and kept on the client: no communication. The official code has no switch for this
    control; joint training without communication is our reading of the table.

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


class LocalLoRAParams(Decomposition, LoRA):
    """``local-lora``'s keys: the decomposition's from scratch, PEFT LoRA's on a pretrained model."""
