"""Sandbox: run untrusted Python (a model's completion) as an isolated process with time, memory, process and
file limits, and, for assert tests, a verdict the program cannot write.

    result = run_python("print(2 + 2)", timeout_s=5, memory_mb=512)   # SandboxResult(returncode=0, stdout="4\n", ...)
    result = run_python(code, check="assert add(2, 3) == 5")          # result.passed: True / False

Threat model. The program is hostile: a policy under RL searches for whatever raises its reward, and a model's
code may be anything. It must not (1) read secrets of the trainer (its environment, its files, other processes),
(2) change anything outside its run (the user's files, the rftkit cache, the compiled kernel library the next
rftkit process loads), (3) reach the network, (4) signal, trace or outlive the trainer and its supervisor,
(5) exhaust the machine (CPU, memory, processes, disk, output), (6) pass a test it did not pass. Everything that
runs as the trainer (the reward function itself, its Python) is trusted; so is the kernel.

How (Linux; rftkit/sandbox_supervisor.py has the details). A fresh supervisor process per run; the program runs:
  - in its own user namespace, as an unprivileged uid (as root: nobody, uid 65534) with no capabilities and
    no_new_privs: it can change nothing it could not change as that user, and setuid files give it nothing;
  - in its own PID namespace with a fresh /proc: it sees only its own processes (no /proc/<pid>/environ of the
    trainer, no pid to signal), and the namespace's PID 1 is the supervisor's child, so when that exits, or the
    supervisor dies (PR_SET_PDEATHSIG), the kernel kills every process the program started;
  - in its own mount namespace where every mount is read-only except its work folder, a tmpfs of work_mb at
    /tmp (cwd, HOME and TMPDIR) holding the run's files; /dev holds only null, zero, full, random and urandom (no
    disks, no GPUs); /run and the home folder are hidden (the Python installation, if it lives there, is bound
    back read-only);
  - in its own network namespace (only a loopback device, down), IPC and UTS namespaces;
  - under RLIMIT_AS (memory), RLIMIT_CPU and a wall clock (time), a pids cgroup as root or RLIMIT_NPROC in its
    user namespace (processes and threads), RLIMIT_FSIZE, RLIMIT_NOFILE and work_mb (files), output read up to
    max_output_bytes. At most os.cpu_count() programs run at once (callers in other threads wait their turn,
    the wall clock starts with the turn): that bounds the memory of all runs together by
    cores x (max_procs x memory_mb + work_mb).
A supervisor that is killed, or stopped past the deadline plus SUPERVISOR_GRACE_S, gives a failed result
(killed_reason "supervisor"), and nothing of the program survives it. Assert tests: rftkit/sandbox_harness.py.

What it does not promise: the kernel is shared (a kernel exploit escapes; seccomp is not used); world-readable
files outside the hidden folders stay readable (no network to send them anywhere, but they can be printed);
unix sockets outside /run and /tmp that its user may open stay reachable; the program can use its limits of
CPU time, memory and work folder; a trainer killed with SIGKILL leaves each supervisor to finish its run at the
deadline. Needs Linux >= 5.12 with user namespaces; where they are not allowed, run_python refuses with a
SandboxError that says what to enable. isolation="none" (or RFTKIT_SANDBOX_ISOLATION=none) is the explicit
opt-out: the same limits (but work_mb) and harness, no namespaces, and the program can read and write what the
trainer's user can.
"""
from __future__ import annotations

import marshal
import os
import pwd
import site
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rftkit.sandbox_harness import RUN_MAIN, compile_check

_MiB = 1 << 20
_turns = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_supervisor.py")
SUPERVISOR_GRACE_S = 10.0          # past the deadline, a supervisor that has not reported is killed
ISOLATIONS = ("namespaces", "none")


@dataclass
class SandboxResult:
    returncode: int                      # the program's exit status; negative = killed by that signal
    stdout: str
    stderr: str
    timed_out: bool                      # killed at the wall-clock limit
    memory_exceeded: bool                # hit the address-space limit (MemoryError / failed allocation)
    killed_reason: str | None            # "timeout", "cpu time", "memory", "file size", "disk", "signal SIGSEGV",
                                         # "supervisor" (the supervisor died or hung) ... or None
    network_isolated: bool = False       # the program ran in a network namespace of its own
    process_limit: str = "none"          # how processes were bounded: "cgroup", "rlimit" or "none"
    peak_procs: int | None = None        # most tasks (processes + threads) alive at once, where the cgroup says
    peak_rss_mb: float = 0.0             # largest resident set of any one process of the run
    duration_s: float = 0.0              # wall time of the run
    output_truncated: bool = False       # stdout or stderr was longer than max_output_bytes
    isolation: str = "namespaces"        # "namespaces" or "none" (the explicit opt-out)
    passed: bool | None = None           # with check=: the harness's verdict (None without a check)
    check_detail: str = ""               # with check=: why it failed ("assert #2 failed: got 4", ...)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the program failing: that is a SandboxResult)."""


def _cgroup_bases() -> list[str]:
    """Where a pids cgroup may be created for our process: cgroup v1's pids hierarchy, or v2's unified one."""
    bases = []
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return bases
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            bases.append("/sys/fs/cgroup/pids" + path)
        elif controllers == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                try:
                    if "pids" in open(os.path.join(root + path, "cgroup.subtree_control")).read().split():
                        bases.append(root + path)
                except OSError:
                    pass
    return [b.rstrip("/") for b in bases]


def _kill_cgroup(bases: list[str], supervisor_pid: int) -> None:
    """Last resort when the supervisor itself hung: kill what its pids cgroup still holds."""
    for base in bases:
        try:
            for p in open(os.path.join(base, f"rftkit-sandbox-{supervisor_pid}", "cgroup.procs")).read().split():
                os.kill(int(p), signal.SIGKILL)
        except OSError:
            pass


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _sandbox_ids() -> tuple[int, int]:
    """The uid/gid the program runs as, outside its namespace: ours, or nobody's when we are root."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _view_paths(uid: int) -> tuple[list[str], list[str]]:
    """Folders to hide behind an empty tmpfs (the home folder and, when the program runs as another user, the
    first folder on the way to the Python installation it could not enter) and the Python installation's
    folders inside them or inside /tmp (which the work folder covers), bound back read-only."""
    python = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                            os.path.dirname(os.path.realpath(sys.executable)))}
    hide = set()
    home = os.path.realpath(os.path.expanduser("~"))
    if home != "/" and os.path.isdir(home):
        hide.add(home)
    if uid != os.getuid():
        for p in python:
            parts = p.split("/")
            for i in range(2, len(parts) + 1):
                folder = "/".join(parts[:i])
                if not os.stat(folder).st_mode & stat.S_IXOTH:
                    hide.add(folder)
                    break
    under = lambda p, roots: any(p.startswith(r + "/") for r in roots)
    mounted = ("/tmp", "/dev", "/proc", "/run")                      # the view mounts its own there
    hide = {h for h in hide if h not in python and not under(h, hide) and h not in mounted
            and not under(h, mounted) and not any(under(m, [h]) for m in mounted)}
    bind = {p for p in python if under(p, hide) or under(p, ["/tmp"])}     # a venv in /tmp: under the work tmpfs
    return sorted(hide), sorted(p for p in bind if not under(p, bind))


def _kill_cgroup(bases: list[str], supervisor_pid: int) -> None:
    """After the supervisor died: kill what its pids cgroup still holds, then remove the cgroup."""
    for base in bases:
        path = os.path.join(base, f"rftkit-sandbox-{supervisor_pid}")
        if not os.path.isdir(path):
            continue
        for _ in range(200):
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for p in f.read().split():
                        os.kill(int(p), signal.SIGKILL)
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.01)


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int | None = 16,
               stdin: str | None = None, files: dict[str, str] | None = None, network: bool = False,
               max_file_mb: int = 16, max_files: int = 64, max_output_bytes: int = _MiB, work_mb: int = 64,
               check: str | None = None, isolation: str | None = None) -> SandboxResult:
    """Run `code` as `python -E -s main.py` in a fresh work folder under the limits and isolation above.

    max_procs counts tasks (processes and threads, the program included); files are extra files written into the work
    folder first; network=True leaves the network alone; work_mb bounds the work folder (a tmpfs, so the machine's
    memory, outside memory_mb; unbounded with isolation "none"). check: an assert test run after the program
    (rftkit/sandbox_harness.py), its verdict in result.passed. isolation: "namespaces" (the default) or "none"
    (explicit opt-out; the default comes from $RFTKIT_SANDBOX_ISOLATION when set). Raises SandboxError only when
    the sandbox itself cannot run; everything the program does (exit codes, timeouts, MemoryError, a dead
    supervisor) is in the result."""
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError(f"timeout_s must be > 0 and memory_mb >= 32, got {timeout_s}, {memory_mb}")
    if max_procs is not None and max_procs < 1:
        raise ValueError(f"max_procs must be >= 1 (the program itself counts) or None, got {max_procs}")
    if work_mb < 1:
        raise ValueError(f"work_mb must be >= 1, got {work_mb}")
    isolation = isolation or os.environ.get("RFTKIT_SANDBOX_ISOLATION") or "namespaces"
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation (or $RFTKIT_SANDBOX_ISOLATION) must be one of {ISOLATIONS}, got {isolation!r}")
    spec = compile_check(check) if check is not None else None
    inside = isolation == "namespaces"
    uid, gid = _sandbox_ids() if inside else (os.getuid(), os.getgid())
    work = tempfile.mkdtemp(prefix="rftkit-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="rftkit-sandbox-io-")         # outside the program's view
    try:
        for name, text in {**(files or {}), "main.py": code}.items():
            if os.path.isabs(name) or ".." in name.split("/"):
                raise ValueError(f"sandbox file names must be relative, got {name!r}")
            os.makedirs(os.path.dirname(os.path.join(work, name)) or work, exist_ok=True)
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        paths = {k: os.path.join(io_dir, k) for k in ("stdin", "stdout", "stderr", "cfg")}
        with open(paths["stdin"], "w") as f:
            f.write(stdin or "")
        home = "/tmp" if inside else work
        hide, bind_back = _view_paths(uid) if inside else ([], [])
        status_r, status_w = os.pipe()                               # the supervisor's report
        cfg = {"status_fd": status_w, "python": sys.executable, "timeout_s": float(timeout_s),
               "memory_mb": int(memory_mb), "max_procs": max_procs, "network": network,
               "max_file_mb": int(max_file_mb), "max_files": int(max_files), "work_mb": int(work_mb),
               "cgroup_bases": _cgroup_bases(), "run_main": RUN_MAIN, "site": ":".join(site.getsitepackages()),
               "isolation": isolation, "uid": uid, "gid": gid, "work": work, "hide": hide, "bind_back": bind_back,
               "check": spec, "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
                                      "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
                                      "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
        with open(paths["cfg"], "wb") as f:
            f.write(marshal.dumps(cfg))
        with _turns:
            t0 = time.perf_counter()
            with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                    open(paths["stderr"], "wb") as ferr:
                proc = subprocess.Popen([sys.executable, "-I", "-S", _SUPERVISOR, paths["cfg"]],
                                        stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                        env={"PATH": cfg["env"]["PATH"], "LANG": "C.UTF-8"},
                                        start_new_session=True, pass_fds=(status_w,))
            os.close(status_w)
            hung = False
            try:
                proc.wait(timeout=timeout_s + SUPERVISOR_GRACE_S)   # the supervisor enforces timeout_s itself
            except subprocess.TimeoutExpired:                        # stopped or hung: it and its run die
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            finally:
                with os.fdopen(status_r, "rb") as f:
                    raw = f.read()
            duration = time.perf_counter() - t0
        stdout, cut_out = _read(paths["stdout"], max_output_bytes)
        stderr, cut_err = _read(paths["stderr"], max_output_bytes)
        if hung or proc.returncode < 0:                              # killed from outside, or by us just now
            _kill_cgroup(cfg["cgroup_bases"], proc.pid)
            return SandboxResult(returncode=-signal.SIGKILL, stdout=stdout, stderr=stderr, timed_out=hung,
                                 memory_exceeded=False, killed_reason="supervisor", duration_s=duration,
                                 isolation=isolation, passed=None if spec is None else False,
                                 check_detail="" if spec is None else "the sandbox supervisor died")
        try:
            status = marshal.loads(raw)
        except (EOFError, ValueError, TypeError):
            raise SandboxError(f"the sandbox supervisor failed (exit {proc.returncode}): {stderr[-2000:]}") from None
        if "error" in status:
            namespaces = any(w in status["error"] for w in ("unshare", "uid_map", "mount", "setgroups"))
            hint = ("" if not namespaces else "; the sandbox needs Linux >= 5.12 with user namespaces (sysctl "
                    "user.max_user_namespaces > 0; on Debian kernel.unprivileged_userns_clone=1; on Ubuntu >= 23.10 "
                    "kernel.apparmor_restrict_unprivileged_userns=0; in Docker --security-opt seccomp=unconfined). "
                    "To run without isolation, accepting that the program can read and write what this user can, "
                    "pass isolation='none' or set RFTKIT_SANDBOX_ISOLATION=none")
            raise SandboxError(status["error"] + hint)
        return _result(stdout, stderr, status, duration, cut_out or cut_err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def _result(stdout: str, stderr: str, status: dict, duration: float, truncated: bool) -> SandboxResult:
    rc = status["returncode"]
    tail = stderr[-2000:]
    memory = "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail
    if status["timed_out"]:
        reason = "timeout"
    elif rc == -signal.SIGXCPU:
        reason = "cpu time"
    elif memory:
        reason = "memory"
    elif rc == -signal.SIGXFSZ or "File too large" in tail:
        reason = "file size"
    elif "No space left on device" in tail:
        reason = "disk"
    elif rc < 0:
        reason = f"signal {signal.Signals(-rc).name}"
    else:
        reason = None
    return SandboxResult(returncode=rc, stdout=stdout, stderr=stderr, timed_out=status["timed_out"],
                         memory_exceeded=memory, killed_reason=reason,
                         network_isolated=status["network_isolated"], process_limit=status["process_limit"],
                         peak_procs=status["peak_procs"], peak_rss_mb=status["peak_rss_mb"], duration_s=duration,
                         output_truncated=truncated, isolation=status["isolation"],
                         passed=status.get("passed"), check_detail=status.get("check_detail", ""))
