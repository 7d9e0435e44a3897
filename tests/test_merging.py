import pytest
import torch
from peft.utils import merge_utils

from trap2.errors import ConfigError, UnknownNameError
from trap2.merging import METHODS, get_merge_method, merge_deltas, merge_method


def _deltas(t=4, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(t)]


@pytest.mark.parametrize("name", METHODS.names())
def test_conformance(name):
    m = get_merge_method(name)
    ds = _deltas()
    out = m(ds)
    assert out.shape == ds[0].shape and out.dtype == ds[0].dtype and torch.isfinite(out).all()
    perm = m(ds[::-1])
    torch.testing.assert_close(out, perm)
    single = m(ds[:1], **({"k": 100.0} if "k" in m.hparams else {}))
    torch.testing.assert_close(single, ds[0])


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
