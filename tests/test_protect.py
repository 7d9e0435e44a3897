"""``trap2 protect``: the self-distillation objective's math, protecting a LoRA and a dense update on
digits, the recorded teacher, and the one-line errors (nothing written) for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from file_helpers import run_cli
from test_operators import full_model, hand_operator, lora_model, reference_output

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError, DataError, UpdateFileError
from trap2.eval.evaluate import base_state, scaling_curve
from trap2.objectives import get_objective, operators
from trap2.objectives.operators import OPERATORS, draw_operators
from trap2.objectives.self_distill import SelfDistillObjective, distill_loss, teacher_ce
from trap2.protect import ProtectConfig, protect_objective, protect_update, trap_steps, update_fingerprint
from trap2.scaling import ScaledModel
from trap2.training import train_update
from trap2.updates import load_update

SHORT = TrainConfig(objective=ObjectiveConfig(name="none"), steps=60, warmup_steps=5, eval_every=60)
PROTECT = ProtectConfig(
    train=TrainConfig(
        objective=ObjectiveConfig(name="trap2_distill", lam=0.1),
        steps=30,
        warmup_steps=3,
        eval_every=30,
        lr=5e-3,
    )
)


@pytest.fixture(scope="module")
def plain_lora(digits, tmp_path_factory):
    r = train_update(digits, "rot90", SHORT)
    folder = tmp_path_factory.mktemp("plain") / "rot90"
    r.update.save(folder, peft_model=r.peft_model)
    return folder


# --- the objective ------------------------------------------------------------------------------------


def test_distill_loss_is_kl_and_zero_at_the_teacher():
    torch.manual_seed(0)
    t, s = torch.randn(5, 7), torch.randn(5, 7)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(distill_loss(s, t), ref, atol=1e-6)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    ref_t2 = 4 * F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean"
    )
    assert torch.allclose(distill_loss(s, t, 2.0), ref_t2, atol=1e-6)
    assert torch.allclose(teacher_ce(s, t), F.cross_entropy(s, t.argmax(-1)))
    tok_s, tok_t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)  # token logits (N, L, V)
    assert torch.allclose(
        teacher_ce(tok_s, tok_t), F.cross_entropy(tok_s.reshape(6, 7), tok_t.argmax(-1).reshape(6))
    )


def test_objective_gradient_matches_the_hand_written_J(tiny_net):
    """The accumulated gradient is that of KL(t‖f_1) − λ·w(s)·CE(f_s, argmax t) at the drawn s."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_net, LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    scaled = ScaledModel(model, "lora")
    x, teacher = torch.randn(8, 6), torch.randn(8, 5)
    cfg = ObjectiveConfig(name="trap2_distill", lam=0.4, weight="inv")
    objective = get_objective(cfg)
    assert isinstance(objective, SelfDistillObjective)
    st = objective.backward(scaled, x, teacher, F.cross_entropy, torch.Generator().manual_seed(3))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (s,) = st.scales
    j = distill_loss(scaled(x, 1.0), teacher) - 0.4 / s * F.cross_entropy(scaled(x, s), teacher.argmax(-1))
    j.backward()
    assert st.loss == pytest.approx(float(j.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize("balance", [None, 0.5])
def test_sparser_trap_steps_scale_lambda_and_the_balance_cap_alike(balance):
    """off_every = 3: a trap step carries λ·3 and, under balance, the cap ρ·3 (a cap left at ρ would clip
    the tripled trap gradient back and undo the λ scaling); off_every = 1 changes nothing."""
    cfg = ObjectiveConfig(name="trap2_distill", lam=0.4, balance=balance)
    assert SelfDistillObjective(cfg).trap_config(cfg) is cfg
    got = SelfDistillObjective(cfg, off_every=3).trap_config(cfg)
    assert got.lam == pytest.approx(1.2)
    assert got.balance == (None if balance is None else pytest.approx(1.5))
    assert dataclasses.replace(got, lam=cfg.lam, balance=cfg.balance) == cfg  # nothing else changes


def test_cheaper_trap_steps_match_the_hand_written_J(tiny_net):
    """off_fraction: the off-nominal term on the batch's first inputs only; off_every = 2: odd steps are the
    teacher match alone, even steps carry the off-nominal term with λ·2."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_net, LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    scaled = ScaledModel(model, "lora")
    x, teacher = torch.randn(8, 6), torch.randn(8, 5)
    cfg = ObjectiveConfig(name="trap2_distill", lam=0.4, weight="inv")
    objective = SelfDistillObjective(cfg, off_fraction=0.25, off_every=2)
    gen = torch.Generator().manual_seed(3)

    def grads() -> dict[str, torch.Tensor]:
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return g

    first = objective.backward(scaled, x, teacher, F.cross_entropy, gen)
    got_first = grads()
    second = objective.backward(scaled, x, teacher, F.cross_entropy, gen)
    got_second = grads()
    assert first.scales == [] and first.off_nominal is None
    (s,) = second.scales
    for st, got, j in (
        (first, got_first, distill_loss(scaled(x, 1.0), teacher)),
        (
            second,
            got_second,
            distill_loss(scaled(x, 1.0), teacher)
            - 2 * 0.4 / s * F.cross_entropy(scaled(x[:2], s), teacher[:2].argmax(-1)),
        ),
    ):
        j.backward()
        assert st.loss == pytest.approx(float(j.detach()), rel=1e-5)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(got[n], p.grad, atol=1e-6), n
        model.zero_grad()
    assert objective.cfg.lam == 0.4  # λ·2 held for the step only


def test_repair_steps_are_the_teacher_match_alone(tiny_net):
    """trap_steps = 2 (ProtectConfig.repair: the last steps): steps 1–2 draw a scale, 3–4 are KL(t‖f_1)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = ScaledModel(get_peft_model(tiny_net, LoraConfig(r=2, target_modules=["fc1"])), "lora")
    x, teacher = torch.randn(8, 6), torch.randn(8, 5)
    objective = SelfDistillObjective(ObjectiveConfig(name="trap2_distill", lam=0.4), trap_steps=2)
    gen = torch.Generator().manual_seed(0)
    stats = [objective.backward(model, x, teacher, F.cross_entropy, gen) for _ in range(4)]
    assert [len(st.scales) for st in stats] == [1, 1, 0, 0]
    assert stats[3].loss == pytest.approx(float(distill_loss(model(x, 1.0), teacher)), rel=1e-5)
    assert trap_steps(ProtectConfig(repair=0.5)) == 50 and trap_steps(ProtectConfig()) is None
    with pytest.raises(ConfigError, match="repair must be in"):
        ProtectConfig(repair=1.0)
    with pytest.raises(ConfigError, match="apply to targets='teacher'"):
        ProtectConfig(targets="labels", repair=0.5)


def test_protect_objective_carries_the_phase_knobs():
    """The protect run's objective (also what benchmarks/step_time.py times): trap2_distill with the
    phase's knobs, or the labelled trap2."""
    cfg = ProtectConfig(off_every=2, off_fraction=0.5, repair=0.25, temperature=2.0, match="mse")
    obj = protect_objective(cfg)
    assert isinstance(obj, SelfDistillObjective) and obj.cfg == cfg.train.objective
    assert (obj.off_every, obj.off_fraction, obj.trap_steps) == (2, 0.5, trap_steps(cfg)) == (2, 0.5, 75)
    assert (obj.temperature, obj.match) == (2.0, "mse")
    assert [obj.traps(k) for k in range(1, 5)] == [False, True, False, True]
    labels = protect_objective(ProtectConfig(targets="labels"))
    assert type(labels).__name__ == "Trap2Objective" and labels.cfg.name == "trap2"


def test_labels_are_refused_as_teacher_outputs(tiny_net):
    from peft import LoraConfig, get_peft_model

    model = ScaledModel(get_peft_model(tiny_net, LoraConfig(r=2, target_modules=["fc1"])), "lora")
    with pytest.raises(ConfigError, match="teacher's outputs"):
        get_objective("trap2_distill").backward(
            model, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), F.cross_entropy, torch.Generator()
        )


# --- the hardened objective's operators (objective.operators) -----------------------------------------


def record_draws(monkeypatch):
    """Lists that receive every batch of draws the objective makes (``draw_operators``' result) and every
    transform it applies to the model (``ScaledModel.transformed``'s argument)."""
    drawn, applied = [], []
    draw, transformed = operators.draw_operators, ScaledModel.transformed

    def recording_draw(*args):
        drawn.append(draw(*args))
        return drawn[-1]

    def recording_transformed(self, transforms):
        applied.append(transforms)
        return transformed(self, transforms)

    monkeypatch.setattr(operators, "draw_operators", recording_draw)
    monkeypatch.setattr(ScaledModel, "transformed", recording_transformed)
    return drawn, applied


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("ops", ["trim", "spectral", "layer_scale"])
def test_distill_at_an_operator_draw_equals_the_hand_written_J(monkeypatch, kind, ops):
    """trap2_distill with objective.operators: the trap term is measured at W0 + op(ΔW) of the drawn
    operator, J = KL(t‖f_1) − λ·w(s)·CE(f_op, argmax t), op written out by hand on the dense ΔW."""
    model, w0 = lora_model(1) if kind == "lora" else full_model(1)
    drawn, applied = record_draws(monkeypatch)
    x, teacher = torch.randn(12, 10, dtype=torch.float64), torch.randn(12, 7, dtype=torch.float64)
    cfg = ObjectiveConfig(name="trap2_distill", lam=0.4, operators=ops, keep_min=0.3, keep_max=0.6)
    (d,) = draw_operators(cfg, model, 1, torch.Generator().manual_seed(8))  # the draw the step will make
    st = get_objective(cfg).backward(model, x, teacher, F.cross_entropy, torch.Generator().manual_seed(8))
    assert [[(e.operator, e.s) for e in batch] for batch in drawn] == [[(ops, d.s)]] and st.scales == [d.s]
    (used,) = applied
    assert used is drawn[0][0].transforms and used.keys() == {u.name for u in model.units()}
    params = [p for p in model.model.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    off = teacher_ce(reference_output(model, w0, x, hand_operator(model, d, cfg, ops, 8)), teacher)
    j = distill_loss(model.model(x), teacher) - cfg.lam / d.s * off
    j.backward()
    assert st.off_nominal == pytest.approx(float(off.detach()), rel=1e-6)
    assert st.loss == pytest.approx(float(j.detach()), rel=1e-6)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_distill_draws_every_off_nominal_model_from_the_family(monkeypatch):
    """A family of four, eight draws per step, off_every = 2: the trap step's draws are the family's (those
    draw_operators makes from the step's generator), each applied as drawn; the nominal-only step draws none."""
    model, _ = lora_model(2)
    drawn, applied = record_draws(monkeypatch)
    family = "scale,layer_scale,trim,spectral"
    cfg = ObjectiveConfig(name="trap2_distill", lam=0.2, operators=family, n_samples=8)
    objective = SelfDistillObjective(cfg, off_every=2)
    x, teacher = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    assert objective.backward(model, x, teacher, F.cross_entropy, gen).scales == [] and drawn == []
    st = objective.backward(model, x, teacher, F.cross_entropy, gen)
    (draws,) = drawn
    want = draw_operators(cfg, model, 8, torch.Generator().manual_seed(5))
    assert [(d.operator, d.s) for d in draws] == [(d.operator, d.s) for d in want]
    assert {d.operator for d in draws} <= set(family.split(",")) and len({d.operator for d in draws}) >= 3
    assert st.scales == [d.s for d in draws]
    transformed = [d.transforms for d in draws if d.transforms is not None]  # 'scale' runs ScaledModel.scale
    assert len(applied) == len(transformed) and all(a is t for a, t in zip(applied, transformed, strict=True))


@pytest.mark.parametrize("targets", ["teacher", "labels"])
def test_protect_trains_with_the_operators_and_records_them(monkeypatch, digits, plain_lora, targets):
    drawn, applied = record_draws(monkeypatch)
    objective = ObjectiveConfig(name="trap2_distill", lam=0.1, operators="layer_scale,trim", keep_min=0.2)
    cfg = ProtectConfig(
        train=dataclasses.replace(PROTECT.train, steps=3, objective=objective), targets=targets
    )
    r = protect_update(digits, load_update(plain_lora), cfg)
    assert len(drawn) == 3 and {d.operator for batch in drawn for d in batch} <= {"layer_scale", "trim"}
    assert len(applied) == 3
    recorded = r.update.meta["objective"]
    assert recorded["operators"] == "layer_scale,trim" and recorded["keep_min"] == 0.2
    assert recorded["name"] == ("trap2_distill" if targets == "teacher" else "trap2")


# --- protecting an update -----------------------------------------------------------------------------


def test_protect_lora_keeps_predictions_and_records_the_teacher(digits, plain_lora, tmp_path):
    original = load_update(plain_lora)
    r = protect_update(digits, original, PROTECT)
    assert r.agreement >= 0.85  # 30 steps: the student still predicts mostly what the teacher does
    assert abs(r.acc_protected - r.acc_teacher) <= 0.06
    meta = r.update.meta
    assert meta["objective"]["name"] == "trap2_distill" and meta["objective"]["lam"] == 0.1
    assert meta["teacher"]["fingerprint"] == update_fingerprint(original)
    assert meta["teacher"]["meta"]["objective"]["name"] == "none"
    assert meta["protect"]["targets"] == "teacher" and meta["protect"]["inputs"] == len(
        digits.task("rot90").train
    )
    r.update.save(tmp_path / "p", peft_model=r.peft_model)
    back = load_update(tmp_path / "p")
    assert back.kind == "lora" and back.meta["teacher"] == meta["teacher"]
    back.check_base(base_state(digits.make_backbone()), digits.fingerprint)
    # the trap: off the nominal scale the protected update loses accuracy the original keeps
    bb, task = digits.make_backbone(), digits.task("rot90")
    before = scaling_curve(bb, task, original.dense(), (0.5, 1.0, 2.0))
    after = scaling_curve(bb, task, back.dense(), (0.5, 1.0, 2.0))
    assert after[2] < before[2] - 0.1
    assert after[1] == pytest.approx(r.acc_protected)


def test_protect_lora_starts_exactly_at_the_teacher(digits, plain_lora):
    """With λ = 0 and a negligible lr the student is the teacher: 100 % agreement, same accuracy."""
    cfg = ProtectConfig(train=dataclasses.replace(PROTECT.train, steps=1, lr=1e-12))
    r = protect_update(digits, load_update(plain_lora), cfg)
    assert r.agreement == 1.0 and r.acc_protected == r.acc_teacher
    assert r.update.meta["protect"]["inputs"] == 64  # 1 step × batch 64: the teacher ran on those only


def test_protect_dense_update(digits):
    full = train_update(digits, "flip", dataclasses.replace(SHORT, mode="full", steps=20, lr=1e-3))
    cfg = ProtectConfig(train=dataclasses.replace(PROTECT.train, steps=10, lr=1e-3))
    r = protect_update(digits, full.update, cfg)
    assert r.update.kind == "dense" and r.peft_model is None
    assert set(r.update.deltas) == set(full.update.deltas)
    assert r.agreement >= 0.85 and r.update.meta["mode"] == "full"


def test_protect_with_labels_runs_trap2_from_the_update(digits, plain_lora):
    cfg = ProtectConfig(train=dataclasses.replace(PROTECT.train, steps=5), targets="labels")
    assert cfg.train.objective.name == "trap2"
    r = protect_update(digits, load_update(plain_lora), cfg)
    assert r.update.meta["objective"]["name"] == "trap2" and r.update.meta["protect"]["targets"] == "labels"


# --- bad input: one line, nothing written -------------------------------------------------------------


def test_bad_inputs_are_refused(digits, plain_lora):
    u = load_update(plain_lora)
    task = digits.task("rot90")
    with pytest.raises(DataError, match="no inputs"):
        protect_update(digits, u, PROTECT, inputs=task.train.x[:0])
    with pytest.raises(DataError, match="shape"):
        protect_update(digits, u, PROTECT, inputs=torch.rand(10, 6, 6))
    with pytest.raises(DataError, match="modality"):
        protect_update(digits, u, PROTECT, inputs=torch.zeros(10, 8, 8, dtype=torch.long))


def test_another_base_and_already_protected_are_refused(digits, plain_lora):
    u = load_update(plain_lora)
    other = dataclasses.replace(u, meta={**u.meta, "base_fingerprint": "f" * 64})
    with pytest.raises(UpdateFileError, match="made for base"):
        protect_update(digits, other, PROTECT)
    protected = dataclasses.replace(u, meta={**u.meta, "objective": {"name": "trap2"}})
    with pytest.raises(ConfigError, match="already carries Trap² settings.*--force"):
        protect_update(digits, protected, PROTECT)
    cfg = ProtectConfig(train=dataclasses.replace(PROTECT.train, steps=2))
    again = protect_update(digits, protected, cfg, force=True)
    assert again.update.meta["teacher"]["meta"]["objective"]["name"] == "trap2"


def test_cli_protect_writes_a_release(monkeypatch, capsys, plain_lora, tmp_path):
    out = tmp_path / "protected"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "protect", plain_lora, "--suite", "digits", "--out", out,
        "--steps", "3", "--lam", "0.2", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "agreement with the original" in stdout
    u = load_update(out)
    assert u.kind == "lora" and u.meta["objective"]["lam"] == 0.2 and u.meta["protect"]["steps"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--inputs", "nope.txt"), "--inputs nope.txt"),
        (("--task", "flip", "--inputs", "val"), None),  # any task name is checked against the base only
    ],
)
def test_cli_bad_inputs_write_nothing(monkeypatch, capsys, plain_lora, tmp_path, extra, message):
    out = tmp_path / "protected"
    code, _, err = run_cli(
        monkeypatch, capsys, "protect", plain_lora, "--suite", "digits", "--out", out, "--steps", "1", *extra
    )
    if message is None:
        assert code == 0
        return
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_protect_takes_the_operators(monkeypatch, capsys, plain_lora, tmp_path):
    """--operators (one option per ObjectiveConfig field, as trap2 train) and protect.train.objective in
    the config file; an unknown operator: one line naming the valid ones, nothing written."""
    out = tmp_path / "flag"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "protect",
        plain_lora,
        "--out",
        out,
        "--steps",
        "2",
        "--operators",
        "layer_scale,trim",
    )
    assert code == 0, err
    assert load_update(out).meta["objective"]["operators"] == "layer_scale,trim"
    config = tmp_path / "protect.yaml"
    config.write_text("protect:\n  train:\n    steps: 2\n    objective:\n      operators: [trim, spectral]\n")
    out = tmp_path / "yaml"
    assert run_cli(monkeypatch, capsys, "protect", plain_lora, "--out", out, "--config", config)[0] == 0
    assert load_update(out).meta["objective"]["operators"] == "trim,spectral"

    bad = tmp_path / "bad.yaml"
    bad.write_text("protect:\n  train:\n    objective:\n      operators: scale,ties\n")
    valid = "valid: " + ", ".join(OPERATORS.names())
    out = tmp_path / "refused"
    for extra in (("--operators", "scale,ties"), ("--config", bad)):
        code, _, err = run_cli(
            monkeypatch, capsys, "protect", plain_lora, "--out", out, "--steps", "1", *extra
        )
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "unknown operator 'ties'" in err and valid in err
        assert not out.exists()


def test_cli_refuses_a_protected_update_and_empty_inputs(monkeypatch, capsys, plain_lora, tmp_path):
    from trap2.io import save_tensors

    first = tmp_path / "first"
    assert run_cli(monkeypatch, capsys, "protect", plain_lora, "--out", first, "--steps", "1")[0] == 0
    out = tmp_path / "second"
    code, _, err = run_cli(monkeypatch, capsys, "protect", first, "--out", out, "--steps", "1")
    assert code == 2 and "already carries Trap² settings" in err and "--force" in err
    assert not out.exists()
    empty = tmp_path / "empty.safetensors"
    save_tensors(empty, {"x": torch.zeros(0, 8, 8)})
    code, _, err = run_cli(monkeypatch, capsys, "protect", plain_lora, "--out", out, "--inputs", empty)
    assert code == 2 and "no inputs" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert run_cli(monkeypatch, capsys, "protect", first, "--out", out, "--steps", "1", "--force")[0] == 0


def test_cli_protect_on_a_model_folder(monkeypatch, capsys, digits, plain_lora, tmp_path):
    """--base MODEL --task NAME=:DATA builds the one-task suite from the files (files_suite, faked here by
    the digits task: the command path only) and protects the update on it; --suite with --base is refused."""
    from trap2.suites import files

    calls = []

    def files_suite(base, tasks, **kw):
        calls.append((base, [t.name for t in tasks]))
        return dataclasses.replace(digits, name="files", tasks={t.name: digits.task("rot90") for t in tasks})

    monkeypatch.setattr(files, "files_suite", files_suite)
    (tmp_path / "model").mkdir()
    (tmp_path / "rot90.jsonl").write_text('{"text": "unused by the fake suite", "label": 0}\n')
    spec = f"rot90=:{tmp_path / 'rot90.jsonl'}"
    out = tmp_path / "protected"
    code, _, err = run_cli(
        monkeypatch, capsys, "protect", plain_lora, "--base", tmp_path / "model", "--task", spec,
        "--out", out, "--steps", "2",
    )  # fmt: skip
    assert code == 0, err
    assert calls == [(tmp_path / "model", ["rot90"])] and load_update(out).meta["task"] == "rot90"
    code, _, err = run_cli(
        monkeypatch, capsys, "protect", plain_lora, "--base", tmp_path / "model", "--suite", "digits",
        "--task", spec, "--out", tmp_path / "other",
    )  # fmt: skip
    assert code == 2 and "--base" in err and not (tmp_path / "other").exists()


def test_cost_benchmark_reports_consistent_ratios(plain_lora, tmp_path):
    """benchmarks/protect_cost.py in a tiny run: the ratios are the compute of each run over plain's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "protect_cost.py"
    out = tmp_path / "cost.json"
    args = ["--update", plain_lora, "--plain-steps", "600", "--protect-steps", "60", "--scratch-steps", "600"]
    args += ["--repair", "0.25", "--steps", "1", "--rounds", "1", "--out", out]
    done = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "protect / original fine-tuning" in done.stdout
    r = json.loads(out.read_text())
    c, step = r["compute_seconds"], r["step_seconds"]
    assert c["plain"] == pytest.approx(600 * step["none"])
    assert r["steps"]["protect_trap"] == 45 and r["steps"]["protect_repair"] == 15
    assert c["protect"] == pytest.approx(
        45 * step["trap2_distill"] + 15 * step["repair"] + r["teacher_pass_seconds"]
    )
    assert r["ratios"]["plain_then_protect_over_plain"] == pytest.approx(1 + c["protect"] / c["plain"])
    assert r["kind"] == "protect-cost" and {"command", "threads", "machine", "wall_seconds"} <= set(r)
