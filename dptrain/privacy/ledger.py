"""The privacy ledger of one mechanism: the steps its plan allows, the steps charged, the epsilon spent,
its state across a restart, and the guard that the run spent exactly what was planned."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from dptrain.errors import UserError
from dptrain.privacy.accounting import ACCOUNTANTS, composed_epsilon
from dptrain.privacy.plan import PrivacyPlan


@dataclass
class PrivacyLedger:
    """Charges of Poisson-subsampled Gaussian steps, as ``(noise_multiplier, sample_rate, steps)`` blocks.

    One ledger per mechanism whose guarantee dptrain reports: the centralized run (or each rank of
    robust data parallelism), each federated client at sample level, the DP-FedAvg server at user
    level. Consecutive steps of equal noise and rate merge into one block, as Opacus' accountants
    merge them, so the state is small and equal to theirs. Epsilon is ``composed_epsilon`` of the
    blocks (memoized). Nothing else in dptrain reads or writes an accountant's history.
    """

    accountant: str
    delta: float
    planned_steps: int
    target_epsilon: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def for_plan(cls, plan: PrivacyPlan) -> PrivacyLedger:
        """An empty ledger for a private ``plan``: its accountant, delta, steps and target."""
        return cls(plan.accountant, plan.delta, plan.steps, plan.target_epsilon)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more steps at ``noise_multiplier`` and ``sample_rate``."""
        noise_multiplier, sample_rate = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def optimizer_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A step hook for Opacus' ``DPOptimizer.attach_step_hook``: one charge per optimizer step, at
        the noise multiplier the optimizer holds then (what its ``add_noise`` draws with)."""

        def charge_step(optimizer) -> None:
            self.charge(optimizer.noise_multiplier, sample_rate * optimizer.accumulated_iterations)

        return charge_step

    def steps(self) -> int:
        """Steps charged so far."""
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, accountant: str | None = None) -> float:
        """Epsilon spent so far at the ledger's delta (0 before the first step), by the ledger's
        accountant or the named one (the RDP curve drawn per epoch, ``CURVE_ACCOUNTANT``)."""
        return composed_epsilon(accountant or self.accountant, tuple(self.history), self.delta)

    def mechanisms(self) -> list[dict[str, float | int]]:
        """The charged blocks as ``metrics.json`` records them, for an independent recomputation."""
        return [{"noise_multiplier": n, "sample_rate": q, "steps": s} for n, q, s in self.history]

    def check_spent(self, what: str) -> float:
        """The final epsilon, after checking that exactly the planned steps were charged within the target.

        A mismatch means the loop and the plan disagree (a bug, not a user error): raise rather than
        report a number that does not describe the mechanism that ran.
        """
        epsilon = self.epsilon()
        if self.steps() != self.planned_steps or epsilon > (self.target_epsilon or math.inf):
            raise RuntimeError(
                f"{what}: the ledger charged {self.steps()} steps spending epsilon {epsilon}; "
                f"the plan was {self.planned_steps} steps within {self.target_epsilon}"
            )
        return epsilon

    def check_steps(self, what: str) -> None:
        """``check_spent``'s step check alone, for a mechanism whose epsilon is never reported (a
        reference model's), so no accountant runs."""
        if self.steps() != self.planned_steps:
            raise RuntimeError(f"{what}: the ledger charged {self.steps()} steps; the plan was {self.planned_steps}")

    def state_dict(self) -> dict[str, Any]:
        """The charges, in the shape of Opacus' accountant state (``history`` and ``mechanism``)."""
        return {"history": [list(block) for block in self.history], "mechanism": self.accountant}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore charges written by ``state_dict``, so a resumed run neither forgets nor repeats a step."""
        if not isinstance(state, dict) or set(state) != {"history", "mechanism"}:
            raise UserError("train.resume: the checkpoint's privacy ledger is malformed; it was not written by dptrain")
        if state["mechanism"] not in ACCOUNTANTS or state["mechanism"] != self.accountant:
            raise UserError(
                f"train.resume: the checkpoint was accounted with {state['mechanism']!r}, this run with "
                f"{self.accountant!r}: resume with the config the run was started with"
            )
        self.history = []
        for noise, rate, steps in state["history"]:
            self.charge(noise, rate, int(steps))
