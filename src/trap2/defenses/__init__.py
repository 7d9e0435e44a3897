"""Post-hoc baselines that Trap² is compared with: function-preserving reparameterisations of a
fine-tuned Transformer's full weights that make naive merging fail.

- :func:`params_defense` — PaRaMS (MLP hidden units permuted away from the pretrained weights by linear
  assignment, plus random per-head Q/K and V/O scaling).
- :func:`merge_lock` — Merge-Lock (random invertible per-head matrices on Q/K and V/O).

Both work on a state dict and the Transformer's layer layout (:func:`find_layers`: BERT / ViT / CLIP
naming); a model without attention layers (a CNN) is refused. :func:`baseline_update` releases a suite's
update through one of them (``BASELINES``), for the attack matrix.
"""

from trap2.defenses.baseline import BASELINES, DEFENSES, baseline_update
from trap2.defenses.layout import AttentionLayer, find_layers
from trap2.defenses.merge_lock import merge_lock
from trap2.defenses.params import params_defense

__all__ = [
    "BASELINES",
    "DEFENSES",
    "AttentionLayer",
    "baseline_update",
    "find_layers",
    "merge_lock",
    "params_defense",
]
