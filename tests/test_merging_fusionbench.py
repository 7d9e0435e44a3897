"""WUDI, Iso-C, Iso-CTS, EMR (and TSV-M) against FusionBench 0.2.33 (``pip install 'trap2[fusionbench]'``) as the
independent reference, on small full-rank state dicts (where the numerical-rank cut of Iso-C/CTS keeps
everything, so both define the same merge). Skipped when FusionBench is not installed."""

import contextlib
import io

import pytest
import torch

fb_iso = pytest.importorskip("fusion_bench.method.isotropic_merging.iso_utils")
fb_wudi = pytest.importorskip("fusion_bench.method.wudi.wudi")
fb_emr = pytest.importorskip("fusion_bench.method.emr_merging.utils")
fb_tsv = pytest.importorskip("fusion_bench.method.task_singular_vector.utils.TSVM_utils")

from trap2.merging import merge_deltas  # noqa: E402


def _task_vectors(t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "q.weight": 0.01 * torch.randn(24, 16, generator=g),
            "o.weight": 0.01 * torch.randn(16, 24, generator=g),
            "norm.bias": 0.1 * torch.randn(24, generator=g),
        }
        for _ in range(t)
    ]


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def _close(ours, ref):
    """Equal up to FusionBench's float32 rounding (trap2 does the linear algebra in float64)."""
    assert set(ours) == set(ref)
    for n in ref:
        scale = float(ref[n].detach().abs().max())
        torch.testing.assert_close(ours[n], ref[n].detach(), rtol=1e-4, atol=1e-5 * scale)


def test_iso_c_matches_fusionbench():
    tvs = _task_vectors()
    _close(merge_deltas("iso_c", tvs), _quiet(fb_iso.iso_c, tvs, accelerator="cpu"))


@pytest.mark.parametrize("common", [0.5, 0.8])
def test_iso_cts_matches_fusionbench(common):
    tvs = _task_vectors()
    _close(
        merge_deltas("iso_cts", tvs, common=common), _quiet(fb_iso.iso_cts, tvs, common, accelerator="cpu")
    )


@pytest.mark.parametrize("steps", [10, 300])
def test_wudi_matches_fusionbench(steps):
    # the same loss and Adam; the gradients differ in rounding only (closed form vs autograd)
    tvs = _task_vectors()
    ours = merge_deltas("wudi", tvs, steps=steps, device="cpu")
    _close(ours, _quiet(fb_wudi.wudi_merging, tvs, accelerator="cpu", iter_num=steps))


def test_emr_matches_fusionbench_per_tensor():
    """FusionBench's rescaler is one per task over the whole model; on one-tensor models it is the
    per-tensor rescaler computed here."""
    for name in ("q.weight", "norm.bias"):
        tvs = [{name: tv[name]} for tv in _task_vectors(seed=1)]
        unified, masks, rescalers = fb_emr.emr_merge(tvs)
        ours = merge_deltas("emr", tvs)
        for i, d in enumerate(ours):
            torch.testing.assert_close(d[name], rescalers[i] * unified[name] * masks[name][i])


def test_emr_model_scope_matches_fusionbench():
    """scope='model': one rescaler per task over every tensor, as FusionBench (and the public code)."""
    tvs = _task_vectors(seed=2)
    unified, masks, rescalers = fb_emr.emr_merge(tvs)
    ours = merge_deltas("emr", tvs, scope="model")
    for i, d in enumerate(ours):
        for n in unified:
            torch.testing.assert_close(d[n], rescalers[i] * unified[n] * masks[n][i])


def test_tsv_matches_fusionbench():
    """TSV-M with every task's ⌊k/T⌋ triplets (k = 16 splits evenly over 4 tasks, as FusionBench needs)."""
    tvs = _task_vectors(seed=3)
    ref = _quiet(fb_tsv.compute_and_sum_svd_mem_reduction, tvs, accelerator="cpu")
    _close(merge_deltas("tsv", tvs), ref)
