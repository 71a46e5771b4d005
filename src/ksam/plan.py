"""The step plan: a method's rules, and every fact the engine derives from them.

A method of ksam is a choice of rules (see :mod:`ksam.engine`): an *ascent* selection rule
(or none), a *perturbation* rule, a *descent* selection rule, a *schedule* of sharp steps
an optional *transform* of the descent gradient, an optional *loss term* added to the
gradient passes' per-sample losses (SAF, MESA) and optional *remembered scores* that replace
the scoring forward (K-SAM and Ordered SGD with ``scores="memory"``), see
:mod:`ksam.memory`. :class:`StepPlan` holds them, checks
that they combine, and derives once what the engine and its executors need to know about a
step: whether a scoring forward runs, which rows a plain step uses, whether the rules read
labels or draw random numbers on the host, what keys a captured graph. The plan is frozen:
replacing a rule (:func:`ksam.distributed.use_global_selection`) builds a new plan, so no
derived fact can go stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from .memory import ExampleMemory, LossTerm, RememberedLosses
from .perturbation import PerturbationRule
from .schedule import Schedule
from .selection import SelectionRule, WholeBatch
from .stateful import Stateful
from .transform import GradientTransform

__all__ = ["StepPlan"]


@dataclass(frozen=True)
class StepPlan:
    """A method's rules (checked to combine) and the facts derived from them.

    ValueError when the rules do not combine: an ascent rule without a perturbation rule,
    a perturbation that needs an ascent pass without one (or one that takes none with one),
    a schedule of sharp steps without an ascent pass, a descent rule that
    reads losses at w+eps without a perturbation, remembered scores for rules that read
    none.
    """

    ascent: SelectionRule | None
    perturbation: PerturbationRule | None
    descent: SelectionRule
    schedule: Schedule = field(default_factory=Schedule)
    transform: GradientTransform | None = None
    term: LossTerm | None = None
    remembered: RememberedLosses | None = None

    #: the rows of a plain step (the schedule's non-sharp steps): the descent rule's, but
    #: the whole batch for a rule defined only under a perturbation (ESAM's)
    plain_descent: SelectionRule = field(init=False)
    #: a sharp step starts with a gradient-free forward over the batch: a rule reads losses
    #: at w and no full-batch pass at w (ESAM's ascent) gives them first
    scores_sharp: bool = field(init=False)
    #: a plain step starts with that forward (its rows are chosen from losses at w)
    scores_plain: bool = field(init=False)
    #: a rule reads the batch's class labels
    needs_labels: bool = field(init=False)
    #: a rule reads the scoring pass's logits
    needs_logits: bool = field(init=False)
    #: the perturbation comes from the optimizer's state, with no ascent pass (MSAM)
    perturbs_from_state: bool = field(init=False)
    #: why a step draws random numbers on the host (None: it does not)
    host_randomness: str | None = field(init=False)
    #: the per-example memory of the term or the remembered scores (None: none)
    memory: ExampleMemory | None = field(init=False)

    def __post_init__(self) -> None:
        ascent, perturbation, descent = self.ascent, self.perturbation, self.descent
        if ascent is not None and perturbation is None:
            raise ValueError("an ascent rule needs a perturbation rule")
        if perturbation is not None and (ascent is None) == perturbation.needs_ascent:
            raise ValueError(f"{perturbation!r} " + (
                "needs an ascent rule" if ascent is None else "takes no ascent pass"))
        if ascent is None and not self.schedule.always:
            raise ValueError("a schedule of sharpness-aware steps needs a method with an "
                             "ascent pass")
        if descent.needs_perturbed_losses and ascent is None:
            raise ValueError(f"{descent!r} needs a perturbation: give an ascent rule")
        if self.remembered is not None and not (descent.needs_scores or (
                ascent is not None and ascent.needs_scores)):
            raise ValueError("remembered scores need a rule that reads losses at w")
        plain = WholeBatch() if descent.needs_perturbed_losses else descent
        ascent_is_full = isinstance(ascent, WholeBatch)
        rules = [r for r in (ascent, descent) if r is not None]
        derived = {
            "plain_descent": plain,
            "scores_sharp": bool((ascent is not None and ascent.needs_scores)
                                 or (descent.needs_scores and not ascent_is_full)),
            "scores_plain": plain.needs_scores,
            "needs_labels": any(r.needs_labels for r in rules),
            "needs_logits": any(r.needs_logits for r in rules),
            "perturbs_from_state": perturbation is not None and not perturbation.needs_ascent,
            "host_randomness": _host_randomness(rules, perturbation),
            "memory": _one_memory(self.remembered, self.term, *rules),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def replace(self, **rules: object) -> StepPlan:
        """A new plan with some rules replaced (checked and derived anew)."""
        return dataclasses.replace(self, **rules)

    # -------------------------------------------------------------------- per step
    def descent_rule(self, sharp: bool) -> SelectionRule:
        """The rule of the step's gradient pass: the descent rule, or on a plain step
        :attr:`plain_descent`."""
        return self.descent if sharp else self.plain_descent

    def scores_first(self, sharp: bool) -> bool:
        """Whether the step starts with a gradient-free scoring forward."""
        return self.scores_sharp if sharp else self.scores_plain

    def rules(self, sharp: bool) -> list[SelectionRule]:
        """The selection rules a step uses, in order."""
        if not sharp:
            return [self.plain_descent]
        return [self.descent] if self.ascent is None else [self.ascent, self.descent]

    def check_batch(self, n: int) -> None:
        """ValueError when a batch of ``n`` examples cannot be stepped on."""
        if n < 1:
            raise ValueError("the batch is empty")
        for rule in (self.ascent, self.descent):
            if rule is not None:
                rule.check_batch(n)

    def graph_key(self, n: int, step: int, sharp: bool) -> tuple:
        """What makes step ``step`` on a batch of ``n`` do other work than another step of
        the same shapes: sharp or plain, the subset sizes (a short last batch, K's warmup)
        and the rules' phases (:meth:`ksam.selection.SelectionRule.graph_key`)."""
        rules = self.rules(sharp)
        term = None if self.term is None else self.term.graph_key(step)
        return (bool(sharp), tuple(r.size_at(n, step) for r in rules),
                tuple(r.graph_key(step) for r in rules), term)

    def term_at(self, step: int) -> LossTerm | None:
        """The loss term of step ``step`` (None: none, or not active yet)."""
        term = self.term
        return term if term is not None and term.active(step) else None

    def stateful(self) -> list[tuple[str, Stateful]]:
        """The parts with state (:class:`ksam.stateful.Stateful`), by their key in a
        method's ``state_dict``, in the order their staged updates are committed: the
        selection rules, the transform, the loss term (after the optimizer step: MESA's
        average reads the new weights) and the per-example memory."""
        parts = (("ascent", self.ascent), ("descent", self.descent),
                 ("transform", self.transform), ("term", self.term),
                 ("memory", self.memory))
        return [(key, part) for key, part in parts if part is not None]

    def commit(self, keep: bool | Tensor, sharp: bool) -> None:
        """What the step staged becomes the parts' state where ``keep`` (the step was
        applied), in the order of :meth:`stateful`."""
        for _, part in self.stateful():
            part.commit(keep, sharp)

    def identity(self) -> dict[str, str | None]:
        """The kinds of the rules, as a state records them."""
        kinds = {"ascent": _kind(self.ascent), "perturbation": _kind(self.perturbation),
                 "descent": _kind(self.descent)}
        if self.term is not None:
            kinds["term"] = _kind(self.term)
        if self.remembered is not None:
            kinds["scores"] = _kind(self.remembered)
        return kinds

    def __repr__(self) -> str:
        extra = "" if self.schedule.always else f", schedule={self.schedule!r}"
        extra += "" if self.transform is None else f", transform={self.transform!r}"
        return (f"StepPlan(ascent={self.ascent!r}, perturbation={self.perturbation!r}, "
                f"descent={self.descent!r}{extra})")


def _host_randomness(rules: list[SelectionRule],
                     perturbation: PerturbationRule | None) -> str | None:
    for rule in rules:
        if rule.draws_on_host:
            return f"{rule!r} draws its rows on the host"
    if perturbation is not None and perturbation.draws_on_host:
        return f"{perturbation!r} draws its mask on the host"
    return None


def _one_memory(*holders: object) -> ExampleMemory | None:
    """The per-example memory the rules keep (None: none); ValueError for two."""
    memories = {id(m): m for h in holders if h is not None
                for m in [getattr(h, "memory", None)] if m is not None}
    if len(memories) > 1:
        raise ValueError("a method may keep one per-example memory: these rules keep "
                         f"{len(memories)}")
    return next(iter(memories.values()), None)


def _kind(rule: object) -> str | None:
    return None if rule is None else type(rule).__name__
