"""FedLoRA's client: σ + B·A per layer, τ trained before σ each round (:class:`FedLoRAClient`)."""

from typing import Literal

from pydantic import Field
from torch import nn

from clients.base import MethodClient
from clients.params import Decomposition
from fedlora_flwr.groups import ParameterPartition, Phase
from fedlora_flwr.lora import is_lora_key
from fedlora_flwr.requirements import Requirements


def is_tau(key: str, _module: nn.Module) -> bool:
    return is_lora_key(key)


class FedLoRAParams(Decomposition):
    lora_epochs: int = Field(2, ge=0, description="E_lora: epochs of τ before σ each round (eq. 6); "
                             "0 trains σ alone (FedAvg on the decomposed model)")
    lora_schedule: Literal["alternating", "simultaneous"] = Field(
        "alternating", description="alternating: τ then σ (Alg. 1); simultaneous: both for E epochs (Table 3)")

    def check(self, config) -> None:
        if self.lora_schedule == "alternating" and self.lora_epochs > config.local_epochs:
            raise ValueError(f"lora-epochs={self.lora_epochs}: {self.lora_epochs} exceeds local-epochs={config.local_epochs}")


class FedLoRAClient(MethodClient):
    """FedLoRA: "When Personalized Federated Learning Meets Low-Rank Adaptation" (anonymous ICLR
    submission); official code: FedDecomp (github XinghaoWu/FedDecomp; Wu et al., arXiv 2406.19931).

    Every conv and linear weight is decomposed as θ = σ + τ, τ = B·A low-rank (eqs. 2–5;
    :func:`fedlora_flwr.lora.decompose`, with the official code's ranks, layout and init).

    - shared σ: every tensor whose key has no ``lora_``: full-rank weights, biases, BatchNorm
      affine parameters *and* running statistics;
    - personal τ: every ``lora_A``/``lora_B`` (kept in the client's store); nothing is frozen.

    Round t (Alg. 1): client i loads σ̄^t and its τ_i, then minimises its cross-entropy L_i in two
    phases, each with a fresh SGD optimizer (the run's ``lr``/``momentum``; the official code
    rebuilds both optimizers every round, so momentum restarts)::

        τ_i^{t+1} = argmin_τ L_i(τ, σ̄^t)          E_lora epochs, σ frozen       (eq. 6)
        σ_i^{t+1} = argmin_σ L_i(τ_i^{t+1}, σ)    E − E_lora epochs, τ frozen   (eq. 7)

    and uploads σ_i^{t+1}. Frozen means ``requires_grad=False`` and out of the optimizer; the model
    stays in train mode, so BatchNorm statistics still move in the τ phase (as in the code).
    E_lora = 0 is FedAvg on the decomposed model (B = 0 keeps τ = 0); E_lora = E never trains σ.
    Server: :class:`strategies.fedlora.FedLoRAStrategy` (σ̄^{t+1} = unweighted mean of the σ_i,
    eq. 8); every client then evaluates σ̄^{t+1} + τ_i.

    ``lora-schedule = "simultaneous"`` is the paper's Table 3 ablation: σ and τ trained together
    by one optimizer for E epochs (not in the official code; ours).

    Parameters
    ----------
    rank-conv : float, default 0.6
        R_c: conv rank R = int(R_c·O) (the code's rule; the paper writes R_c·min(I, O)·K).
    rank-linear : float, default 0.6
        R_l: linear rank r = round(R_l·min(in, out)).
    lora-epochs : int, default 2
        E_lora (the code's default), at most ``local-epochs`` (E) when alternating.
    lora-schedule : {"alternating", "simultaneous"}, default "alternating"
        τ then σ (Alg. 1), or both at once for E epochs (Table 3).
    """

    params = FedLoRAParams
    requires = Requirements(decomposable=True)
    partition = ParameterPartition(personal=is_tau)
    decomposed = True

    def schedule(self) -> list[Phase]:
        epochs, params = self.config.local_epochs, self.params
        if params.lora_schedule == "simultaneous":
            return [Phase(groups=("personal", "shared"), epochs=epochs)]
        return [
            Phase(groups=("personal",), epochs=params.lora_epochs),
            Phase(groups=("shared",), epochs=epochs - params.lora_epochs),
        ]
