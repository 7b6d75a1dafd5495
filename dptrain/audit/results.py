"""The audit's result types: what every audit returns, as frozen dataclasses, and ``audit.json``, their JSON.

Each type's ``to_dict`` is its part of ``audit.json`` (docs/guide/outputs.md), strict JSON: no NaN
or Infinity, ``None`` (``null``) for an undefined value; ``AuditReport.from_dict`` reads a whole
``audit.json`` back, files written before later keys existed included. Only this module knows the
file's key names: every other module reads the audit through these types. No torch here: the
report reads ``audit.json`` through this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


def _known(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data``'s entries that are fields of ``cls``: a field absent from ``data`` keeps its default
    (a key added after the file was written), a key no longer written is dropped."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass(frozen=True)
class Skipped:
    """A part of the audit that did not run, and why (``{"skipped": reason}`` in ``audit.json``)."""

    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.reason}


@dataclass(frozen=True)
class Interval:
    """A confidence interval ``[low, high]`` at level ``confidence``."""

    low: float
    high: float
    confidence: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interval:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class EpsilonLowerBound:
    """An empirical epsilon lower bound with everything needed to check it.

    ``value`` holds with probability at least ``confidence`` over the records, given
    the threshold chosen on the calibration half (``dptrain.audit.metrics.epsilon_lower_bound``).
    ``true_positives`` / ``false_positives`` are counted on the evaluation half, of
    ``n_members`` members and ``n_nonmembers`` non-members; ``threshold`` is ``None``
    when the chosen rule calls no record a member.
    """

    value: float
    confidence: float
    delta: float
    threshold: float | None
    true_positives: int
    false_positives: int
    n_members: int
    n_nonmembers: int
    tpr_lower: float
    fpr_upper: float
    n_calibration_members: int
    n_calibration_nonmembers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpsilonLowerBound:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class MembershipMetrics:
    """The audit numbers of one membership-inference attack (``audit.json``'s ``mia.<attack>``).

    ``tpr_at_fpr`` and ``tpr_at_fpr_ci`` are keyed ``"0.001"``, ``"0.01"``, ``"0.1"``;
    a value is ``None`` where there are fewer than ``1 / target`` non-members (the
    only FPR at or below the target is then 0, so the number would not measure what
    its name says).
    """

    auc: float
    auc_ci: Interval
    tpr_at_fpr: dict[str, float | None]
    tpr_at_fpr_ci: dict[str, Interval | None]
    advantage: float
    epsilon_lower_bound: EpsilonLowerBound
    n_members: int
    n_nonmembers: int
    n_bootstrap: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MembershipMetrics:
        return cls(
            **{
                **_known(cls, data),
                "auc_ci": Interval.from_dict(data["auc_ci"]),
                "tpr_at_fpr": dict(data["tpr_at_fpr"]),
                "tpr_at_fpr_ci": {
                    key: None if ci is None else Interval.from_dict(ci) for key, ci in data["tpr_at_fpr_ci"].items()
                },
                "epsilon_lower_bound": EpsilonLowerBound.from_dict(data["epsilon_lower_bound"]),
            }
        )


@dataclass(frozen=True)
class AttributeScores:
    """Accuracy, balanced accuracy and Matthews correlation of predicted codes on ``n`` records."""

    accuracy: float
    balanced_accuracy: float
    mcc: float
    n: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeScores:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class AttributeGroup:
    """Attack and imputation on one group of records; ``advantage`` = attack - imputation per metric."""

    attack: AttributeScores
    imputation: AttributeScores
    advantage: dict[str, float]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeGroup:
        return cls(
            attack=AttributeScores.from_dict(data["attack"]),
            imputation=AttributeScores.from_dict(data["imputation"]),
            advantage=dict(data["advantage"]),
        )


@dataclass(frozen=True)
class AttributeInferenceResult:
    """Attribute inference on members and non-members (``audit.json``'s ``aia``);
    ``leakage`` = member advantage - non-member advantage."""

    attribute: str
    value_names: list[str]
    rule: str
    members: AttributeGroup
    nonmembers: AttributeGroup
    leakage: dict[str, float]
    n_members: int
    n_nonmembers: int
    n_population: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeInferenceResult:
        return cls(
            **{
                **_known(cls, data),
                "value_names": list(data["value_names"]),
                "members": AttributeGroup.from_dict(data["members"]),
                "nonmembers": AttributeGroup.from_dict(data["nonmembers"]),
                "leakage": dict(data["leakage"]),
            }
        )


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run epsilon lower bound and the guesses it was computed from (``audit.json``'s ``canary``).

    ``n_guesses`` = k_plus + k_minus guesses were made among ``n_canaries`` canaries
    (``n_included`` trained on, ``n_excluded`` not), ``n_correct`` of them right.
    ``n_candidates`` (k_plus, k_minus) pairs were tried; the bound of each was taken
    at confidence 1 - (1 - confidence) / n_candidates, so the reported maximum
    holds at ``confidence`` overall. With ``n_runs`` > 1 independent runs the
    canaries, guesses and correct guesses are totals over the runs, each run
    guessing k_plus IN and k_minus OUT among its own canaries.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    n_canaries: int
    n_included: int
    n_excluded: int
    n_guesses: int
    n_correct: int
    k_plus: int
    k_minus: int
    n_candidates: int
    n_runs: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OneRunAudit:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class SteinkeBound:
    """Steinke, Nasr & Jagielski 2023's (epsilon, delta) bound of an implementation audit, beside its
    f-DP bound: the value, the statistic that gave it and its guesses (the best of ``n_candidates``)."""

    epsilon_lower_bound: float
    statistic: str
    n_guesses: int
    n_correct: int
    k_plus: int
    k_minus: int
    n_candidates: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteinkeBound:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class ImplementationRecord:
    """The white-box implementation audit of one setting (``dptrain.audit.implementation``).

    ``epsilon_lower_bound`` is the f-DP bound at ``confidence`` for ``delta``;
    ``rejected_noise_multiplier`` the noise of the weakest curve it rejects and
    ``accountant_curve_rejected`` whether the accountant's own curve is; ``steinke`` the
    (epsilon, delta) bound beside it; ``gdp_mu_estimate`` and ``epsilon_estimate`` an estimate,
    not a bound (``None`` where undefined). Audits written before the f-DP bound have
    ``rejected_noise_multiplier``, ``accountant_curve_rejected``, ``n_tests`` and ``steinke``
    ``None``.
    """

    setting: str
    epsilon_lower_bound: float
    confidence: float
    delta: float
    accountant_epsilon: float | None
    audit_run_epsilon: float | None
    canaries: int
    runs: int
    included: int
    statistic: str
    statistics: list[str]
    n_guesses: int
    n_correct: int
    k_plus: int
    k_minus: int
    gdp_mu_estimate: float | None
    epsilon_estimate: float | None
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    rejected_noise_multiplier: float | None = None
    accountant_curve_rejected: bool | None = None
    n_tests: int | None = None
    steinke: SteinkeBound | None = None

    def to_dict(self) -> dict[str, Any]:
        # audit.json's order: the f-DP bound's test beside the guesses, steinke after them.
        record = asdict(self)
        return {
            key: record[key]
            for key in (
                "setting", "epsilon_lower_bound", "confidence", "delta", "accountant_epsilon", "audit_run_epsilon",
                "canaries", "runs", "included", "rejected_noise_multiplier", "accountant_curve_rejected",
                "statistic", "statistics", "n_guesses", "n_correct", "k_plus", "k_minus", "n_tests", "steinke",
                "gdp_mu_estimate", "epsilon_estimate", "mechanism", "noise_multiplier", "sample_rate", "steps",
            )
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImplementationRecord:
        steinke = data.get("steinke")
        return cls(
            **{
                **_known(cls, data),
                "statistics": list(data["statistics"]),
                "steinke": None if steinke is None else SteinkeBound.from_dict(steinke),
            }
        )


# The ``setting`` of an implementation audit that ran every setting, one record each.
BOTH_SETTINGS = "both"


@dataclass(frozen=True)
class ImplementationAudit:
    """The white-box implementation audit (``audit.json``'s ``implementation``): one record per
    setting it ran, by setting, and the ``seconds`` it took in all.

    In ``audit.json`` a single setting's record carries ``seconds`` itself; under
    ``audit.whitebox.setting=both`` the records sit under their settings' names beside
    ``"setting": "both"`` and ``seconds``.
    """

    records: dict[str, ImplementationRecord]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        if len(self.records) == 1:
            (record,) = self.records.values()
            return {**record.to_dict(), "seconds": self.seconds}
        return {
            **{setting: record.to_dict() for setting, record in self.records.items()},
            "setting": BOTH_SETTINGS,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImplementationAudit:
        if data["setting"] == BOTH_SETTINGS:
            records = {
                setting: ImplementationRecord.from_dict(record)
                for setting, record in data.items()
                if setting not in ("setting", "seconds")
            }
        else:
            records = {data["setting"]: ImplementationRecord.from_dict(data)}
        return cls(records=records, seconds=data["seconds"])


@dataclass(frozen=True)
class ReferenceModelsRecord:
    """Which reference models the attacks used: how many, the scheme that drew their training sets
    (``population`` or ``halves``), the seconds their training took and whether they came from the
    run directory's cache."""

    count: int
    scheme: str
    train_seconds: float
    reused_from_cache: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceModelsRecord:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class EvasionCurve:
    """One evasion attack under one norm (``audit.json``'s ``evasion.<attack>_<norm>``): the model's
    accuracy on ``n`` test records under the attack at each budget (data units: pixels in [0, 1],
    standard deviations for tables), and without attack. ``defense`` names the inference-time
    preprocessing the model was measured behind (``none``, ``squeeze(bits=3)``, ``median(kernel=2)``),
    attacked through it with BPDA gradients."""

    budgets: list[float]
    robust_accuracy: list[float]
    clean_accuracy: float
    n: int
    defense: str = "none"

    def middle(self) -> tuple[float, float]:
        """The middle budget of the list and the robust accuracy there (the report's one number)."""
        index = len(self.budgets) // 2
        return self.budgets[index], self.robust_accuracy[index]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvasionCurve:
        return cls(
            budgets=list(data["budgets"]),
            robust_accuracy=list(data["robust_accuracy"]),
            clean_accuracy=data["clean_accuracy"],
            n=data["n"],
            defense=data.get("defense", "none"),
        )


@dataclass(frozen=True)
class ExtractionCurve:
    """Model extraction through one output interface (``audit.json``'s ``extraction.<output>``): per
    query budget, the fidelity (argmax agreement with the target) and test accuracy of the attacker's
    surrogate on ``n`` test records; queries past ``attacker_records`` (the attacker's own records)
    are synthetic."""

    queries: list[int]
    fidelity: list[float]
    surrogate_accuracy: list[float]
    n: int
    attacker_records: int

    def middle(self) -> tuple[int, float]:
        """The middle budget of the list and the fidelity there (the report's one number)."""
        index = len(self.queries) // 2
        return self.queries[index], self.fidelity[index]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionCurve:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class EquationSolving:
    """Tramer et al. 2016's equation-solving attack on a logistic regression (``audit.json``'s
    ``extraction.equation_solving``): the probability queries it used (d + 1) and the relative
    Frobenius error of the identifiable parameters it recovered, the differences w_k - w_0 and
    b_k - b_0 (None when an answer underflowed to 0)."""

    queries: int
    relative_error: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EquationSolving:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class ExtractionAudit:
    """The extraction audit (``audit.json``'s ``extraction``): a curve per output interface, keyed by
    its name, and the equation-solving attack beside them under ``equation_solving`` (logistic
    regression with the probabilities interface only; else None and absent from the file)."""

    curves: dict[str, ExtractionCurve]
    equation_solving: EquationSolving | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {output: curve.to_dict() for output, curve in self.curves.items()}
        if self.equation_solving is not None:
            data["equation_solving"] = self.equation_solving.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionAudit:
        solving = data.get("equation_solving")
        return cls(
            curves={key: ExtractionCurve.from_dict(curve) for key, curve in data.items() if key != "equation_solving"},
            equation_solving=None if solving is None else EquationSolving.from_dict(solving),
        )


@dataclass(frozen=True)
class GradientInversionResult:
    """The gradient inversion audit (``audit.json``'s ``gradient_inversion``): ``clients`` simulated
    updates of ``records`` members each, ``local_steps`` local steps, attacked by ``method``
    (``analytic`` or ``optimization``). ``update`` is what the server saw: ``raw`` or ``dp_sgd`` (with
    the noise multiplier and clipping norm). Per attacked record: the MSE and PSNR of its reconstruction
    in data units, whether the nearest of the ``members`` audited members to it is the record (chance
    1 / members), past one record per client whether the nearest of the client's own records is (chance
    1 / records), and at one record whether iDLG recovered its label (None otherwise: labels given)."""

    method: str
    clients: int
    records: int
    local_steps: int
    update: str
    noise_multiplier: float | None
    max_grad_norm: float | None
    mse: list[float]
    psnr: list[float]
    nearest_member_is_true: list[bool]
    nearest_client_record_is_true: list[bool] | None
    members: int
    label_recovered: list[bool] | None
    seconds: float

    @property
    def member_match_rate(self) -> float:
        """The share of records whose reconstruction's nearest member is the record itself."""
        return sum(self.nearest_member_is_true) / len(self.nearest_member_is_true)

    @property
    def median_mse(self) -> float:
        """The median per-record MSE (data units): finite where PSNR is infinite, for HParams and the report."""
        return float(sorted(self.mse)[len(self.mse) // 2])

    @property
    def median_psnr(self) -> float:
        return float(sorted(self.psnr)[len(self.psnr) // 2])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["member_match_rate"] = self.member_match_rate
        data["member_match_chance"] = 1 / self.members
        # An exact reconstruction has infinite PSNR: strict JSON has no Infinity.
        data["psnr"] = [p if p < 1e300 else None for p in self.psnr]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GradientInversionResult:
        values = _known(cls, data)
        values["psnr"] = [float("inf") if p is None else p for p in values["psnr"]]
        return cls(**values)


@dataclass(frozen=True)
class InversionAudit:
    """The model inversion audit (``audit.json``'s ``inversion``, ``dptrain.audit.inversion``): per
    reconstructed class, the L2 distance in pixels from its reconstruction to the nearest member of the
    class, to the nearest audited non-member of the class and to the members' class mean; the share of
    classes whose reconstruction is a leak (nearer a member than every non-member and than the mean),
    the share nearer a member than every non-member, and ``chance``, the mean over classes of
    members / (members + non-members) of the class, which bounds both for a model that leaks nothing.
    ``members`` / ``non_members`` count the audited records of every class."""

    classes: list[int]
    member_distance: list[float]
    nonmember_distance: list[float]
    mean_distance: list[float]
    leak_rate: float
    nearest_member_rate: float
    chance: float
    prior: str
    members: int
    non_members: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InversionAudit:
        return cls(**_known(cls, data))


def _optional(part, data: Mapping[str, Any] | None):
    """``part.from_dict(data)``, a ``Skipped`` for ``{"skipped": why}``, None for None."""
    if data is None:
        return None
    return Skipped(data["skipped"]) if "skipped" in data else part.from_dict(data)


@dataclass(frozen=True)
class AuditReport:
    """One audit of a run, ``audit.json``.

    ``accountant_epsilon`` and ``delta`` are the run's (``None`` for the non-private baseline);
    ``members`` / ``non_members`` the audited records. ``mia`` holds every membership attack's
    metrics by name; ``aia`` attribute inference or why it was skipped; ``canary`` the one-run
    bound, why there is none although canaries were asked for, or ``None`` when none were;
    ``implementation`` the white-box audit, why it was skipped, or ``None`` when it was off;
    ``evasion`` the evasion audit's curves by ``<attack>_<norm>``, or ``None`` when it was off;
    ``extraction`` the extraction audit, ``gradient_inversion`` the gradient inversion audit and
    ``inversion`` the model inversion audit, each ``None`` when it was off.
    ``audited_at`` is the UTC time the audit finished (ISO 8601) and ``history_file`` the run's
    copy of this audit under ``audits/``, set when it is recorded (``None`` before, and in files
    written before either existed).
    """

    level: str
    accountant_epsilon: float | None
    delta: float | None
    confidence: float
    members: int
    non_members: int
    mia: dict[str, MembershipMetrics]
    aia: AttributeInferenceResult | Skipped
    canary: OneRunAudit | Skipped | None
    implementation: ImplementationAudit | Skipped | None
    reference_models: ReferenceModelsRecord | None
    warnings: list[str]
    audit_seconds: float
    audited_at: str | None
    history_file: str | None = None
    evasion: dict[str, EvasionCurve] | None = None
    extraction: ExtractionAudit | None = None
    gradient_inversion: GradientInversionResult | None = None
    inversion: InversionAudit | None = None

    @property
    def implementation_records(self) -> dict[str, ImplementationRecord]:
        """The implementation audit's records by setting; empty when it was off or skipped."""
        return self.implementation.records if isinstance(self.implementation, ImplementationAudit) else {}

    def threat_headlines(self) -> dict[tuple[str, ...], float | None]:
        """The evasion, extraction, gradient inversion and model inversion audits' headline numbers, keyed
        by path (HParams joins it with "/", the report's columns with "."): robust accuracy per attack and
        norm at the middle budget, ``("evasion", "<attack>_<norm>@<budget>")``; fidelity per output
        interface at the middle query budget and the equation-solving error; the gradient inversion
        audit's nearest-member match rate and median MSE; the model inversion audit's leak rate and
        nearest-is-member rate. Audits that were off add nothing."""
        values: dict[tuple[str, ...], float | None] = {}
        for key, curve in (self.evasion or {}).items():
            budget, accuracy = curve.middle()
            values[("evasion", f"{key}@{budget:g}")] = accuracy
        if self.extraction is not None:
            for output, curve in self.extraction.curves.items():
                queries, fidelity = curve.middle()
                values[("extraction", output, f"fidelity@{queries}")] = fidelity
            solving = self.extraction.equation_solving
            if solving is not None:
                values[("extraction", "equation_solving", "relative_error")] = solving.relative_error
        if self.gradient_inversion is not None:
            values[("gradient_inversion", "match_rate")] = self.gradient_inversion.member_match_rate
            values[("gradient_inversion", "median_mse")] = self.gradient_inversion.median_mse
        if self.inversion is not None:
            values[("inversion", "leak_rate")] = self.inversion.leak_rate
            values[("inversion", "nearest_member_rate")] = self.inversion.nearest_member_rate
        return values

    def to_dict(self) -> dict[str, Any]:
        """``audit.json``'s content; ``history_file`` only once the audit is recorded."""
        report = {
            "level": self.level,
            "accountant_epsilon": self.accountant_epsilon,
            "delta": self.delta,
            "confidence": self.confidence,
            "members": self.members,
            "non_members": self.non_members,
            "mia": {name: metrics.to_dict() for name, metrics in self.mia.items()},
            "aia": self.aia.to_dict(),
            "canary": None if self.canary is None else self.canary.to_dict(),
            "implementation": None if self.implementation is None else self.implementation.to_dict(),
            "evasion": None if self.evasion is None else {key: curve.to_dict() for key, curve in self.evasion.items()},
            "extraction": None if self.extraction is None else self.extraction.to_dict(),
            "gradient_inversion": None if self.gradient_inversion is None else self.gradient_inversion.to_dict(),
            "inversion": None if self.inversion is None else self.inversion.to_dict(),
            "reference_models": None if self.reference_models is None else self.reference_models.to_dict(),
            "warnings": list(self.warnings),
            "audit_seconds": self.audit_seconds,
            "audited_at": self.audited_at,
        }
        if self.history_file is not None:
            report["history_file"] = self.history_file
        return report

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditReport:
        """The report ``data`` (a parsed ``audit.json``) holds. Files written before a key existed read
        with that part absent: ``implementation``, ``evasion``, ``extraction``, ``gradient_inversion`` and
        ``inversion`` None, ``audited_at`` and ``history_file`` None.

        Raises ``ValueError`` naming what is wrong when ``data`` is not an audit report.
        """
        try:
            return cls(
                level=data["level"],
                accountant_epsilon=data["accountant_epsilon"],
                delta=data["delta"],
                confidence=data["confidence"],
                members=data["members"],
                non_members=data["non_members"],
                mia={name: MembershipMetrics.from_dict(metrics) for name, metrics in data["mia"].items()},
                aia=_optional(AttributeInferenceResult, data["aia"]),
                canary=_optional(OneRunAudit, data["canary"]),
                implementation=_optional(ImplementationAudit, data.get("implementation")),
                reference_models=_optional(ReferenceModelsRecord, data["reference_models"]),
                warnings=list(data["warnings"]),
                audit_seconds=data["audit_seconds"],
                audited_at=data.get("audited_at"),
                history_file=data.get("history_file"),
                evasion=None
                if data.get("evasion") is None
                else {key: EvasionCurve.from_dict(curve) for key, curve in data["evasion"].items()},
                extraction=None
                if data.get("extraction") is None
                else ExtractionAudit.from_dict(data["extraction"]),
                gradient_inversion=_optional(GradientInversionResult, data.get("gradient_inversion")),
                inversion=_optional(InversionAudit, data.get("inversion")),
            )
        except KeyError as missing:
            raise ValueError(f"not an audit report: no {missing} key") from None
        except (TypeError, AttributeError) as error:
            raise ValueError(f"not an audit report: {error}") from None
