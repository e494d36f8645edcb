"""Progress off a terminal: one plain line per step, so a log file shows which step runs."""

import io
import re

from megatron_apbv.runtime.progress import Progress


def test_one_line_per_step_when_not_a_terminal():
    out = io.StringIO()  # isatty() is False, as for a SLURM log or a pipe
    progress = Progress(3, "apbv eval", stream=out)
    for label in ("examples 1-8 of 16: dense", "examples 1-8 of 16: apbv p=N/128", "examples 9-16 of 16: dense"):
        progress.step(label)
    progress.note("a one-time compilation")
    progress.close()
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"apbv eval \[1/3\] examples 1-8 of 16: dense \(\d+ s so far\)", lines[0])
    assert lines[1].startswith("apbv eval [2/3] examples 1-8 of 16: apbv p=N/128")
    assert lines[2].startswith("apbv eval [3/3] examples 9-16 of 16: dense")
    assert lines[3] == "a one-time compilation"
    assert re.fullmatch(r"apbv eval: 3/3 done in \d+ s", lines[4])


def test_other_ranks_print_nothing():
    out = io.StringIO()
    progress = Progress(2, "apbv bench", enabled=False, stream=out)
    progress.step("layer N=468 apbv")
    progress.note("note")
    progress.close()
    assert out.getvalue() == ""


def test_counts_off_a_terminal_print_one_line_per_interval_and_a_last_one(monkeypatch):
    import megatron_apbv.runtime.progress as module

    clock = {"now": 100.0}
    monkeypatch.setattr(module.time, "monotonic", lambda: clock["now"])
    out = io.StringIO()
    progress = Progress(40, "apbv infer", stream=out, interval=30.0)
    for t, done, errors, tokens in ((10, 2, 0, 20), (31, 10, 1, 310), (45, 12, 1, 400), (61, 20, 1, 610)):
        clock["now"] = 100.0 + t
        progress.update(done, errors, tokens)
    progress.close()
    lines = out.getvalue().splitlines()
    # at 31 s (>= 30 s since the start) and 61 s (30 s after that), then the last counts at close
    assert lines == [
        "apbv infer: 10/40 done, errors 1 | 0.32 req/s | 10.0 tok/s | ETA 93s (31 s so far)",
        "apbv infer: 20/40 done, errors 1 | 0.33 req/s | 10.0 tok/s | ETA 61s (61 s so far)",
        "apbv infer: 20/40 done, errors 1 | 0.33 req/s | 10.0 tok/s | ETA 61s (61 s so far)",
    ]


def test_counts_on_a_terminal_move_the_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = Progress(4, "apbv infer", stream=tty)
    progress.update(2, 1, 8)
    assert progress.bar.n == 2 and "errors 1" in tty.getvalue()
    progress.close()
    quiet = Terminal()
    progress = Progress(4, "apbv infer", enabled=False, stream=quiet)
    progress.update(2, 0)
    progress.close()
    assert quiet.getvalue() == ""
