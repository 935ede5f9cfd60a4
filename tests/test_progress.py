"""progress.py: plain progress lines when the output is not a terminal."""
import time

import progress


def test_off_a_terminal_progress_is_a_line_at_a_time(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    for _ in progress.progress(range(6), desc="IG", unit="img"):
        time.sleep(0.03)
    lines = [ln.strip("\r") for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) >= 3 and lines[0].startswith("IG: 0/6 img") and lines[-1].startswith("IG: 6/6 img")
    assert all(ln.startswith("IG: ") for ln in lines), lines  # whole lines, no bar redrawn in place
