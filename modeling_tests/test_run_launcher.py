"""`run_launcher` (conftest) kills the launcher's whole process group on timeout: ranks never outlive a failed test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_launcher

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

CHILD = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
        "print(p.pid, flush=True); time.sleep(60)"


def test_timeout_kills_the_launchers_children(tmp_path):
    pid_file = tmp_path / "out.txt"
    with pytest.raises(subprocess.TimeoutExpired):
        run_launcher([sys.executable, "-c", CHILD.replace("print(p.pid, flush=True)", f"open({str(pid_file)!r}, 'w')"
                                                          ".write(str(p.pid))")], timeout=3)
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.5)
    assert not grandchild.exists() or grandchild.read_text().split(")")[-1].split()[0] in ("Z", "X")  # gone, or dead


def test_returns_what_subprocess_run_returns():
    result = run_launcher([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                          timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
