from trap2.eval.report import recovery_gaps, threats_table


def _cell(method, search, protected, mean, target=0.5):
    return {
        "method": method,
        "space": "full",
        "search": search,
        "protected": protected,
        "acc": {"mean": mean, "rot90": target},
    }


def test_recovery_gap_is_the_share_of_the_distance_to_the_unprotected_merge():
    report = {
        "target": "rot90",
        "zero_shot": {"mean": 0.6},
        "attacks": [
            _cell("ta", "global", False, 0.80),
            _cell("ta", "global", True, 0.60),
            _cell("ta", "recover10", False, 0.82),
            {**_cell("ta", "recover10", True, 0.65), "from_w0": {"mean": 0.7}},
            _cell("ta", "recover100", True, 0.90),
            _cell("ties", "recover10", True, 0.7),  # no global cell to compare with: left out
        ],
    }
    gaps = {g["search"]: g for g in recovery_gaps(report)}
    assert set(gaps) == {"recover10", "recover100"}
    assert abs(gaps["recover10"]["closed"] - 0.25) < 1e-9  # (0.65 − 0.60) / (0.80 − 0.60)
    assert gaps["recover10"]["unprotected_recovered"] == 0.82
    assert abs(gaps["recover100"]["closed"] - 1.5) < 1e-9  # past the unprotected merge
    assert gaps["recover100"]["unprotected_recovered"] is None
    assert gaps["recover10"]["from_w0"] == 0.7 and gaps["recover100"]["from_w0"] is None
    md = "\n".join(threats_table(report))
    assert "ta recover10 | 82.0 (50.0) | 65.0 (50.0) |" in md
    assert (
        "ta, k = 10: 60.0 → 65.0 (unprotected merge 80.0, itself recovered to 82.0; W0 itself recovered "
        "to 70.0): closes 25 % of the gap." in md
    )
