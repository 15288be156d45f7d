"""FedLoRA server (FedLoRA paper §3.4, eq. 8; METHODS.md A.5).

σ̄ = the plain, unweighted mean of the clients' σ_i (every non-LoRA tensor, BatchNorm statistics
included); τ never reaches the server. The same σ̄ goes to every client.
"""

from strategies.base import PersonalizedStrategy


class FedLoRAStrategy(PersonalizedStrategy):
    default_aggregation = "mean"
