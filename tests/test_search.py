from trap2.attacks import PAPER_GRID, search_coefficient


def test_paper_grid():
    assert PAPER_GRID[0] == 0.1 and PAPER_GRID[-1] == 9.9 and len(PAPER_GRID) == 99


def test_finds_the_peak_and_stops_early():
    calls = []

    def score(c):
        calls.append(c)
        return -((c - 0.7) ** 2)

    r = search_coefficient(score)
    assert r.coefficient == 0.7
    assert len(calls) == 7 + 10  # up to the peak, then 10 points without improvement


def test_no_early_stop_scans_everything_and_first_best_wins_ties():
    r = search_coefficient(lambda c: 1.0 if c in (0.3, 0.5) else 0.0, patience=None)
    assert r.coefficient == 0.3 and len(r.tried) == 99
