"""The sandbox holds its limits and its boundary: each test proves the property itself (wall time bounded, memory
error seen and peak RSS under the cap, process count capped, no process left behind, a secret not read, a file
not written, a connection not made, a process not killed), not just that a call returned.

Processes of a run are found from outside by their name: the program renames itself (PR_SET_NAME) to a tag
unique to the test, which every process it forks inherits."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rftkit.sandbox as sandbox
from rftkit.sandbox import SandboxError, run_python


def _tag() -> str:
    return "rftk" + secrets.token_hex(5)                    # 14 chars: fits the 15 of a process name


def _named(tag: str) -> str:
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n"


def _alive(tag: str) -> list[int]:
    """Host pids of processes (zombies excluded) named `tag`."""
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat.split(" (", 1)[1].startswith(tag + ")") and stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append(int(p))
    return out


def _gone(tag: str, within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(tag)


def _cgroups() -> set[str]:
    """The sandboxes' pids cgroups (other sessions' runs may come and go: compare before and after)."""
    base = "/sys/fs/cgroup/pids"
    return {n for n in os.listdir(base) if n.startswith("rftkit-sandbox-")} if os.path.isdir(base) else set()


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


def test_fork_bomb_is_capped_and_leaves_no_process_behind():
    tag, cgroups = _tag(), _cgroups()
    code = _named(tag) + ("import os\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
                          "        continue\n    if pid == 0:\n        os.write(1, b'child\\n')\n")
    t = time.perf_counter()
    r = run_python(code, timeout_s=2.0, max_procs=8)
    wall = time.perf_counter() - t
    assert r.timed_out and wall < 2.0 + 8.0
    assert r.process_limit in ("cgroup", "rlimit")
    if r.peak_procs is not None:                          # where the pids cgroup reports its peak
        assert r.peak_procs <= 8
    assert r.stdout.count("child") >= 7                   # it did fork: the cap, not luck, stopped it
    assert _gone(tag, within_s=0.0)
    if r.process_limit == "cgroup" and os.path.isdir("/sys/fs/cgroup/pids"):     # no cgroup outlives its run
        new = _cgroups() - cgroups
        assert [n for n in new if not os.path.exists(f"/proc/{n.rsplit('-', 1)[1]}")] == []   # its own is gone


def test_daemonised_grandchild_does_not_outlive_the_program():
    """A double fork + setsid leaves the process group and the parent exits at once: still killed."""
    tag = _tag()
    code = _named(tag) + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                          "        os.write(1, b'daemon\\n')\n        time.sleep(120)\n    os._exit(0)\n"
                          "time.sleep(0.5)\nprint('parent done')\n")
    r = run_python(code, timeout_s=10.0)
    assert r.ok and r.stdout == "daemon\nparent done\n" and r.duration_s < 9.0
    assert _gone(tag, within_s=0.0)


def test_output_flood_is_bounded():
    r = run_python("while True:\n    print('x' * 1000)\n", timeout_s=10.0, max_file_mb=1, max_output_bytes=4096)
    assert r.killed_reason == "file size" and not r.timed_out
    assert r.output_truncated and len(r.stdout) == 4096


def test_work_folder_is_bounded():
    code = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (4 << 20))\n    print(i, flush=True)\n"
    r = run_python(code, work_mb=16)
    assert r.killed_reason == "disk" and "No space left on device" in r.stderr
    assert 3 <= len(r.stdout.split()) <= 4                  # 12-16 MB written, then the folder was full


# ------------------------------------------------------------------------------------------- the boundary
def test_cannot_read_other_processes_environments(monkeypatch):
    secret = "hunter2-" + secrets.token_hex(8)
    monkeypatch.setenv("RFTKIT_SECRET_TOKEN", secret)       # in this process's environment, as a trainer's token
    code = (f"import os\nseen = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(len(seen))\n"
            f"found = []\nfor p in seen + [str(os.getppid()), {str(os.getpid())!r}]:\n    try:\n"
            f"        found += [p] if {secret.encode()!r} in open(f'/proc/{{p}}/environ', 'rb').read() else []\n"
            f"    except OSError:\n        pass\nprint('found', found)\n")
    r = run_python(code)
    assert r.ok, r.stderr
    n_visible, found = r.stdout.splitlines()
    assert found == "found []"                             # the secret was in /proc/<pytest>/environ on the host
    assert int(n_visible) <= 3                             # PID 1, the program, nothing else


def test_cannot_write_outside_its_work_folder(tmp_path):
    from rftkit.loading import cache_dir
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)                                   # writable by anyone: only the read-only view stops it
    name = f"rftkit-sandbox-probe-{secrets.token_hex(6)}"
    kernels = sorted((cache_dir() / "kernels").glob("*.so")) if (cache_dir() / "kernels").is_dir() else []
    targets = [Path.home() / name, cache_dir() / name, open_dir / name, Path("/var/tmp") / name,
               Path(sandbox.__file__).parent / name]
    code = ("import sys\nfor path in sys.argv[1:]:\n    try:\n        open(path, 'x').close()\n"
            "        print('WROTE', path)\n    except OSError as e:\n        print('refused', e.errno)\n"
            "for path in ['mine.txt', '/tmp/also_mine.txt']:\n    open(path, 'w').write('ok')\n"
            "print(open('mine.txt').read(), open('also_mine.txt').read())\n")
    appends = "".join(f"try:\n    open({str(k)!r}, 'ab').close()\n    print('WROTE', {str(k)!r})\n"
                      f"except OSError as e:\n    print('refused', e.errno)\n" for k in kernels)
    code = code.replace("import sys\n", "import sys\n" + appends)
    try:
        r = run_python(f"import sys\nsys.argv[1:] = {[str(t) for t in targets]!r}\n" + code)
        assert r.ok, r.stderr
        assert "WROTE" not in r.stdout, r.stdout
        assert r.stdout.count("refused") == len(targets) + len(kernels)
        assert r.stdout.endswith("ok ok\n")                 # its own folder is writable, also as /tmp
        assert not [t for t in targets if t.exists()]
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_no_network_not_even_loopback(tmp_path):
    server = socket.socket()                                # a server the test starts on this machine's loopback
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    unix = socket.socket(socket.AF_UNIX)                    # and a unix socket in a folder anyone may enter
    tmp_path.chmod(0o755)
    path = str(tmp_path / "s.sock")
    unix.bind(path)
    os.chmod(path, 0o777)
    unix.listen(8)
    unix.settimeout(0.2)
    code = (f"import socket\nfor fam, addr in [(socket.AF_INET, ('127.0.0.1', {server.getsockname()[1]})),"
            f" (socket.AF_UNIX, {path!r}), (socket.AF_INET, ('1.1.1.1', 53))]:\n    s = socket.socket(fam)\n"
            f"    s.settimeout(3)\n    try:\n        s.connect(addr)\n        print('CONNECTED', addr)\n"
            f"    except OSError as e:\n        print('refused', e.errno)\n")
    try:
        r = run_python(code)
        for s in (server, unix):
            with pytest.raises(socket.timeout):
                s.accept()                                  # no connection ever arrived
    finally:
        server.close()
        unix.close()
    assert r.ok and r.network_isolated, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 3, r.stdout


def test_cannot_signal_the_trainer_or_its_supervisor():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # stands in for the trainer
    try:
        code = (f"import os, signal\nfor pid in ({victim.pid}, os.getppid(), 1):\n"
                f"    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGSTOP, signal.SIGKILL):\n        try:\n"
                f"            os.kill(pid, sig)\n        except OSError as e:\n            print('refused', e.errno)\n"
                f"import time\ntime.sleep(0.3)\nprint('still here')\n")
        r = run_python(code)
        assert r.ok and r.stdout.endswith("still here\n"), (r.stdout, r.stderr)   # its supervisor survived it
        assert victim.poll() is None                        # the trainer too
    finally:
        victim.kill()
        victim.wait()


def test_cannot_raise_its_own_limits_or_leave_its_cgroup():
    code = ("import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n    print('RAISED')\n"
            "except (ValueError, OSError) as e:\n    print('refused')\n"
            "for path in ['/sys/fs/cgroup/pids/cgroup.procs', '/sys/fs/cgroup/unified/cgroup.procs']:\n    try:\n"
            "        open(path, 'w').write('0')\n        print('MOVED')\n    except OSError:\n        print('refused')\n"
            "x = bytearray(1 << 30)\nprint('allocated')\n")
    r = run_python(code, memory_mb=256)
    assert r.stdout == "refused\nrefused\nrefused\n" and r.memory_exceeded, (r.stdout, r.stderr)


def test_no_capabilities_no_new_privileges_and_an_unprivileged_user():
    r = run_python("import os\nst = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines())\n"
                   "print(st['CapEff'].strip(), st['CapPrm'].strip(), st['NoNewPrivs'].strip(), os.getuid())\n")
    cap_eff, cap_prm, nnp, uid = r.stdout.split()
    assert (cap_eff, cap_prm, nnp) == ("0000000000000000", "0000000000000000", "1") and int(uid) != 0


def _supervisor_pid(timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError):
                continue
            if ppid == os.getpid() and b"-I\0-S\0" in cmd:
                return int(p)
        time.sleep(0.02)
    raise AssertionError("no sandbox supervisor started")


@pytest.mark.parametrize("how", ["kill", "stop", "kill an assert test's"])
def test_a_dead_or_stopped_supervisor_fails_the_run_and_leaves_nothing(how, monkeypatch):
    monkeypatch.setattr(sandbox, "SUPERVISOR_GRACE_S", 1.0, raising=False)      # (the old code had none)
    tag = _tag()
    code = _named(tag) + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                          "print('started', flush=True)\ntime.sleep(60)\n")
    out, check = {}, {"check": "assert True"} if how.endswith("test's") else {}
    t = threading.Thread(target=lambda: out.update(r=run_python(code, timeout_s=3.0, **check)))
    t.start()
    supervisor = _supervisor_pid()
    deadline = time.monotonic() + 10
    while len(_alive(tag)) < 2 and time.monotonic() < deadline:           # the program and its daemon run
        time.sleep(0.02)
    assert len(_alive(tag)) == 2
    os.kill(supervisor, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
    t.join(timeout=30)
    r = out["r"]
    assert not r.ok and r.killed_reason == "supervisor" and r.passed is (False if check else None)
    assert _gone(tag)                                                      # nothing of the program survived
    if how != "stop":
        assert r.duration_s < 3.0                                          # known at once, not at the deadline


# ------------------------------------------------------------------------------------------- the rest
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


def test_opting_out_of_isolation_is_explicit(monkeypatch):
    r = run_python("import os\nprint(os.getuid() == os.geteuid(), os.path.basename(os.getcwd())[:15])",
                   isolation="none")
    assert r.ok and r.isolation == "none" and not r.network_isolated and r.stdout == "True rftkit-sandbox-\n"
    monkeypatch.setenv("RFTKIT_SANDBOX_ISOLATION", "none")
    assert run_python("print(1)").isolation == "none"
    monkeypatch.setenv("RFTKIT_SANDBOX_ISOLATION", "nope")
    with pytest.raises(ValueError, match=r"RFTKIT_SANDBOX_ISOLATION\) must be one of .* got 'nope'"):
        run_python("print(1)")


def test_refuses_clearly_when_namespaces_are_not_allowed(monkeypatch, tmp_path):
    """Where unshare is refused (a container's seccomp, a sysctl), the error says what to enable or how to opt out."""
    fake = tmp_path / "supervisor.py"
    fake.write_text("import marshal, os, sys\ncfg = marshal.loads(open(sys.argv[1], 'rb').read())\n"
                    "os.write(cfg['status_fd'], marshal.dumps({'error': 'the sandbox could not start: [Errno 1] "
                    "unshare(user, mount, pid, net, ipc, uts namespaces): Operation not permitted'}))\nsys.exit(125)\n")
    monkeypatch.setattr(sandbox, "_SUPERVISOR", str(fake))
    with pytest.raises(SandboxError, match=r"Operation not permitted; the sandbox needs Linux >= 5.12 with user "
                                           r"namespaces .* RFTKIT_SANDBOX_ISOLATION=none"):
        run_python("print(1)")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="max_procs must be >= 1"):
        run_python("pass", max_procs=0)
    with pytest.raises(ValueError, match=r"must be relative, got '../x.py'"):
        run_python("pass", files={"../x.py": ""})
    with pytest.raises(ValueError, match=r"assert test 'assert f\(' is not valid Python"):
        run_python("pass", check="assert f(")
    assert issubclass(SandboxError, RuntimeError)


def test_a_python_in_a_venv_under_tmp_runs_sandboxed_and_stays_read_only(tmp_path):
    # CI (and many users) run rftkit from a venv under /tmp, which the program's work tmpfs covers: the venv must
    # be bound back (read-only), or the program cannot even start
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    evil_code = f"open({str(venv / 'evil')!r}, 'w')"
    probe = ("from rftkit.sandbox import run_python\n"
             "ok = run_python('print(6 * 7)')\n"
             f"evil = run_python({evil_code!r})\n"
             "print(ok.returncode, ok.stdout.strip(), evil.returncode, 'Read-only file system' in evil.stderr)\n")
    root = Path(sandbox.__file__).resolve().parent.parent
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "42", "1", "True"]
    assert not (venv / "evil").exists()
