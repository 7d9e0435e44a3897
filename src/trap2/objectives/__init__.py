"""Registered training objectives: ``none`` (plain fine-tuning), ``trap2`` (the paper's two-pass) and
``trap2_split`` (one pass, the batch split between nominal and off-nominal scales), ``trap2_distill``
(self-distillation from a given update, no labels: ``trap2 protect``), and the attacker's ``flatten``
(accurate at every scale: un-trapping)."""

from __future__ import annotations

from trap2.config import ObjectiveConfig
from trap2.objectives.base import Objective, ObjectiveFactory, StepStats
from trap2.objectives.none import PlainObjective
from trap2.objectives.self_distill import SelfDistillObjective
from trap2.objectives.split import SplitTrap2Objective
from trap2.objectives.trap2 import FlattenObjective, Trap2Objective
from trap2.registry import Registry

OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")
OBJECTIVES.register("none", PlainObjective)
OBJECTIVES.register("trap2", Trap2Objective)
OBJECTIVES.register("trap2_split", SplitTrap2Objective)
OBJECTIVES.register("trap2_distill", SelfDistillObjective)  # y: the teacher's outputs (trap2 protect)
OBJECTIVES.register("flatten", FlattenObjective)  # the attacker's: un-trapping a released update


def get_objective(cfg: ObjectiveConfig | str) -> Objective:
    """The objective named by ``cfg.name`` (or a bare name, with default settings)."""
    if isinstance(cfg, str):
        cfg = ObjectiveConfig(name=cfg)
    return OBJECTIVES.get(cfg.name)(cfg)


__all__ = ["OBJECTIVES", "Objective", "StepStats", "get_objective"]
