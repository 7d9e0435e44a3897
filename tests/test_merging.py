import pytest
import torch
from peft.utils import merge_utils

from trap2.errors import ConfigError, UnknownNameError
from trap2.merging import METHODS, SPACES, get_merge_method, merge_deltas, merge_method, merge_updates
from trap2.updates import LowRank, Update


def _deltas(t=4, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(t)]


def _lora_updates(ranks=(2, 3, 2, 4), shape=(12, 10), seed=0):
    """LoRA-like updates of different ranks on one matrix, plus a dense bias."""
    g = torch.Generator().manual_seed(seed)
    ups = []
    for r in ranks:
        a, b = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        ups.append(
            Update({"layer.weight": LowRank(a, b, 0.5), "layer.bias": torch.randn(shape[0], generator=g)})
        )
    return ups


def _cast(ups, dtype):
    """The same updates stored in ``dtype`` (LoRA factors and dense entries alike)."""

    def cast(d):
        return (
            LowRank(d.A.to(dtype), d.B.to(dtype), d.scaling, d.fan_in_fan_out)
            if isinstance(d, LowRank)
            else d.to(dtype)
        )

    return [Update({k: cast(d) for k, d in u.deltas.items()}) for u in ups]


# relative tolerance of a merge of half-precision inputs against the float32 merge of the same values
HALF_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("space", SPACES.names())
@pytest.mark.parametrize("name", METHODS.names())
def test_conformance(name, space, dtype):
    # TSV in KnOTS truncates inside a degenerate spectrum unless each rank fits its budget (tsv.py)
    ups = _lora_updates(ranks=(2, 2, 2, 2)) if (name, space) == ("tsv", "knots") else _lora_updates()
    ups = _cast(ups, dtype)
    spec = get_merge_method(name)

    def merge(members, **hp):
        """The merge as a list of results, one per member for a per-task method (else one)."""
        out = merge_updates(members, name, space, **hp)
        return list(out.updates) if spec.per_task else [out]

    results = merge(ups)
    assert len(results) == (len(ups) if spec.per_task else 1)
    for result in results:
        merged = result.dense()
        for k, v in ups[0].dense().items():
            assert (
                merged[k].shape == v.shape and merged[k].dtype == v.dtype and torch.isfinite(merged[k]).all()
            )
            # dense members' results keep their dtype; LoRA products and low-rank factors are float32
            d, want = result.deltas[k], torch.float32 if isinstance(ups[0].deltas[k], LowRank) else dtype
            assert {d.A.dtype, d.B.dtype} == {torch.float32} if isinstance(d, LowRank) else d.dtype == want
    tol = {"rtol": max(1e-4, HALF_RTOL[dtype]), "atol": 1e-5}
    # reversed members: the same merge (a per-task merge: each member's own result, in reversed order)
    for permuted, result in zip(merge(ups[::-1])[:: -1 if spec.per_task else 1], results, strict=True):
        for k, v in result.dense().items():
            torch.testing.assert_close(permuted.dense()[k], v, **tol)
    if spec.identity is not None:
        single = merge(ups[:1], **spec.identity)[0].dense()
        for k, v in ups[0].dense().items():
            torch.testing.assert_close(single[k], v, **tol)
    else:  # no setting returns one member as it is (Iso-C flattens it): its merge is a fixed point
        once = merge(ups[:1])[0]
        twice = merge([once])[0].dense()
        for k, v in once.dense().items():
            torch.testing.assert_close(twice[k], v, **tol)
    # the same values held in float32 merge to the same result, up to the dtype's rounding
    for result, wide_result in zip(results, merge(_cast(ups, torch.float32)), strict=True):
        merged, wide = result.dense(), wide_result.dense()
        for k in merged:
            scale = float(wide[k].abs().max())
            torch.testing.assert_close(
                merged[k], wide[k], rtol=HALF_RTOL[dtype], atol=HALF_RTOL[dtype] * scale
            )


def test_ta_is_the_sum_and_matches_peft():
    ds = _deltas()
    out = get_merge_method("ta")(ds)
    torch.testing.assert_close(out, sum(ds))
    torch.testing.assert_close(out, merge_utils.task_arithmetic(ds, torch.ones(len(ds))))


@pytest.mark.parametrize("k", [100.0, 50.0, 20.0])
def test_ties_matches_peft_per_tensor(k):
    ds = _deltas(shape=(20, 10))  # 200 entries: k% of them is a whole number, as PEFT floors it
    ours = get_merge_method("ties")(ds, k=k)
    ref = merge_utils.ties(ds, torch.ones(len(ds)), density=k / 100)
    torch.testing.assert_close(ours, ref)


def test_ties_model_scope_trims_over_the_whole_update():
    g = torch.Generator().manual_seed(1)
    # task 0 has one large and one small tensor: per-tensor trimming keeps entries of both,
    # model-wide trimming keeps almost nothing of the small one
    a = [{"big": 10 * torch.randn(50, generator=g), "small": 0.01 * torch.randn(50, generator=g)}]
    per_tensor = merge_deltas("ties", a, k=20.0)
    model_wide = merge_deltas("ties", a, k=20.0, scope="model")
    assert int((per_tensor["small"] != 0).sum()) == 10
    assert int((model_wide["small"] != 0).sum()) == 0
    assert int((model_wide["big"] != 0).sum()) == 20


def test_merge_deltas_by_name_and_missing_names():
    a = {"w": torch.ones(3), "only_a": torch.ones(2)}
    b = {"w": 2 * torch.ones(3)}
    out = merge_deltas("ta", [a, b])
    torch.testing.assert_close(out["w"], 3 * torch.ones(3))
    torch.testing.assert_close(out["only_a"], torch.ones(2))


def test_bad_requests():
    with pytest.raises(UnknownNameError, match="valid: .*ta.*ties"):
        get_merge_method("slerp2")
    with pytest.raises(ConfigError, match=r"k=0.0 is out of range; valid: \(0, 100\]"):
        get_merge_method("ties")(_deltas(), k=0.0)
    with pytest.raises(ConfigError, match="k=101"):
        merge_deltas("ties", [{"w": torch.ones(2)}], k=101)
    with pytest.raises(ConfigError, match="no hyperparameter 'density'"):
        merge_deltas("ties", [{"w": torch.ones(2)}], density=0.2)
    with pytest.raises(ConfigError, match="different shapes"):
        get_merge_method("ta")([torch.ones(2), torch.ones(3)])
    with pytest.raises(ConfigError, match="at least one"):
        merge_deltas("ta", [])
    with pytest.raises(ValueError, match="already registered"):
        merge_method("ta", summary="x", reference="y")(lambda ds: ds[0])


@pytest.mark.parametrize("space", ["knots", "core"])
def test_ta_is_the_same_in_every_space(space):
    ups = _lora_updates()
    full = merge_updates(ups, "ta", "full").dense()
    other = merge_updates(ups, "ta", space)
    assert isinstance(other.deltas["layer.weight"], LowRank)  # low-rank out: writable as a LoRA adapter
    for k, v in full.items():
        torch.testing.assert_close(other.dense()[k], v, rtol=1e-4, atol=1e-5)


def test_knots_reconstructs_each_task_exactly():
    from trap2.merging.registry import MergeMethod
    from trap2.merging.spaces import merge_knots

    ups = _lora_updates()
    dense = [u.dense()["layer.weight"] for u in ups]
    for i in range(len(ups)):
        pick = MergeMethod("pick", lambda vs, i=i: vs[i], "", "")
        rebuilt = merge_knots(pick, [u.deltas["layer.weight"] for u in ups], {}).dense()
        torch.testing.assert_close(rebuilt, dense[i], rtol=1e-4, atol=1e-5)


def test_tsv_factors_are_orthonormal():
    from trap2.merging.tsv import polar_factor

    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(16, 12, generator=g, dtype=torch.float64) for _ in range(4)]
    per_task = 12 // 4
    us = [torch.linalg.svd(d)[0][:, :per_task] for d in ds]
    u_perp = polar_factor(torch.cat(us, 1))
    torch.testing.assert_close(u_perp.T @ u_perp, torch.eye(12, dtype=torch.float64))
    merged = get_merge_method("tsv")(ds)
    # the merged matrix's singular values are the kept Σ's (orthonormal factors carry them unchanged)
    kept = torch.cat([torch.linalg.svdvals(d)[:per_task] for d in ds]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(merged), kept)


def test_core_space_refuses_dense_matrices():
    ups = [Update({"w": torch.randn(4, 3)}), Update({"w": torch.randn(4, 3)})]
    with pytest.raises(ConfigError, match="core space needs LoRA"):
        merge_updates(ups, "ta", "core")


@pytest.mark.parametrize("name", ["dare", "dare_ties"])
def test_dare_is_seeded_reproducible_and_rescales(name):
    ups = _lora_updates()
    a = merge_updates(ups, name, p=0.5, seed=1).dense()["layer.weight"]
    b = merge_updates(ups, name, p=0.5, seed=1).dense()["layer.weight"]
    c = merge_updates(ups, name, p=0.5, seed=2).dense()["layer.weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = torch.ones(200_000)
    out = get_merge_method("dare")([x], p=0.3, seed=0)
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))


def _ties_by_hand(members, k):
    """TIES with model-wide trimming, written out: each member (a dict of tensors, already weighted) keeps
    its top-k % magnitudes over all of its tensors together; then sign election and disjoint mean."""
    kept = []
    for m in members:
        flat = torch.cat([t.flatten() for t in m.values()]).abs()
        n_keep = round(flat.numel() * k / 100)
        cut = torch.topk(flat, n_keep).values[-1]
        kept.append({n: t * (t.abs() >= cut) for n, t in m.items()})
    out = {}
    for n in members[0]:
        stack = torch.stack([m[n] for m in kept])  # (T, ...)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        out[n] = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


@pytest.mark.parametrize("names", [("w",), ("w", "v", "b")])
def test_ties_model_scope_trims_the_weighted_members(names):
    g = torch.Generator().manual_seed(4)
    shapes = {"w": (6, 5), "v": (3, 4), "b": (7,)}
    ups = [{n: torch.randn(shapes[n], generator=g) * s for n in names} for s in (1.0, 3.0)]
    weights = [2.0, 0.5]
    weighted = [{n: w * t for n, t in u.items()} for u, w in zip(ups, weights, strict=True)]
    out = merge_updates(ups, "ties", weights=weights, k=30.0, scope="model").dense()
    pre = merge_updates(weighted, "ties", k=30.0, scope="model").dense()
    ref = _ties_by_hand(weighted, 30.0)
    for n in names:
        torch.testing.assert_close(out[n], ref[n])
        torch.testing.assert_close(pre[n], ref[n])


@pytest.mark.parametrize("space", ["knots", "core"])
def test_ties_model_scope_is_refused_outside_full_space(space):
    with pytest.raises(ConfigError, match="scope='model'.*full space"):
        merge_updates(_lora_updates(), "ties", space, scope="model")


@pytest.mark.parametrize("name", METHODS.names())
def test_knots_keeps_the_shape_of_tensors_no_lora_layer_holds(name):
    """A ViT's class token (1, 1, d) and position table (1, n, d) of full fine-tunes: KnOTS merges them
    in their own shape, and task arithmetic there equals the sum (it came back (1, n·d) before)."""
    g = torch.Generator().manual_seed(0)
    ups = [
        Update({"cls": torch.randn(1, 1, 8, generator=g), "pos": torch.randn(1, 5, 8, generator=g)})
        for _ in range(3)
    ]
    out = merge_updates(ups, name, "knots").dense()
    for merged in out if get_merge_method(name).per_task else [out]:
        assert {k: tuple(v.shape) for k, v in merged.items()} == {"cls": (1, 1, 8), "pos": (1, 5, 8)}
    if name == "ta":
        for k in ("cls", "pos"):
            torch.testing.assert_close(merged[k], sum(u.dense()[k] for u in ups), rtol=1e-4, atol=1e-5)
