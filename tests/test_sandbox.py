"""The sandbox holds its limits: each test proves the limit itself (wall time bounded, memory error seen and
peak RSS under the cap, process count capped, no process left behind), not just that a call returned."""
import os
import threading
import time

import pytest

from rftkit.sandbox import SandboxError, run_python


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running a sandboxed main.py (a recycled pid running something else does not count)."""
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"main.py" in f.read():
                    out.append(p)
        except OSError:
            pass
    return out


def _pids(path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_runs_code_with_files_stdin_and_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("RFTKIT_SECRET_TOKEN", "hunter2")
    code = ("import os, sys\nfrom helper import twice\nprint(twice(int(sys.stdin.read())))\n"
            "print(os.environ.get('RFTKIT_SECRET_TOKEN'), os.getcwd() == os.environ['HOME'])\n")
    r = run_python(code, stdin="21", files={"helper.py": "def twice(x):\n    return 2 * x\n"})
    assert r.ok and r.stdout == "42\nNone True\n" and r.killed_reason is None
    bad = run_python("import sys\nprint('partial')\nsys.exit(3)")
    assert bad.returncode == 3 and not bad.ok and bad.stdout == "partial\n" and bad.killed_reason is None
    err = run_python("1 / 0")
    assert err.returncode == 1 and "ZeroDivisionError" in err.stderr and err.killed_reason is None


def test_infinite_loop_is_killed_at_the_wall_clock():
    t = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    wall = time.perf_counter() - t
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode < 0 and not r.ok
    assert 1.0 <= r.duration_s and wall < 1.0 + 8.0          # 8 s of slack for a loaded 2-core machine
    slept = run_python("import time\ntime.sleep(60)\n", timeout_s=1.0)   # not burning CPU: the wall clock decides
    assert slept.timed_out and slept.duration_s < 9.0


def test_ten_gigabytes_fail_with_a_memory_error_and_the_cap_holds():
    r = run_python("x = bytearray(10 * 1024 ** 3)\nprint('allocated')\n", memory_mb=256)
    assert r.memory_exceeded and r.killed_reason == "memory" and "MemoryError" in r.stderr
    assert "allocated" not in r.stdout and not r.timed_out
    # memory actually touched, in steps: resident memory stops below the cap
    grow = run_python("x = []\nwhile True:\n    x.append(b'x' * (8 << 20))\n", memory_mb=256, timeout_s=20)
    assert grow.memory_exceeded and not grow.timed_out
    assert 100 < grow.peak_rss_mb <= 256, grow.peak_rss_mb


def test_fork_bomb_is_capped_and_leaves_no_process_behind(tmp_path):
    log = tmp_path / "pids"
    code = (f"import os\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n        continue\n"
            f"    if pid == 0:\n        with open({str(log)!r}, 'a') as f:\n            f.write(f'{{os.getpid()}}\\n')\n")
    t = time.perf_counter()
    r = run_python(code, timeout_s=2.0, max_procs=8)
    wall = time.perf_counter() - t
    assert r.timed_out and wall < 2.0 + 8.0
    if r.process_limit == "none":
        pytest.skip("no way to bound processes here")
    if r.peak_procs is not None:                          # where the pids cgroup reports its peak
        assert r.peak_procs <= 8
    spawned = _pids(log)
    assert len(spawned) >= 7                              # it did fork: the cap, not luck, stopped it
    assert _alive(spawned) == []
    if r.process_limit == "cgroup" and os.path.isdir("/sys/fs/cgroup/pids"):     # its cgroup was removed
        assert not [n for n in os.listdir("/sys/fs/cgroup/pids") if n.startswith("rftkit-sandbox-")]


def test_daemonised_grandchild_does_not_outlive_the_program(tmp_path):
    """A double fork + setsid leaves the process group and the parent exits at once: still reaped."""
    log = tmp_path / "pids"
    code = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        open({str(log)!r}, 'w').write(str(os.getpid()))\n        time.sleep(120)\n    os._exit(0)\n"
            f"time.sleep(0.5)\nprint('parent done')\n")
    r = run_python(code, timeout_s=10.0)
    assert r.ok and r.stdout == "parent done\n" and r.duration_s < 9.0
    assert len(_pids(log)) == 1 and _alive(_pids(log)) == []


def test_output_flood_is_bounded():
    r = run_python("while True:\n    print('x' * 1000)\n", timeout_s=10.0, max_file_mb=1, max_output_bytes=4096)
    assert r.killed_reason == "file size" and not r.timed_out
    assert r.output_truncated and len(r.stdout) == 4096


def test_no_network():
    r = run_python("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=3)\nprint('connected')\n")
    if not r.network_isolated:
        pytest.skip("no network namespace available here (not root, no user namespaces)")
    assert "connected" not in r.stdout and r.returncode == 1 and "OSError" in r.stderr


def test_concurrent_runs_from_threads_are_independent():
    results = {}

    def one(i):
        results[i] = run_python(f"print({i} * {i})", timeout_s=20)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * i}\n" for i in range(6)}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="max_procs must be >= 1"):
        run_python("pass", max_procs=0)
    with pytest.raises(ValueError, match=r"must be relative, got '../x.py'"):
        run_python("pass", files={"../x.py": ""})
    assert issubclass(SandboxError, RuntimeError)
