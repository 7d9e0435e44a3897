"""Evaluation: accuracy at W0 + c·ΔW, the scaling curve, reports and plots."""

from trap2.eval.evaluate import accuracy, base_state, scaling_curve

__all__ = ["accuracy", "base_state", "scaling_curve"]
