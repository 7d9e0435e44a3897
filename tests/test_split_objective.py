import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet
from peft import LoraConfig, get_peft_model

from trap2.config import ObjectiveConfig
from trap2.objectives import get_objective
from trap2.objectives.split import SplitTrap2Objective
from trap2.scaling import ScaledModel, base_params, lora_sample_scales, lora_scale
from trap2.suites.base import CrossEntropy


def _lora():
    torch.manual_seed(0)
    return get_peft_model(
        TinyNet(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False, rank_pattern={"fc2": 2}
        ),
    )


def test_per_sample_scales_equal_separate_forwards():
    model = _lora()
    x = torch.randn(5, 6)
    s = torch.tensor([0.0, 0.3, 1.0, 1.7, 2.5])
    with lora_sample_scales(model, s):
        together = model(x)
    for i, si in enumerate(s.tolist()):
        with lora_scale(model, si):
            torch.testing.assert_close(together[i], model(x[i : i + 1])[0], rtol=1e-5, atol=1e-6)
    assert not model.base_model.model.fc1.lora_B["default"]._forward_hooks  # hooks removed


def test_all_ones_is_plain_forward_and_gradient():
    model = _lora()
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with lora_sample_scales(model, torch.ones(8)):
        F.cross_entropy(model(x), y).backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g1[n], p.grad)


def test_no_off_nominal_part_is_plain_fine_tuning():
    model = _lora()
    scaled = ScaledModel(model, "lora")
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    st = SplitTrap2Objective(ObjectiveConfig(), off_fraction=0.0).backward(
        scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(0)
    )
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain = get_objective("none").backward(scaled, x, y, F.cross_entropy, torch.Generator())
    assert st.loss == plain.loss
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(g1[n], p.grad)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_split_objective_is_the_formula(kind):
    if kind == "lora":
        model = _lora()
        scaled = ScaledModel(model, "lora")
    else:
        torch.manual_seed(0)
        model = TinyNet()
        w0 = base_params(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        scaled = ScaledModel(model, "full", w0)
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    cfg = ObjectiveConfig(lam=0.3)
    st = get_objective(ObjectiveConfig(name="trap2_split", lam=0.3)).backward(
        scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(4)
    )
    s = st.scales
    assert len(s) == 5 and all(not 0.95 < v < 1.05 for v in s)
    with torch.no_grad():
        nominal = F.cross_entropy(scaled(x[:5], 1.0), y[:5])
        off = [F.cross_entropy(scaled(x[5 + i : 6 + i], s[i]), y[5 + i : 6 + i]) / s[i] for i in range(5)]
        ref = nominal - cfg.lam * sum(off) / 5
    assert st.loss == pytest.approx(float(ref), rel=1e-5)


class TokenNet(torch.nn.Module):
    """(N, L, d) → token logits (N, C, L): the layout of a token-level task (e.g. the math suite)."""

    def __init__(self, d: int = 6, n_classes: int = 5) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).transpose(1, 2)


def _masked_token_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean over its non-ignored positions of −log p(target), written out by hand."""
    out = []
    for lg, t in zip(logits, y, strict=True):  # lg (C, L), t (L,)
        keep = torch.nonzero(t != -100).flatten()
        lp = lg.log_softmax(0)
        out.append(torch.stack([-lp[t[i], i] for i in keep.tolist()]).mean())
    return torch.stack(out)


def test_cross_entropy_per_sample_is_the_masked_mean_per_sample():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 7, (4, 6))
    y[0, :4] = -100  # sample 0 has 2 targets, sample 2 has 5
    y[2, 0] = -100
    loss = CrossEntropy()
    per = loss.per_sample(logits, y)
    torch.testing.assert_close(per, _masked_token_ce(logits, y))
    # the logits at ignored positions do not count
    other = logits.clone()
    other[0, :, :4] = 100 * torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(loss.per_sample(other, y), per)
    # the batch mean is the token mean (F.cross_entropy's), classification logits (N, C) per sample too
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))
    flat, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    torch.testing.assert_close(loss.per_sample(flat, labels), F.cross_entropy(flat, labels, reduction="none"))


@pytest.mark.parametrize("loss_fn", [CrossEntropy(), F.cross_entropy], ids=["task_loss", "bare_function"])
def test_split_objective_counts_no_ignored_token(loss_fn):
    """Token-level targets with ignored positions (L = n_off, so a (N, L) loss would broadcast): the
    off-nominal term is Σ_j w(s_j)·(masked mean token CE of sample j) / n_off."""
    torch.manual_seed(0)
    model = TokenNet().double()
    w0 = base_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    scaled = ScaledModel(model, "full", w0)
    x, y = torch.randn(8, 4, 6, dtype=torch.float64), torch.randint(0, 5, (8, 4))
    y[4, :3] = -100  # off-nominal samples with 1, 2 and 4 targets
    y[5, 1:3] = -100
    cfg = ObjectiveConfig(name="trap2_split", lam=0.3)
    st = get_objective(cfg).backward(scaled, x, y, loss_fn, torch.Generator().manual_seed(4))
    (s,) = set(st.scales)
    with torch.no_grad():
        nominal = F.cross_entropy(scaled(x[:4], 1.0), y[:4])
        off = _masked_token_ce(scaled(x[4:], s), y[4:])
    assert st.nominal == pytest.approx(float(nominal), rel=1e-12)
    assert st.off_nominal == pytest.approx(float(off.mean()), rel=1e-12)
    assert st.loss == pytest.approx(float(nominal - cfg.lam / s * off.mean()), rel=1e-12)
