"""What a trained run measured, as ``metrics.json`` holds it: ``RunMetrics`` with the fields every
recipe writes, and the centralized or federated recipe's own fields beside them.

``to_dict`` is the JSON layout documented in docs/guide/outputs.md (one flat object); ``from_dict``
reads it back, from this release's files and from older ones that lack the fields added since
(``epsilon_pld``, ``audited_members``, ``wall_seconds``, ``replaced_modules``, ``parallel_mode``,
``sanitized``, ``threads``, ``grad_sample_mode``, ``grad_sample_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class CentralizedMetrics:
    """The centralized recipe's fields: epochs, the canaries trained on, the processes that trained
    (``parallel_mode`` None for one process, ``dpddp`` or ``robust``), the member records poisoned
    (``dptrain.training.poisoning``), what a backdoor achieved, and the members sanitization removed
    (``dptrain.training.sanitization``) with its precision and recall against the poisoned ones, and
    the trigger-set watermark's ``{"keys", "accuracy", "p_value"}`` (``dptrain.watermark``), and under
    public pretraining which data were public and which private (``dptrain.training.pretrain.pretrain_record``), and
    for a run on a proxy what it trained on and imitated (``dptrain.training.proxy.proxy_record``).

    ``backdoor_success_rate`` is None (and absent from the JSON) unless a backdoor was planted,
    ``poisoned_class_accuracy`` (test accuracy on the source class) unless a targeted label flip was;
    ``sanitize_precision`` and ``sanitize_recall`` unless members were both poisoned and sanitized.
    """

    epochs: int
    canaries_included: int
    world_size: int = 1
    parallel_mode: str | None = None
    poisoned: int = 0
    backdoor_success_rate: float | None = None
    poisoned_class_accuracy: float | None = None
    sanitized: int = 0
    sanitize_precision: float | None = None
    sanitize_recall: float | None = None
    watermark: dict | None = None
    pretrain: dict | None = None
    proxy: dict | None = None


# Fields absent from metrics.json when None (the measurement did not apply).
ABSENT_WHEN_NONE = (
    "backdoor_success_rate",
    "poisoned_class_accuracy",
    "sanitize_precision",
    "sanitize_recall",
    "watermark",
    "pretrain",
    "proxy",
)


@dataclass(frozen=True)
class FederationMetrics:
    """The federated recipe's fields: the federation, its attack and rule, whose guarantee is reported,
    at sample level every client's spend and mechanism, and what the attack achieved.

    ``backdoor_success_rate`` is None (and absent from the JSON) unless a backdoor was planted.
    """

    rounds: int
    clients: int
    clients_per_round: float
    local_epochs: int
    partition: str
    dp_level: str
    aggregator: str
    pre: list[str]
    attack: str
    byzantine: int
    byzantine_clients: list[int]
    reported_client: int | None
    client_epsilons: list[float | None] | None
    client_mechanisms: list[dict | None] | None
    client_sizes: list[int]
    honest_members: int
    aggregation_seconds: float
    byzantine_selected_fraction: float | None
    backdoor_success_rate: float | None = None


@dataclass(frozen=True)
class RunMetrics:
    """A trained run's numbers: accuracy and loss on the audited members and the test split, the
    reported guarantee (``epsilon`` spent at ``delta``, None for the non-private baseline, with
    dp-accounting's ``epsilon_pld`` beside it), the split's sizes and the training time, and the
    intra-op ``threads`` it trained at (with ``threads_calibration``, ``ThreadChoice.record``, when
    ``train.threads=auto`` timed them; rank 0's in a multi-process run).

    Exactly one of ``centralized`` and ``federation`` is set, by the recipe that trained the run.
    """

    test_accuracy: float
    train_accuracy: float
    test_loss: float
    train_loss: float
    epsilon: float | None
    delta: float | None
    target_epsilon: float | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str | None
    max_grad_norm: float | None
    private: bool
    members: int
    non_members: int
    population: int
    test_size: int
    train_seconds: float
    epsilon_pld: float | None = None
    audited_members: int | None = None
    wall_seconds: float | None = None
    replaced_modules: list[str] | None = None
    threads: int | None = None
    threads_calibration: dict | None = None
    # The per-example clipping method (privacy.grad_sample_mode, auto resolved) and, when auto timed the
    # candidates, each one's median seconds per step; None for the baseline and federated runs.
    grad_sample_mode: str | None = None
    grad_sample_seconds: dict[str, float] | None = None
    centralized: CentralizedMetrics | None = None
    federation: FederationMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        """``metrics.json``: the common fields, then the recipe's own, in one flat object."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("centralized", "federation")}
        for part in (self.centralized, self.federation):
            if part is not None:
                values.update({f.name: getattr(part, f.name) for f in fields(part)})
        for name in ABSENT_WHEN_NONE:
            if name in values and values[name] is None:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunMetrics:
        """The metrics of a ``metrics.json`` object (``to_dict``'s layout, or an older one without the
        fields that have defaults). A federated run is one with ``rounds``."""
        federation = _part(FederationMetrics, values) if "rounds" in values else None
        centralized = None if federation is not None else _part(CentralizedMetrics, values)
        common = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        return cls(**common, centralized=centralized, federation=federation)


def _part(kind, values: Mapping[str, Any]):
    return kind(**{f.name: values[f.name] for f in fields(kind) if f.name in values})
