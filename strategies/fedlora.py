"""FedLoRA's server: the unweighted mean of σ (:class:`FedLoRAStrategy`)."""

from strategies.base import PersonalizedStrategy


class FedLoRAStrategy(PersonalizedStrategy):
    """FedLoRA's server (FedLoRA paper §3.4, eq. 8; FedDecomp's ``server.py``).

    σ̄^{t+1} = the plain, unweighted mean of the clients' σ_i^{t+1} (every non-LoRA tensor,
    BatchNorm statistics included); τ never reaches the server. The same σ̄ goes to every client,
    and after aggregation every client, trained this round or not, evaluates σ̄^{t+1} + τ_i.

    Partial participation (m of N clients): by default the mean is over the m participants.
    ``partial-average = "all-clients"`` reproduces FedDecomp's code, which averages the current σ
    of all N clients, the absent ones still holding σ̄^t: eq. 8 with N, a damped update
    σ̄^{t+1} = σ̄^t + (m/N)·mean_{participants}(σ_i^{t+1} − σ̄^t).

    Keyword arguments: :class:`PersonalizedStrategy`'s (``aggregation`` defaults to ``"mean"``).
    """

    default_aggregation = "mean"
