"""User-level differential privacy of the shared update, with accounting (``dp-*`` run-config keys).

What is protected: the shared tensors a method releases each round (σ̄, the LoRA A matrices, an
adapter), as user-level DP (one client's whole data is the unit): the personal part never leaves
the client and is not released at all; evaluation accuracies, train losses and sample counts the
clients report are NOT protected. Applies to every method whose clients all receive the same
shared arrays; refused (one line) for the per-client-message methods (fedamp, fedcac: they release
each client its own combination, not one aggregate) and for methods that share nothing (local).

The mechanism is DP-FedAvg (McMahan et al., ICLR 2018, "Learning Differentially Private Recurrent
Language Models"; the Gaussian noise of Flower's DP wrappers, ``flwr.serverapp.strategy.dp_*``):

1. every client clips its update Δ_i = (trained − received) of the floating-point shared tensors
   to L2 norm C (:func:`clip_upload`, the FlatClip of Flower's ``fixedclipping_mod``) and reports
   b_i = 1[‖Δ_i‖ ≤ C] (``dp-norm-bit``); the server clips again against what it sent
   (:meth:`SharedUpdatePrivacy.release`), so the bound holds for a client that did not clip;
2. the server releases x̄ + (1/m)·Σ_i Δ_i + N(0, (z·C/m)²·I) over the m valid replies (equal
   weights: ``aggregation`` must be ``mean``; ``auto`` means ``mean`` under DP). Integer tensors
   (BatchNorm's ``num_batches_tracked``) are not released: they keep the value sent; BatchNorm
   running variances are clamped at 0 after the noise (post-processing, so still private);
3. with ``dp-clipping = "adaptive"`` (Andrew et al., NeurIPS 2021, "Differentially Private Learning
   with Adaptive Clipping"): C ← C·exp(−η_C·(b̃ − γ)), b̃ = (Σ b_i + N(0, σ_b²))/m, and the update
   noise uses z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) so that the pair (update, count) is a Gaussian
   mechanism of multiplier z (their Theorem 1; Flower's ``compute_adaptive_noise_params``).

Accounting (Flower's ``flwr.serverapp.RdpAccountant``, which runs Google's ``dp-accounting`` RDP
accountant): this app samples a fixed number m of the N partitions without replacement each round
(strategies/sampling.py, ``fraction-train``), so each round is a ``SampledWithoutReplacementDpEvent``
under the replace-one relation (Wang, Balle & Kasiviswanathan, AISTATS 2019). Replacing one client
moves the clipped sum by up to 2C, so the accountant's noise multiplier is z/2 (noise std z·C on a
sum of sensitivity 2C). ε at ``dp-delta`` after every round is the row's ``dp_epsilon``. With
``dp-target-epsilon`` the run stops before a round whose release would pass it, with
:class:`fedlora_flwr.exits.PrivacyBudgetExhausted` (Flower's ``PrivacyBudgetExhausted``, status 6).

Why not Flower's wrappers and mods as they are: the server-side wrappers measure every reply
against the one ``arrays`` given to ``configure_train`` and account for plain FedAvg only, and
``fixedclipping_mod`` / ``adaptiveclipping_mod`` need exactly one ArrayRecord with the same keys in
the message and the reply and answer every message without a ``clipping_norm`` with an error (this
app's one ClientApp serves runs with and without DP, and fused-evaluation replies carry a second
MetricRecord). Their math is used instead: the same FlatClip, noise std z·C/m, the same adaptive
rule, with seeded draws (``numpy.random.default_rng([seed, round, stream])``) where Flower's use
the unseeded global NumPy RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod

from fedlora_flwr.config import ConfigError
from fedlora_flwr.exits import PrivacyBudgetExhausted
from strategies.protocol import ARRAYS, METRICS

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig

#: Train-message config key: the clip norm C of this round (its presence turns clipping on).
CLIP_NORM_KEY = "dp-clip-norm"
#: Train-reply metric: 1 if the client's unclipped update had norm ≤ C, else 0.
NORM_BIT_KEY = "dp-norm-bit"
#: Random streams, apart from sampling ([seed, round]) and faults (1, 2).
NOISE_STREAM, COUNT_STREAM = 3, 4
#: BatchNorm's running variances: clamped at 0 after the noise (post-processing keeps the guarantee).
VARIANCE_SUFFIX = "running_var"


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def clipped(received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
            clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """(received + min(1, C/‖Δ‖)·Δ for the floating keys, in float64; ‖Δ‖) with Δ = trained − received
    over every floating-point tensor of ``trained`` (FlatClip; Flower's ``compute_clip_model_update``).
    Integer tensors are left out of the result."""
    updates = {}
    for key, value in trained.items():
        if not _floating(value):
            continue
        if key not in received:
            raise ConfigError(f"dp-clip-norm: the shared tensor {key!r} is uploaded but not sent to the clients, "
                              "so its update is undefined; this method cannot run with DP")
        updates[key] = value.astype(np.float64) - np.asarray(received[key], dtype=np.float64)
    norm = math.sqrt(sum(float(np.sum(update * update)) for update in updates.values()))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {key: np.asarray(received[key], dtype=np.float64) + factor * update for key, update in updates.items()}, norm


def clip_upload(received: ArrayRecord, upload: Mapping[str, torch.Tensor],
                clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """A client's upload with its floating-point update clipped to ``clip_norm`` against what it
    received (integer tensors unchanged), and the update's norm before clipping."""
    trained = {key: tensor.detach().cpu().numpy() for key, tensor in upload.items()}
    sent = {key: received[key].numpy() for key in received}
    values, norm = clipped(sent, trained, clip_norm)
    # Rounding to the tensors' dtype (float32) may push the norm past C by ~1e-8·C: shrink
    # until the update as the server will measure it is within C.
    bound = clip_norm
    for _ in range(8):
        cast = {key: np.asarray(value, dtype=trained[key].dtype) for key, value in values.items()}
        _, sent_norm = clipped(sent, cast, math.inf)
        if sent_norm <= clip_norm:
            break
        bound *= clip_norm / sent_norm * (1 - 1e-7)
        values, _ = clipped(sent, trained, bound)
    else:
        raise ValueError(f"dp-clip-norm: the clipped update's norm stays above C = {clip_norm:g} in "
                         f"{next(iter(trained.values())).dtype}")
    out = dict(upload)
    for key, value in cast.items():
        out[key] = torch.from_numpy(value).to(upload[key].device)
    return out, norm


def check_config(config: RunConfig, strategy: type) -> None:
    """Refuse, in one line, the DP and robust-aggregation settings ``strategy`` cannot honour."""
    name = config.method
    robust = config.aggregation in ("trimmed-mean", "median", "krum")
    own_arrays = getattr(strategy, "per_client_messages", False)
    shares = getattr(strategy, "shares_arrays", True)
    if robust and (own_arrays or not shares):
        what = "sends each client its own arrays" if own_arrays else "shares nothing"
        raise ConfigError(f"aggregation={config.aggregation!r}: method {name!r} {what}; robust aggregation "
                          "applies to methods that aggregate one shared set")
    if config.dp_clip_norm == 0:
        changed = [key for key, value in (("dp-noise-multiplier", config.dp_noise_multiplier),
                                          ("dp-target-epsilon", config.dp_target_epsilon)) if value]
        if changed or config.dp_clipping != "fixed":
            raise ConfigError(f"{', '.join(changed) or 'dp-clipping'}: DP is off while dp-clip-norm = 0; "
                              "set dp-clip-norm > 0 (the clipping norm C)")
        return
    if own_arrays or not shares:
        what = ("sends each client its own arrays (there is no one aggregate to protect)" if own_arrays
                else "shares nothing (nothing is released)")
        raise ConfigError(f"dp-clip-norm: method {name!r} {what}; DP applies to methods that send every client "
                          "the same shared arrays")
    if config.aggregation != "auto" and config.aggregation != "mean":
        raise ConfigError(f"aggregation={config.aggregation!r}: DP needs the equally weighted mean (sensitivity C/m); "
                          "set aggregation = 'mean' or 'auto'")
    if config.dp_target_epsilon and not config.dp_noise_multiplier:
        raise ConfigError("dp-target-epsilon: without noise (dp-noise-multiplier = 0) ε is infinite; "
                          "set dp-noise-multiplier > 0")


class SharedUpdatePrivacy:
    """The server's side of DP of the shared update: the clip norm sent, the re-clipping, the
    noise, the adaptive clip norm, the accountant and the budget check (see the module docstring).

    Parameters
    ----------
    clip_norm : float
        C (the initial C when ``adaptive``), > 0 (``dp-clip-norm``).
    noise_multiplier : float
        z ≥ 0 (``dp-noise-multiplier``); 0: clipping only, ε is infinite (not reported).
    delta : float
        δ at which ε is reported (``dp-delta``).
    target_epsilon : float, default 0
        Stop before a round that would pass it; 0: no target (``dp-target-epsilon``).
    seed : int, default 0
        Seeds the noise: ``default_rng([seed, round, stream])``.
    adaptive : bool, default False
        Adapt C to the ``target_quantile`` of the update norms (Andrew et al. 2021).
    target_quantile, clip_lr, clipped_count_stddev : float
        γ, η_C and σ_b of the adaptive rule (σ_b = 0: m/20 for m sampled clients, Flower's default).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, target_epsilon: float = 0.0,
                 seed: int = 0, adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 clipped_count_stddev: float = 0.0) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or not 0 < delta < 1 or target_epsilon < 0:
            raise ValueError(f"need clip_norm > 0, noise_multiplier >= 0, 0 < delta < 1, target_epsilon >= 0; got "
                             f"{clip_norm}, {noise_multiplier}, {delta}, {target_epsilon}")
        if target_epsilon and not noise_multiplier:
            raise ValueError("a target epsilon needs noise_multiplier > 0")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta, self.target_epsilon, self.seed = float(delta), float(target_epsilon), seed
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.clipped_count_stddev = clipped_count_stddev
        self.accountant = None  # built in the first round, when the federation's size is known
        self._sampled = 0

    @classmethod
    def from_config(cls, config: RunConfig) -> SharedUpdatePrivacy | None:
        if config.dp_clip_norm == 0:
            return None
        return cls(config.dp_clip_norm, config.dp_noise_multiplier, config.dp_delta, config.dp_target_epsilon,
                   config.seed, config.dp_clipping == "adaptive", config.dp_target_quantile, config.dp_clip_lr,
                   config.dp_clipped_count_stddev)

    def describe(self) -> str:
        clipping = (f"adaptive clipping from C = {self.clip_norm:g} (γ = {self.target_quantile:g}, "
                    f"η_C = {self.clip_lr:g})" if self.adaptive else f"clipping C = {self.clip_norm:g}")
        target = f", stop past ε = {self.target_epsilon:g}" if self.target_epsilon else ""
        return f"user-level DP: {clipping}, noise z = {self.noise_multiplier:g}, δ = {self.delta:g}{target}"

    # ------------------------------------------------------------------ per round

    def train_config(self) -> dict[str, float]:
        """What every train message carries: this round's C."""
        return {CLIP_NORM_KEY: self.clip_norm}

    def _count_stddev(self, sampled: int) -> float:
        return self.clipped_count_stddev or sampled / 20

    def update_multiplier(self, sampled: int) -> float:
        """z_Δ, the noise multiplier of the update: z, or with adaptive clipping (z⁻² − (2σ_b)⁻²)^(−1/2)."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        sigma_b = self._count_stddev(sampled)
        if z >= 2 * sigma_b:
            raise ConfigError(f"dp-noise-multiplier={z:g}: adaptive clipping needs z < 2·σ_b = {2 * sigma_b:g} "
                              f"(σ_b = dp-clipped-count-stddev, or m/20 = {sampled}/20 when 0); raise "
                              "dp-clipped-count-stddev or lower dp-noise-multiplier")
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5

    def _event(self, sampled: int, population: int) -> GaussianPrivacyEvent:
        # noise std z·C on a clipped sum whose replace-one sensitivity is 2C
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier / 2, sample_size=sampled,
                                    population_size=population)

    def _new_accountant(self, population: int):
        from flwr.serverapp import RdpAccountant  # imports dp-accounting: only when DP is on

        config = PrivacyConfig(target_delta=self.delta, population_size=population,
                               neighboring_relation=NeighboringRelation.REPLACE_ONE,
                               sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
                               max_epsilon=self.target_epsilon or None)
        return RdpAccountant(config)

    def before_round(self, server_round: int, sampled: int, population: int) -> None:
        """Called with the round's m sampled of N clients before any is sent: raises
        :class:`PrivacyBudgetExhausted` when the round's release would pass the target ε."""
        self._sampled = sampled
        self.update_multiplier(sampled)  # refuse an impossible adaptive setting before anyone trains
        if not self.noise_multiplier:
            return
        if self.accountant is None:
            self.accountant = self._new_accountant(population)
        if self.target_epsilon and self.accountant.would_exceed(self._event(sampled, population)):
            projected = self._new_accountant(population)
            projected.load_state_dict(self.accountant.state_dict())
            projected.compose(self._event(sampled, population))
            spent = self.epsilon()
            raise PrivacyBudgetExhausted(
                f"dp-target-epsilon: round {server_round} would take ε to {projected.get_epsilon(self.delta):.4g} "
                f"> {self.target_epsilon:g} at δ = {self.delta:g} (ε after round {server_round - 1}: "
                f"{spent:.4g}); the run stops before that round's training")

    def epsilon(self) -> float:
        """ε at δ spent so far (0 before any release; inf without noise)."""
        if not self.noise_multiplier:
            return math.inf
        return self.accountant.get_epsilon(self.delta) if self.accountant and self.accountant.num_releases else 0.0

    @staticmethod
    def reply_problem(message: Message) -> str | None:
        """Why a train reply of a DP run lacks its norm bit, or None (a ReplyValidator check)."""
        value = message.content[METRICS].get(NORM_BIT_KEY)
        if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1):
            return f"'{METRICS}' {NORM_BIT_KEY} = {value!r} is not 0 or 1"
        return None

    def release(self, server_round: int, replies: list[Message], previous: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """The noisy mean of the replies' clipped updates added to ``previous`` (what was sent), and
        the round's figures for its row; composes the round's event and adapts C."""
        sent = {key: previous[key].numpy() for key in previous}
        total: dict[str, np.ndarray] = {}
        norms = []
        for message in replies:
            record = message.content[ARRAYS]
            values, norm = clipped(sent, {key: record[key].numpy() for key in record}, self.clip_norm)
            norms.append(norm)
            for key, value in values.items():
                total[key] = total.get(key, 0.0) + (value - sent[key].astype(np.float64))
        count = len(replies)
        sampled = self._sampled or count
        std = self.update_multiplier(sampled) * self.clip_norm / count
        rng = np.random.default_rng([self.seed, server_round, NOISE_STREAM])
        out = {}
        for key in replies[0].content[ARRAYS]:  # the uploaded keys, as the plain mean gives them
            if key not in sent:
                raise ConfigError(f"dp-clip-norm: the shared tensor {key!r} is uploaded but not sent to the clients, "
                                  "so its update is undefined; this method cannot run with DP")
            reference = sent[key]
            if key in total:
                value = reference.astype(np.float64) + total[key] / count
                if std > 0:
                    value = value + rng.normal(0.0, std, reference.shape)
                    if key.endswith(VARIANCE_SUFFIX):  # post-processing: a variance is not negative
                        value = np.maximum(value, 0.0)
                out[key] = np.asarray(value, dtype=reference.dtype)
            else:  # integer tensors are not released
                out[key] = reference
        unclipped = sum(int(message.content[METRICS][NORM_BIT_KEY]) for message in replies)
        figures = {"dp_clip_norm": self.clip_norm, "dp_noise_std": std, "dp_unclipped": unclipped,
                   "dp_update_norm_max": max(norms)}
        if self.noise_multiplier:
            population = self.accountant.config.population_size
            self.accountant.compose(self._event(sampled, population))
        figures.update(dp_epsilon=self.epsilon(), dp_delta=self.delta)
        if self.adaptive:
            noisy = unclipped + np.random.default_rng([self.seed, server_round, COUNT_STREAM]).normal(
                0.0, self._count_stddev(sampled)) if self.noise_multiplier else float(unclipped)
            self.clip_norm = float(self.clip_norm * math.exp(-self.clip_lr * (noisy / count - self.target_quantile)))
        return ArrayRecord({key: Array.from_numpy_ndarray(value) for key, value in out.items()}), figures

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm,
                "accountant": self.accountant.state_dict() if self.accountant is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        if state.get("accountant") is not None:
            population = int(state["accountant"]["config"]["population_size"])
            self.accountant = self._new_accountant(population)
            self.accountant.load_state_dict(state["accountant"])
