"""Re-evaluating an attack record: the validation score of the setting it reports, recomputed from
scratch (one merge at the reported hyperparameters and coefficients, one evaluation), so a search that
misreports what it found fails a test however its own bookkeeping goes."""

from trap2.attacks import restore_member
from trap2.merging import merge_updates


def reevaluated(ctx, pool, rec, protected_index=None) -> float:
    method, space, hp = rec["method"], rec["space"], rec["hparams"]
    if "tensor_coefficients" in rec:  # prodistill's distilled merge: Σ_i c_{i,n} ΔW_{i,n}
        dense = [u.dense() for u in pool]
        delta = {
            n: sum(c * d[n] for c, d in zip(cs, dense, strict=True) if n in d)
            for n, cs in rec["tensor_coefficients"].items()
        }
        return ctx.val_score(ctx.params(delta))
    if rec["search"] in ("per_task", "pinned"):  # member weights inside the merge
        merged = merge_updates(pool, method, space, weights=rec["coefficients"], **hp).dense()
        return ctx.val_score(ctx.params(merged))
    merged = merge_updates(pool, method, space, **hp).dense()
    if rec["search"] == "restore":  # W0 + c·(merge minus the member's remnant) + ΔW_p
        member = pool[protected_index].dense()
        rest = restore_member(merged, member)
        c = rec["coefficient"]
        return ctx.val_score(ctx.params({n: c * rest.get(n, 0) + member.get(n, 0) for n in {*rest, *member}}))
    return ctx.val_score(ctx.params(merged, rec["coefficient"]))  # global, untrap, undistilled prodistill
