"""Reliability: resume after a kill, atomic outputs, determinism, fuzzed configs and files."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig, from_dict
from trap2.errors import Trap2Error
from trap2.io import save_tensors
from trap2.merging import merge_updates
from trap2.training import train_update
from trap2.updates import Update, load_update

CFG = TrainConfig(
    steps=60, eval_every=10, warmup_steps=5, checkpoint_every=20, lora=LoraSettings(dropout=0.1)
)


class _Stop(Exception):
    pass


@pytest.mark.slow  # 3 runs of 60 steps per mode
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_bit_identical(digits, tmp_path, mode):
    cfg = dataclasses.replace(CFG, mode=mode, select="best")
    whole = train_update(digits, "flip", cfg)

    def die_at_50(step, _row):
        if step == 50:
            raise _Stop

    with pytest.raises(_Stop):
        train_update(digits, "flip", cfg, die_at_50, checkpoint_dir=tmp_path / "ck")
    resumed = train_update(digits, "flip", cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.history == whole.history
    for k, v in whole.update.dense().items():
        assert torch.equal(v, resumed.update.dense()[k]), k


def test_resume_refuses_a_different_config(digits, tmp_path):
    def stop(step, _row):
        if step == 30:
            raise _Stop

    with pytest.raises(_Stop):
        train_update(digits, "flip", CFG, stop, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(Trap2Error, match="different configuration"):
        train_update(
            digits, "flip", dataclasses.replace(CFG, lr=1e-3), checkpoint_dir=tmp_path / "ck", resume=True
        )
    with pytest.raises(Trap2Error, match="nothing to resume"):
        train_update(digits, "flip", CFG, checkpoint_dir=tmp_path / "none", resume=True)


def _cli(*args):
    return [sys.executable, "-m", "trap2.cli", *args]


def _wait_for(path, proc, timeout=120):
    """Poll until ``path`` exists, failing if ``proc`` exits first or ``timeout`` seconds pass."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.slow  # two 400-step CLI runs and a resumed one
def test_sigkill_during_training_then_resume(tmp_path):
    out = tmp_path / "u"
    args = ["train", "--out", str(out), "--task", "invert", "--steps", "400", "--threads", "1"]
    ref = subprocess.run(_cli(*args[:2], str(tmp_path / "ref"), *args[3:]), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(
        _cli(*args, "--checkpoint-every", "50"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # killed as soon as the first checkpoint (step 50) is in place: between two checkpoint writes, with
    # 350 steps left to run, whatever the machine's speed
    _wait_for(tmp_path / "u.checkpoint" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half-written update where a finished one is expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stray temporaries kept
    r = subprocess.run(_cli(*args, "--checkpoint-every", "50", "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "u.checkpoint").exists()
    a, b = load_update(tmp_path / "ref").dense(), load_update(out).dense()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ``trap2 merge`` with os.replace held at the commit of OUT (argv[1]): it touches argv[2] once every output
# file is written to the temporary folder, then waits there to be killed; argv[3:] are the CLI arguments
_HELD_AT_COMMIT = """
import os, sys, time
from pathlib import Path

target, reached = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
replace = os.replace


def held(src, dst, *args, **kwargs):
    if Path(dst).resolve() == target:
        reached.touch()
        time.sleep(600)
    return replace(src, dst, *args, **kwargs)


os.replace = held
sys.argv = ["trap2", *sys.argv[3:]]
from trap2.cli import main

main()
"""


def test_sigkill_during_a_merge_leaves_no_output(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        p = tmp_path / f"u{i}.safetensors"
        save_tensors(p, {f"l{j}.weight": torch.randn(32, 32, generator=g) for j in range(3)})
        paths.append(str(p))
    out, reached = tmp_path / "m", tmp_path / "reached-commit"
    args = ["merge", *paths, "--base", paths[0], "--method", "tsv", "--out", str(out), "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_AT_COMMIT, str(out), str(reached), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(reached, proc)
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
        assert len(partial) == 1 and any(partial[0].iterdir())  # written, but only to a temporary folder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # killed at the last moment: still no half-written result under OUT
    r = subprocess.run(_cli(*args), capture_output=True, text=True)  # the leftover does not get in the way
    assert r.returncode == 0, r.stderr
    assert set(load_update(out).dense()) == {f"l{j}.weight" for j in range(3)}


def test_same_seed_same_bits(digits, tmp_path):
    cfg = TrainConfig(steps=30, eval_every=30, warmup_steps=5, lora=LoraSettings(dropout=0.1))
    a, b = train_update(digits, "rot90", cfg), train_update(digits, "rot90", cfg)
    for k, v in a.update.dense().items():
        assert torch.equal(v, b.update.dense()[k])
    plain = train_update(digits, "flip", dataclasses.replace(cfg, objective=ObjectiveConfig(name="none")))
    ups = [a.update, plain.update]
    m1 = merge_updates(ups, "dare_ties", "knots", p=0.4, seed=3).dense()
    m2 = merge_updates(ups, "dare_ties", "knots", p=0.4, seed=3).dense()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    a.update.save(tmp_path / "x")
    b.update.save(tmp_path / "y")
    for name in ("delta.safetensors", "adapter_model.safetensors"):
        if (tmp_path / "x" / name).exists():
            assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


@pytest.mark.slow  # two whole demos
def test_reports_are_deterministic(tmp_path):
    from trap2.demo import run_demo
    from trap2.pipeline import DemoConfig

    cfg = DemoConfig(
        train=TrainConfig(steps=20, eval_every=20, warmup_steps=2),
        methods=("ta", "dare_ties"),
        spaces=("full",),
        extra_searches=(),
        scales=(0.5, 1.0),
    )
    r1 = run_demo(cfg, tmp_path / "a")
    r2 = run_demo(cfg, tmp_path / "b")
    for r in (r1, r2):  # the timings are the only fields that may differ
        r.pop("wall_seconds"), r.pop("stages")
    assert r1 == r2


class _Runaway:
    """Plain fine-tuning that reports an off-nominal loss running away after step 5."""

    name = "runaway_test"

    def __init__(self, cfg):
        self.calls = 0

    def backward(self, model, x, y, loss_fn, gen):
        from trap2.objectives.base import StepStats

        self.calls += 1
        loss = loss_fn(model(x), y)
        loss.backward()
        off = 5000.0 if self.calls > 5 else 20.0
        return StepStats(loss=float(loss.detach()), nominal=float(loss.detach()), off_nominal=off)


def test_off_nominal_runaway_is_reported_once(digits, caplog):
    from trap2.objectives import OBJECTIVES

    OBJECTIVES.register("runaway_test", _Runaway)
    try:
        cfg = TrainConfig(
            steps=20, eval_every=20, warmup_steps=2, objective=ObjectiveConfig(name="runaway_test")
        )
        with caplog.at_level("WARNING", logger="trap2.training.loop"):
            r = train_update(digits, "rot90", cfg)
        calm = train_update(digits, "rot90", dataclasses.replace(cfg, objective=ObjectiveConfig(name="none")))
    finally:
        del OBJECTIVES._items["runaway_test"]
    assert caplog.text.count("running away") == 1 and "step 6" in caplog.text
    assert r.update.meta["offnominal_diverged"] is True
    assert calm.update.meta["offnominal_diverged"] is False


# --- fuzzing ------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.floats(-2, 2), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(ObjectiveConfig)] + ["junk"]), VALUES)
)
def test_fuzz_objective_config(data):
    try:
        cfg = from_dict(ObjectiveConfig, data)
    except Trap2Error as e:
        assert "\n" not in str(e)
        return
    assert 0 < cfg.s_min < 1 - cfg.delta and cfg.s_max > 1 + cfg.delta and cfg.lam >= 0


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), VALUES))
def test_fuzz_train_config(data):
    try:
        cfg = from_dict(TrainConfig, data)
    except Trap2Error as e:
        assert "\n" not in str(e)
        return
    assert cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.peak_lr > 0


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    Update({"a.weight": torch.randn(16, 8), "a.bias": torch.randn(16)}, {"task": "x"}).save(folder / "u")
    return (folder / "u" / "delta.safetensors").read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
@example(flips=[(320, 1), (4548, 1)], cut=None)  # a marker key damaged + a data byte: found by this test
def test_fuzz_update_files(tmp_path_factory, good_file, flips, cut):
    data = bytearray(good_file)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if cut is not None:
        data = data[: cut % len(data)]
    folder = tmp_path_factory.mktemp("case")
    (folder / "delta.safetensors").write_bytes(bytes(data))
    try:
        upd = load_update(folder)
    except Trap2Error as e:
        assert "\n" not in str(e)
        return
    # loaded without complaint: then every tensor is exactly what was written (no silent corruption)
    clean = tmp_path_factory.mktemp("clean")
    (clean / "delta.safetensors").write_bytes(good_file)
    ref = load_update(clean).dense()
    got = upd.dense()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_legacy_bin_is_refused_unless_asked_and_never_unpickles(tmp_path):
    import pickle

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(Trap2Error, match="only safetensors"):
        load_update(folder)
    with pytest.raises(Trap2Error, match="weights_only"):
        load_update(folder, allow_legacy_bin=True)
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    torch.save(
        {
            "base_model.model.fc.lora_A.weight": torch.ones(2, 3),
            "base_model.model.fc.lora_B.weight": torch.ones(4, 2),
        },
        folder / "adapter_model.bin",
    )
    upd = load_update(folder, allow_legacy_bin=True)
    assert torch.equal(upd.dense()["fc.weight"], torch.full((4, 3), 2.0))


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}, "not a readable safetensors"),
        ({"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}, "not a readable safetensors"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}, "not a readable safetensors"),
    ],
)
def test_crafted_headers_are_clear_errors(tmp_path, entry, fragment):
    header = json.dumps({"w": entry}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(Trap2Error, match=fragment) as e:
        load_update(path)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
