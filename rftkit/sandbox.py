"""Sandbox: run untrusted Python (a model's completion) in a subprocess with time, memory, process and file
limits, a fresh temp dir, a scrubbed environment and, where the OS allows, no network.

    result = run_python("print(2 + 2)", timeout_s=5, memory_mb=512)   # SandboxResult(returncode=0, stdout="4\n", ...)

How (Linux). The parent starts a small *supervisor* (`python -I -S`, in its own session) instead of using
`preexec_fn`: preexec_fn runs Python between fork and exec and may deadlock when the parent has threads, and
rewards run in a thread pool. The supervisor, a fresh single-threaded process, does the privileged work:
  - makes itself a child subreaper, so every orphan of the program comes back to it and is reaped (PID 1 of
    a container often reaps nothing: a killed fork bomb would otherwise leave zombies that hold PIDs);
  - `unshare(CLONE_NEWNET)` (root) or `unshare(CLONE_NEWUSER | CLONE_NEWNET)` (unprivileged, where user
    namespaces are allowed): the program sees only a loopback device that is down. Where neither works the
    run goes on and `network_isolated` is False;
  - bounds the number of processes: root is exempt from RLIMIT_NPROC, so as root a `pids` cgroup (v1 or v2)
    with pids.max = max_procs; as another user RLIMIT_NPROC = the user's current processes + max_procs.
    Where no bound is possible, run_python refuses (pass max_procs=None to run without one);
  - forks the program (its own process group) with RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE and
    RLIMIT_CORE=0, then `python -E -s main.py` in the temp dir (not -I, whose -P hides the files beside it);
  - enforces the wall clock: on expiry, or as soon as the program exits, it kills what is left (the cgroup's
    members, the process group, its own adopted children) and reaps everything before it exits.
stdout/stderr go to files (RLIMIT_FSIZE bounds them; the parent reads at most max_output_bytes), so a
program printing forever cannot fill the parent's memory. At most os.cpu_count() programs run at once (callers
in other threads wait for a turn; the wall clock starts with the turn): CPU-bound programs gain nothing
beyond that, and it bounds the memory of all runs together by cores x max_procs x memory_mb.

Not a security boundary against a determined attacker (same kernel, same filesystem view: world-readable
files stay readable and /tmp writable); it bounds what a model's buggy or reward-hacking code can cost.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

_MiB = 1 << 20
_turns = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


@dataclass
class SandboxResult:
    returncode: int                      # the program's exit status; negative = killed by that signal
    stdout: str
    stderr: str
    timed_out: bool                      # killed at the wall-clock limit
    memory_exceeded: bool                # hit the address-space limit (MemoryError / failed allocation)
    killed_reason: str | None            # "timeout", "cpu time", "memory", "file size", "signal SIGSEGV"... or None
    network_isolated: bool = False       # the program ran in a network namespace of its own
    process_limit: str = "none"          # how processes were bounded: "cgroup", "rlimit" or "none"
    peak_procs: int | None = None        # most tasks (processes + threads) alive at once, where the cgroup says
    peak_rss_mb: float = 0.0             # largest resident set of any one process of the program
    duration_s: float = 0.0              # wall time of the run
    output_truncated: bool = False       # stdout or stderr was longer than max_output_bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the program failing: that is a SandboxResult)."""


# The supervisor: argv[1] is a JSON config. Writes one JSON status line to cfg["status_fd"] before it exits.
_SUPERVISOR = r'''
import ctypes, json, os, resource, signal, sys, time
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
status = {"network_isolated": False, "process_limit": "none", "timed_out": False, "peak_procs": None}
libc.prctl(36, 1, 0, 0, 0)                                  # PR_SET_CHILD_SUBREAPER
uid, gid = os.getuid(), os.getgid()
if cfg["network"] is False:
    if libc.unshare(0x40000000) == 0:                       # CLONE_NEWNET
        status["network_isolated"] = True
    elif uid != 0 and libc.unshare(0x10000000 | 0x40000000) == 0:   # CLONE_NEWUSER | CLONE_NEWNET
        try:
            open("/proc/self/setgroups", "w").write("deny")
            open("/proc/self/uid_map", "w").write(f"{uid} {uid} 1")
            open("/proc/self/gid_map", "w").write(f"{gid} {gid} 1")
            status["network_isolated"] = True
        except OSError:
            pass
cg = None
if cfg["max_procs"] is not None and uid == 0:
    for base in cfg["cgroup_bases"]:
        path = os.path.join(base, f"rftkit-sandbox-{os.getpid()}")
        try:
            os.mkdir(path)
            open(os.path.join(path, "pids.max"), "w").write(str(cfg["max_procs"]))
            cg = path
            status["process_limit"] = "cgroup"
            break
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
elif cfg["max_procs"] is not None:
    n = 0
    for p in os.listdir("/proc"):
        try:
            n += p.isdigit() and os.stat("/proc/" + p).st_uid == uid
        except OSError:
            pass
    status["process_limit"] = "rlimit"
    nproc = n + cfg["max_procs"]
if cfg["max_procs"] is not None and status["process_limit"] == "none":
    os.write(cfg["status_fd"], (json.dumps({"error": "no way to bound the number of processes here (root without a "
                             "writable pids cgroup); pass max_procs=None to run without a bound"}) + "\n").encode())
    sys.exit(125)

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
child = os.fork()
if child == 0:
    try:
        os.close(cfg["status_fd"])
        os.setpgid(0, 0)
        if cg:
            open(os.path.join(cg, "cgroup.procs"), "w").write(str(os.getpid()))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        mem = cfg["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(cfg["timeout_s"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        fsize = cfg["max_file_mb"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_files"], cfg["max_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if status["process_limit"] == "rlimit":
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.execv(cfg["python"], [cfg["python"], "-E", "-s", "main.py"])   # not -I: its -P would hide files
    except BaseException as e:
        os.write(2, f"sandbox: setting up the program failed: {e!r}\n".encode())
    os._exit(125)


def kill_all():
    try:
        os.killpg(child, signal.SIGKILL)
    except OSError:
        pass
    if cg:
        try:
            for p in open(os.path.join(cg, "cgroup.procs")).read().split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass
        except OSError:
            pass
    me = str(os.getpid())
    for p in os.listdir("/proc"):                           # adopted orphans that left the process group
        if p.isdigit():
            try:
                if open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == me:
                    os.kill(int(p), signal.SIGKILL)
            except (OSError, IndexError):
                pass


deadline = time.monotonic() + cfg["timeout_s"]
returncode, killed = None, False
while True:
    try:
        while True:                                         # reap everything that has exited
            pid, st = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid == child:
                returncode = os.waitstatus_to_exitcode(st)
    except ChildProcessError:
        break                                               # nothing left: done
    if returncode is not None or killed:
        kill_all()                                          # the program is done: nothing may outlive it
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        continue
    left = deadline - time.monotonic()
    if left <= 0:
        status["timed_out"] = killed = True
        kill_all()
        continue
    signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))
status["returncode"] = returncode
status["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # largest reaped process
if cg:
    try:
        status["peak_procs"] = int(open(os.path.join(cg, "pids.peak")).read())
    except (OSError, ValueError):
        pass
    for _ in range(100):
        try:
            os.rmdir(cg)
            break
        except OSError:
            time.sleep(0.01)
os.write(cfg["status_fd"], (json.dumps(status) + "\n").encode())
'''


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


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int | None = 16,
               stdin: str | None = None, files: dict[str, str] | None = None, network: bool = False,
               max_file_mb: int = 16, max_files: int = 64, max_output_bytes: int = _MiB) -> SandboxResult:
    """Run `code` as `python -E -s main.py` in a fresh temp dir under the limits above.

    max_procs counts tasks (processes and threads, the program included); files are extra files written into
    the temp dir first; network=True leaves the network alone. Raises SandboxError only when the sandbox
    itself cannot run; everything the program does (exit codes, timeouts, MemoryError) is in the result."""
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError(f"timeout_s must be > 0 and memory_mb >= 32, got {timeout_s}, {memory_mb}")
    if max_procs is not None and max_procs < 1:
        raise ValueError(f"max_procs must be >= 1 (the program itself counts) or None, got {max_procs}")
    work = tempfile.mkdtemp(prefix="rftkit-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="rftkit-sandbox-io-")         # outside the program's cwd
    try:
        for name, text in {**(files or {}), "main.py": code}.items():
            if os.path.isabs(name) or ".." in name.split("/"):
                raise ValueError(f"sandbox file names must be relative, got {name!r}")
            os.makedirs(os.path.dirname(os.path.join(work, name)) or work, exist_ok=True)
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        paths = {k: os.path.join(io_dir, k) for k in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w") as f:
            f.write(stdin or "")
        status_r, status_w = os.pipe()                               # the supervisor's one-line report
        cfg = {"status_fd": status_w, "python": sys.executable, "timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
               "max_procs": max_procs, "network": network, "max_file_mb": int(max_file_mb),
               "max_files": int(max_files), "cgroup_bases": _cgroup_bases()}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        with _turns:
            t0 = time.perf_counter()
            with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                    open(paths["stderr"], "wb") as ferr:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(cfg)],
                                        stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env,
                                        start_new_session=True, pass_fds=(status_w,))
            os.close(status_w)
            try:
                proc.wait(timeout=timeout_s + 10)                    # the supervisor enforces timeout_s itself
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _kill_cgroup(cfg["cgroup_bases"], proc.pid)
                raise SandboxError(f"the sandbox supervisor did not finish {timeout_s + 10:.0f} s into a "
                                   f"{timeout_s} s run; killed") from None
            finally:
                with os.fdopen(status_r, "rb") as f:
                    raw = f.read().decode(errors="replace")
            duration = time.perf_counter() - t0
        stdout, cut_out = _read(paths["stdout"], max_output_bytes)
        stderr, cut_err = _read(paths["stderr"], max_output_bytes)
        try:
            status = json.loads(raw.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise SandboxError(f"the sandbox supervisor failed (exit {proc.returncode}): {stderr[-2000:]}") from None
        if "error" in status:
            raise SandboxError(status["error"])
        rc = status["returncode"]
        if rc == 125 and "sandbox: setting up the program failed" in stderr:
            raise SandboxError(stderr.strip()[-2000:])
        return _result(rc, stdout, stderr, status, duration, cut_out or cut_err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def _result(rc: int, stdout: str, stderr: str, status: dict, duration: float, truncated: bool) -> SandboxResult:
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
    elif rc < 0:
        reason = f"signal {signal.Signals(-rc).name}"
    else:
        reason = None
    return SandboxResult(returncode=rc, stdout=stdout, stderr=stderr, timed_out=status["timed_out"],
                         memory_exceeded=memory, killed_reason=reason,
                         network_isolated=status["network_isolated"], process_limit=status["process_limit"],
                         peak_procs=status["peak_procs"], peak_rss_mb=status["peak_rss_mb"], duration_s=duration,
                         output_truncated=truncated)
