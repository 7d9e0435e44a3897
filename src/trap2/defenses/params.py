"""PaRaMS (Junhao Wei et al., "Disrupting Model Merging: A Parameter-Level Defense Without Sacrificing
Accuracy", 2025): rearrange a fine-tuned model's parameters without changing its function, so that it no
longer lines up with other fine-tunes of the same base.

- **MLP permutation**: the hidden units of each MLP are permuted (rows of the input layer and its bias,
  columns of the output layer). The permutation maximises the distance to the pretrained layer, found by
  linear assignment (``scipy.optimize.linear_sum_assignment``) on the squared distances between the
  fine-tuned units and the pretrained ones.
- **Multi-head scaling**: per head, Q (and its bias) × a, K × 1/a, V × b, O's head columns × 1/b, with
  random a, b; attention scores and outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from trap2.defenses.layout import find_layers, head_slices


@torch.no_grad()
def params_defense(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    n_heads: int,
    seed: int = 0,
    scale_range: tuple[float, float] = (0.25, 4.0),
    apply_to: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The reparameterised full weights of ``state`` (fine-tuned) given the pretrained ``base``.

    With ``apply_to`` (e.g. an adapter's dense ΔW alone) the same transformation, chosen from ``state``,
    is applied to those tensors instead: what a publisher who ran PaRaMS on the released delta ships."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in (state if apply_to is None else apply_to).items()}
    lo, hi = (torch.log(torch.tensor(float(x))) for x in scale_range)
    for layer in find_layers(state, n_heads):
        w_in, w_out = state[f"{layer.fc_in}.weight"], state[f"{layer.fc_out}.weight"]
        units = torch.cat([w_in, w_out.T], dim=1).double()
        base_units = torch.cat(
            [base[f"{layer.fc_in}.weight"], base[f"{layer.fc_out}.weight"].T], dim=1
        ).double()
        cost = torch.cdist(units, base_units) ** 2  # (fine-tuned unit i, pretrained unit j)
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        perm = torch.empty(len(cols), dtype=torch.long)
        perm[torch.as_tensor(cols)] = torch.as_tensor(rows)  # slot j of the result holds unit perm[j]
        for name, dim in (
            (f"{layer.fc_in}.weight", 0),
            (f"{layer.fc_in}.bias", 0),
            (f"{layer.fc_out}.weight", 1),
        ):
            if name in out:
                out[name] = out[name].index_select(dim, perm)

        for sl in head_slices(layer, state):
            a = float(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen)))
            b = float(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen)))
            for name, factor in ((layer.q, a), (layer.k, 1 / a), (layer.v, b)):
                for suffix in (".weight", ".bias"):
                    if name + suffix in out:
                        out[name + suffix][sl] *= factor
            if f"{layer.o}.weight" in out:
                out[f"{layer.o}.weight"][:, sl] /= b
    return out
