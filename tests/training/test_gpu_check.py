"""scripts/gpu_check.sh rehearsed on CPU, as CI can: every check runs (tiny model, 64x64 synthetic
nuclei), so the script and the code paths it drives (AMP modes, resume, torchrun with a process
group, predict, the speed figures) keep working between the sessions that have a GPU. The checks
that cannot run on a CPU (the CUDA vs CPU comparison; the speed bar, which is the GPU recipe's)
say SKIP, never PASS. About 2-2.5 min of CPU time on a 2-core machine."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CHECKS = ["amp-auto", "amp-fp16", "resume", "torchrun", "cuda-vs-cpu", "speed"]
CPU_SKIPS = {"cuda-vs-cpu", "speed"}  # need CUDA / apply to the GPU recipe only


def _run(*args, timeout=60, **env):
    import os

    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_bad_options_exit_2_with_one_line(tmp_path):
    r = _run("--bogus")
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = _run("--wheels", str(tmp_path))  # no wheels there: stop before any work
    assert r.returncode == 2 and "no .whl files" in r.stderr and "CHECK" not in r.stdout


@pytest.mark.slow
def test_cpu_rehearsal_passes_what_runs_and_skips_what_cannot(tmp_path):
    work = tmp_path / "work"
    r = _run("--device", "cpu", "--work", str(work), timeout=1200)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("CHECK ")]
    err = (work / "check.err").read_text()[-3000:] if (work / "check.err").exists() else ""
    report = f"{r.stdout}\n{r.stderr[-3000:]}\n{err}"
    assert [ln.split(":")[0] for ln in lines] == [f"CHECK {c}" for c in CHECKS], report
    verdicts = {ln.split(":")[0][len("CHECK "):]: ln.split(": ", 1)[1].split()[0] for ln in lines}
    assert verdicts == {c: "SKIP" if c in CPU_SKIPS else "PASS" for c in CHECKS}, report
    assert r.returncode == 0, report
    assert "0 failed check(s), 2 skipped" in r.stdout
