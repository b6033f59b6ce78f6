"""``vfdirect demo`` as a user runs it: a real subprocess building a two-host cluster,
its output, its JSON report, its exit status, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vfdirect.cli.demo import CLAIM_A, console_events, io_summary, verify_totals

pytestmark = pytest.mark.timeout(400)

#: A short run: about 20 s of setup and 2 migrations on a loaded machine.
SHORT = ("--duration", "4", "--migrations", "2", "--vdisk-size", "2MiB")
WAIT_S = 300.0


def _env(tmpdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def _demo(*args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfdirect", "demo", *args],
                          capture_output=True, text=True, timeout=WAIT_S, env=_env(tmpdir),
                          stdin=subprocess.DEVNULL, check=False)


def _processes_in(directory: Path) -> list[int]:
    """Live processes whose command line names a path under ``directory``."""
    prefix = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(a == prefix or a.startswith(prefix + b"/") for a in args):
            found.append(int(entry.name))
    return found


def _directory(output: str) -> Path:
    m = re.search(r"^directory: (\S+)$", output, re.MULTILINE)
    assert m, output
    return Path(m.group(1))


def test_console_events_leave_a_partial_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    assert console_events(path) == ([], 0)
    path.write_bytes(b'{"event": "a"}\nnot json\n{"event": "b"}\n{"event": "c", "x"')
    got, offset = console_events(path)
    assert [e["event"] for e in got] == ["a", "b"]
    with open(path, "ab") as f:
        f.write(b': 1}\n')
    got, offset2 = console_events(path, offset)
    assert got == [{"event": "c", "x": 1}] and offset2 == path.stat().st_size


def test_verify_totals_add_up_every_process_of_the_vm() -> None:
    def progress(n: int) -> dict[str, object]:
        return {"event": "verify_progress", "writes": n, "reads": 2 * n, "verified": 2 * n,
                "errors": 0}

    started = {"event": "verify_started"}
    h1 = [started, progress(10), progress(30), started, progress(5)]  # went and came back
    h2 = [started, progress(7), {"workload": "verify", "ok": True}]
    assert verify_totals([h1, h2]) == {"writes": 42, "reads": 84, "verified": 84,
                                       "errors": 0}


def test_io_summary_of_the_intervals() -> None:
    events = [{"iops": 100.0, "p50_us": 10.0, "p99_us": 50.0},
              {"iops": 300.0, "p50_us": 30.0, "p99_us": 900.0},
              {"iops": 200.0, "p50_us": 20.0, "p99_us": 60.0},
              {"iops": 0.0, "p50_us": 0.0, "p99_us": 0.0},  # no IO completed: left out
              {"writes": 5}]  # the final event, without an interval
    assert io_summary(events) == {"intervals": 3, "iops": 200.0, "p50_us": 20.0,
                                  "p99_us": 60.0, "worst_p99_us": 900.0}
    assert io_summary([])["intervals"] == 0


def test_demo_runs_every_claim_step_and_migrates(tmp_path: Path) -> None:
    r = _demo(*SHORT, tmpdir=tmp_path)
    out = r.stdout
    assert r.returncode == 0, f"{out}\n{r.stderr}"
    for claim in CLAIM_A:
        assert re.search(rf"^\s+{claim} \w+", out, re.MULTILINE), (claim, out)
    assert "claim steps A1-A8 performed by the hypervisor" in out
    assert re.search(r"\[ ok \] migration mig-\S+ h1 -> h2 committed", out), out
    assert re.search(r"\[ ok \] migration mig-\S+ h2 -> h1 committed", out), out
    assert "vm1 continues its IO on h2" in out
    assert re.search(r"^\s+vm1\s+h1\s+\d+ ", out, re.MULTILINE), out  # report row
    assert " 0 failed" in out and out.rstrip().endswith("OK")
    # the temporary directory and every process started in it are gone
    where = _directory(out)
    assert where.is_relative_to(tmp_path)
    assert not where.exists()
    assert _processes_in(where) == []


def test_demo_json_report_has_its_fields(tmp_path: Path) -> None:
    where = tmp_path / "cluster"
    r = _demo("--duration", "3", "--migrations", "1", "--vdisk-size", "2MiB",
              "--memory", "8MiB", "--dir", str(where), "--json")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    report = json.loads(r.stdout)  # the progress went to stderr
    assert "A8 fwtable_write" in r.stderr
    assert report["ok"] is True and report["kept"] is False
    assert report["directory"] == str(where)
    assert report["options"] == {"duration_s": 3.0, "migrations": 1, "vdisk_size": 2 << 20,
                                 "memory": 8 << 20}
    assert {c["claim"] for c in report["claims"]} >= set(CLAIM_A)
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert set(report["vms"]) == {"vm1", "vm2"}
    for vm in report["vms"].values():
        assert vm["iops"] > 0 and vm["intervals"] > 0
        assert 0 < vm["p50_us"] <= vm["p99_us"] <= vm["worst_p99_us"]
        assert vm["verify"]["ok"] is True and vm["verify"]["errors"] == 0
        assert vm["totals"]["verified"] >= vm["verify"]["verified"] > 0
    [mig] = report["migrations"]
    assert mig["outcome"] == "committed" and mig["vm"] == "vm1"
    assert (mig["source"], mig["destination"]) == ("h1", "h2")
    assert {"prepare", "quiesce", "drain", "handoff", "mediated", "precopy", "stop_copy",
            "destination", "commit"} <= set(mig["phases_ms"])
    assert mig["downtime_ms"] > 0
    # --dir: the cluster's files are kept, its processes are not
    assert (where / "san" / "array0").is_dir() and (where / "h1" / "host.log").exists()
    assert _processes_in(where) == []


@pytest.mark.parametrize(("args", "needle"), [
    (("--vdisk-size", "1000"), "--vdisk-size 1000 must be a multiple of 512"),
    (("--memory", "1MiB"), "at least 4MiB"),
    (("--duration", "0"), "--duration"),
    (("--migrations", "-1"), "--migrations"),
])
def test_demo_refuses_bad_options(args: tuple[str, ...], needle: str) -> None:
    r = _demo(*args)
    assert r.returncode != 0
    assert r.stderr.startswith("vfdirect: error: ") and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_demo_refuses_a_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    r = _demo("--dir", str(tmp_path))
    assert r.returncode == 1
    assert "is not an empty directory" in r.stderr
    assert (tmp_path / "something").exists()


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    # The demo's temporary directory, guest memory files included, lives in /dev/shm here.
    shm = Path(f"/dev/shm/vfd-demo-test-{os.getpid()}-{time.monotonic_ns()}")
    shm.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vfdirect", "demo", "--duration", "60",
                             "--migrations", "8", "--vdisk-size", "2MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(shm), stdin=subprocess.DEVNULL)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while not any(line.startswith("migration 1/") for line in out):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "".join(out)
            line = lines.get(timeout=remaining)
            assert line is not None, "".join(out) + (proc.stderr.read() if proc.stderr else "")
            out.append(line)
        where = _directory("".join(out))
        assert where.parent == shm
        time.sleep(0.5)  # in the middle of the migration
        assert _processes_in(where)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert rc == 130, (rc, stderr)
        assert "vfdirect: error: interrupted" in stderr
        assert _processes_in(where) == []
        assert not where.exists()
        assert list(shm.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in _processes_in(shm):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(shm)], check=False)
