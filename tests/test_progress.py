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
