import io

from trap2.progress import LineReporter, RichReporter, cli_reporter


def test_line_reporter_says_each_stage_its_progress_and_its_time(monkeypatch):
    clock = iter([0.0, 10.0, 40.0, 45.0, 50.0])
    monkeypatch.setattr("trap2.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    with LineReporter(out, every=30.0) as rep, rep.stage("attack matrix", 4) as advance:
        advance(1)  # t = 10: too soon for a line
        advance(2)  # t = 40: 30 s since the start
        advance(1)  # t = 45: too soon
    assert out.getvalue().splitlines() == [
        "attack matrix (4)",
        "  attack matrix: 3/4, 40 s",
        "  attack matrix: done in 50.0 s",
    ]


def test_the_cli_draws_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: False))
    assert isinstance(cli_reporter(), LineReporter)
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
    assert isinstance(cli_reporter(), RichReporter)
