"""The sandbox supervisor: the small program rftkit.sandbox starts for each run, as
`python -I -S sandbox_supervisor.py CONFIG_JSON`, with the run's stdin/stdout/stderr files as its own. It is a
fresh single-threaded process (not preexec_fn, which may deadlock in a parent with threads) and imports only the
standard library. Threat model and guarantees: rftkit/sandbox.py and docs/security.md.

Processes, each the parent of the next:
  S  this program, in the caller's namespaces: a child subreaper; owns the wall clock, the pids cgroup (as root)
     and the final report (a marshal'd dict) on cfg["status_fd"].
  C  joins the cgroup, dies with S (PR_SET_PDEATHSIG), unshares the mount, PID, network, IPC and UTS namespaces
     (not root: first a user namespace of its own, its uid mapped to itself), then waits for P.
  P  PID 1 of the new PID namespace, dies with C: builds the program's filesystem view (everything read-only; a tmpfs of
     work_mb at /tmp, writable, holding the run's files; a fresh /proc; a minimal /dev; /run and the home folder
     hidden, the Python installation bound back), becomes nobody if root, forks Q, reaps, and for assert tests
     reads Q's check records and decides the verdict (see rftkit/sandbox_harness.py). When P exits, the kernel
     kills every process left in the namespace: nothing the program started can outlive it.
  Q  the program: (P was root) a user namespace of its own, nobody mapped to itself; rlimits, no_new_privs, every other
     fd closed, then exec python as a non-root uid of its user namespace, which leaves it no capabilities.
With isolation "none" (an explicit opt-out), C skips the namespaces and plays P itself.
"""
import ctypes
import marshal
import os
import resource
import select
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000        # mount_setattr(2), Linux >= 5.12
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
DEVICES = ("null", "zero", "full", "random", "urandom")
MAX_RECORDS = 1 << 20                                                # bytes of check records P keeps
libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {src} on {target}")


def mount_setattr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                       ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
          f"mount_setattr {path} (needs Linux >= 5.12)")


def die_with_parent(parent_alive_fd: int | None = None, parent_pid: int | None = None) -> None:
    """SIGKILL when our parent exits; exit now if it already did (the race between fork and prctl)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(124)
    if parent_alive_fd is not None and select.select([parent_alive_fd], [], [], 0)[0]:    # EOF: parent gone
        os._exit(124)


# ----------------------------------------------------------------------------------------------- C and P
def enter_namespaces(cfg: dict) -> None:
    """In C: new mount, PID, network, IPC and UTS namespaces. As root they belong to root (so P can build the
    view from folders only root may enter) and Q makes the user namespace; otherwise we make the user
    namespace first, mapping our uid to itself, and they belong to it."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if cfg["network"] else CLONE_NEWNET)
    if os.getuid() == 0:
        check(libc.unshare(ctypes.c_int(flags)), "unshare(mount, pid, net, ipc, uts namespaces)")
    else:
        check(libc.unshare(ctypes.c_int(CLONE_NEWUSER | flags)), "unshare(user, mount, pid, net, ipc, uts namespaces)")
        map_ids(cfg["uid"], cfg["gid"])


def drop_root(cfg: dict) -> None:
    """In P, as root, once the view is built: become nobody (P reads what the program sends; it need not be
    root for that). The program cannot signal it (PID 1 ignores the signals it has no handler for, SIGINT
    included) nor trace or read it (not dumpable)."""
    uid, gid = cfg["uid"], cfg["gid"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def own_user_namespace(cfg: dict) -> None:
    """In Q, forked from a P that was root: a user namespace of its own, nobody mapped to itself."""
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)                 # else /proc/self/uid_map stays root's
    check(libc.unshare(ctypes.c_int(CLONE_NEWUSER)), "unshare(user namespace)")
    map_ids(cfg["uid"], cfg["gid"])


def map_ids(uid: int, gid: int) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def build_view(cfg: dict) -> None:
    """In P (PID 1; root, or all capabilities of the new user namespace): the program's filesystem."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)             # nothing mounted here reaches the host
    keep = {p: os.open(p, os.O_PATH) for p in cfg["bind_back"]}
    devs = {n: os.open(f"/dev/{n}", os.O_PATH) for n in DEVICES}
    inputs = []                                             # the program and its files, before /tmp is covered
    for folder, _, names in os.walk(cfg["work"]):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                inputs.append((os.path.relpath(os.path.join(folder, name), cfg["work"]), f.read()))
    uid, gid = cfg["uid"], cfg["gid"]                      # a work folder of bounded size, in memory
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['work_mb']}m,mode=700,uid={uid},gid={gid}")
    for name, data in inputs:
        path = os.path.join("/tmp", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    for folder, dirs, names in os.walk("/tmp"):
        for name in dirs + names:
            os.chown(os.path.join(folder, name), uid, gid)
    for path, fd in keep.items():                           # a Python installation (a venv) inside /tmp: after
        if path.startswith("/tmp/"):                        # the chown walk, which must not reach its files
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    for hidden in cfg["hide"]:                              # an empty folder, the Python installation bound back
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for path, fd in keep.items():
            if path.startswith(hidden.rstrip("/") + "/"):
                os.makedirs(path, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, fd in devs.items():
        open(f"/dev/{name}", "w").close()
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(to, f"/dev/{name}")
    if os.path.isdir("/run"):                               # daemons' sockets (dbus, docker, systemd)
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)    # this PID namespace's processes only
    for fd in (*keep.values(), *devs.values()):
        os.close(fd)
    mount_setattr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)  # every mount read-only ...
    mount_setattr("/tmp", 0, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY)   # ... but the work folder
    mount_setattr("/proc", 0, 0, MOUNT_ATTR_RDONLY)        # and /proc (Q writes its uid map; files keep their modes)
    os.chdir("/tmp")


def exec_program(cfg: dict, rec_w: int | None, err_w: int) -> None:
    """In Q: limits, then python. Never returns. A failure before exec goes to err_w, which the exec closes, so
    the program cannot claim one (it would stop the training run)."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # isolation "none": dies with C
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        if cfg["isolation"] == "namespaces" and cfg["root"]:
            own_user_namespace(cfg)
        mem = cfg["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(cfg["timeout_s"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        fsize = cfg["max_file_mb"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_files"], cfg["max_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if cfg["nproc"] is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        low = 3
        for fd in sorted(x for x in (rec_w, err_w) if x is not None):   # the status and report pipes: gone
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        py = cfg["python"]
        if rec_w is None:
            argv = [py, "-E", "-S", "-c", cfg["run_main"], cfg["site"]]
        else:
            os.set_inheritable(rec_w, True)
            argv = [py, "-E", "-S", "-c", cfg["check"]["harness"], cfg["site"], str(rec_w), cfg["check"]["source"]]
        os.execve(py, argv, cfg["env"])
    except BaseException as e:
        os.write(err_w, f"setting up the program failed: {e!r}".encode())
    os._exit(125)


def run_program(cfg: dict) -> dict:
    """In P (or C without namespaces): fork Q, reap every child until Q exits, collect its check records."""
    rec_r = rec_w = None
    if cfg["check"] is not None:
        rec_r, rec_w = os.pipe()
    err_r, err_w = os.pipe()                                # close-on-exec: only Q's own setup writes it
    q = os.fork()
    if q == 0:
        exec_program(cfg, rec_w, err_w)
    os.close(err_w)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)                 # the program may not trace or read us
    records, truncated, rc = bytearray(), False, None
    if rec_w is not None:
        os.close(rec_w)
    pidfd = os.pidfd_open(q)
    watch = [pidfd] + ([rec_r] if rec_r is not None else [])
    while rc is None:
        ready = select.select(watch, [], [], 0.1)[0]     # 0.1: orphans' zombies hold pids
        if rec_r in ready:
            chunk = os.read(rec_r, 1 << 16)
            if not chunk:
                watch.remove(rec_r)
            elif len(records) < MAX_RECORDS:
                records += chunk
            else:
                truncated = True
        try:
            while True:                                     # as PID 1 we reap every orphan of the program
                pid, st = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if pid == q:
                    rc = os.waitstatus_to_exitcode(st)
        except ChildProcessError:
            pass
    if rec_r is not None:                                   # what Q wrote before it exited
        os.set_blocking(rec_r, False)
        try:
            while len(records) < MAX_RECORDS and (chunk := os.read(rec_r, 1 << 16)):
                records += chunk
        except BlockingIOError:
            pass
    with os.fdopen(err_r, "rb") as f:
        err = f.read(4096).decode(errors="replace")
    if err:
        return {"error": err}
    report = {"returncode": rc}
    if cfg["check"] is not None:
        report.update(verdict(cfg["check"]["sites"], bytes(records), rc, truncated))
    return report


# ------------------------------------------------------------------------- the assert-test verdict (in P)
OPS = {"Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Lt": lambda a, b: a < b,
       "LtE": lambda a, b: a <= b, "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b,
       "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b, "Is": lambda a, b: a is b,
       "IsNot": lambda a, b: a is not b}
_SEQ = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode(x, depth: int = 0):
    """A value from sandbox_harness's tagged JSON: builtin types only, so == on it runs no program code."""
    if x is None or x is True or x is False:
        return x
    if depth > 64 or type(x) is not list or not x or type(x[0]) is not str:
        raise ValueError(f"not an encoded value: {str(x)[:80]}")
    tag, *rest = x
    if tag in ("i", "f", "s", "b") and (len(rest) != 1 or type(rest[0]) is not str):
        raise ValueError(f"bad {tag!r} value")
    if tag == "i":
        return int(rest[0])
    if tag == "f":
        return float.fromhex(rest[0])
    if tag == "c":
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s":
        return rest[0]
    if tag == "b":
        return bytes.fromhex(rest[0])
    if tag in _SEQ and type(rest[0]) is list:
        return _SEQ[tag](decode(v, depth + 1) for v in rest[0])
    if tag == "d" and type(rest[0]) is list:
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in rest[0]}
    raise ValueError(f"unknown tag {tag!r}")


def verdict(sites: list, records: bytes, rc: int, truncated: bool) -> dict:
    """Pass when Q exited 0 after the test's last line, every assert site ran, and every value it sent meets
    its site: `op(value, expected)` for `assert EXPR op LITERAL` (the literal never left this process), else
    the truth of the plain value Q computed."""
    import json                                                 # only here: its import costs a start-up's worth
    if truncated:
        return {"passed": False, "check_detail": f"more than {MAX_RECORDS} bytes of check records"}
    seen, bad, ended = set(), [], False
    for line in records.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)                              # (safe on any bytes)
            if rec == "end":
                ended = True
                continue
            k, enc = rec
            if type(k) is not int or not 0 <= k < len(sites):
                raise ValueError(f"site {k!r}")
            op, want = sites[k]
            got = decode(enc)
            ok = (bool(got) if op == "truth" else OPS[op](got, decode(want))) is True
        except Exception as e:                                 # the program wrote junk into the channel
            bad.append(f"malformed check record ({type(e).__name__}: {e})"[:300])
            continue
        seen.add(k)
        if not ok:
            bad.append(f"assert #{k + 1} failed: got {repr(got)[:200]}")
    missing = [k + 1 for k in range(len(sites)) if k not in seen]
    passed = rc == 0 and ended and not bad and not missing
    detail = ("" if passed else bad[0] if bad else f"exit status {rc}" if rc != 0
              else f"assert #{missing[0]} never ran" if missing else "the test did not run to its end")
    return {"passed": passed, "check_detail": detail}


# --------------------------------------------------------------------------------------------------- S
def make_cgroup(cfg: dict, limit: int) -> str | None:
    for base in cfg["cgroup_bases"]:
        path = os.path.join(base, f"rftkit-sandbox-{os.getpid()}")
        try:
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(limit))
            return path
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


def main() -> None:
    with open(sys.argv[1], "rb") as f:                      # (marshal, not json: json's import is 8 ms CPU)
        cfg = marshal.loads(f.read())
    status = {"network_isolated": False, "process_limit": "none", "timed_out": False, "peak_procs": None,
              "isolation": cfg["isolation"]}
    isolated = cfg["isolation"] == "namespaces"
    helpers = 2 if isolated else 1                          # C (and P) count against the pids cgroup
    root = cfg["root"] = os.getuid() == 0
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    cg = None
    cfg["nproc"] = None
    if cfg["max_procs"] is not None and root:
        cg = make_cgroup(cfg, cfg["max_procs"] + helpers)
    if cg:
        status["process_limit"] = "cgroup"
    elif cfg["max_procs"] is not None and (isolated or not root):
        # a fresh user namespace counts only its own processes (C and P too, unless they are root); without
        # one, all of the user's processes count
        others = (0 if root else 2) if isolated else sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
        cfg["nproc"] = others + cfg["max_procs"]
        status["process_limit"] = "rlimit"
    elif cfg["max_procs"] is not None:
        fail(cfg, "no way to bound the number of processes here (root without a writable pids cgroup and "
                  "without namespaces); pass max_procs=None to run without a bound")
    rep_r, rep_w = os.pipe()                                # P's (or C's) report to us
    me = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    child = os.fork()
    if child == 0:
        os.close(rep_r)
        os.close(cfg["status_fd"])
        try:
            die_with_parent(parent_pid=me)
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            if cg:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            if not isolated:
                report = run_program(cfg)
            else:
                enter_namespaces(cfg)
                alive_r, alive_w = os.pipe()                # P's way to know C is still there
                p = os.fork()
                if p == 0:
                    os.close(alive_w)
                    die_with_parent(parent_alive_fd=alive_r)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)   # PID 1 would take the program's SIGINT
                    build_view(cfg)
                    if root:
                        drop_root(cfg)
                    report = run_program(cfg)
                else:
                    os.close(rep_w)
                    _, st = os.waitpid(p, 0)
                    os._exit(0 if os.waitstatus_to_exitcode(st) == 0 else 124)
            os.write(rep_w, marshal.dumps(report))
            os._exit(0)
        except BaseException as e:
            os.write(rep_w, marshal.dumps({"error": f"the sandbox could not start: {e}"}))
            os._exit(125)
    os.close(rep_w)
    deadline = time.monotonic() + cfg["timeout_s"]
    done, killed = False, False
    while True:
        try:
            while True:                                     # reap everything that has exited
                pid, st = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                done |= pid == child
        except ChildProcessError:
            break                                           # nothing left: done
        if done or killed:
            kill_all(child, cg)                             # the program is done: nothing may outlive it
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            status["timed_out"] = killed = True
            kill_all(child, cg)
            continue
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))
    with os.fdopen(rep_r, "rb") as f:
        raw = f.read()
    report = marshal.loads(raw) if raw else {}
    status.update(report)
    status.setdefault("returncode", -signal.SIGKILL)        # killed before P reported (the deadline)
    if cfg["check"] is not None and "passed" not in status:
        status.update(passed=False, check_detail="the run was killed before the test finished")
    status["network_isolated"] = isolated and not cfg["network"]
    status["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if cg:
        try:
            with open(os.path.join(cg, "pids.peak")) as f:
                status["peak_procs"] = max(0, int(f.read()) - helpers)
        except (OSError, ValueError):
            pass
        for _ in range(100):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.01)
    if "error" in status:
        fail(cfg, status["error"])
    os.write(cfg["status_fd"], marshal.dumps(status))


def _owned(pid: str) -> bool:
    try:
        return os.stat("/proc/" + pid).st_uid == os.getuid()
    except OSError:
        return False


def fail(cfg: dict, message: str) -> None:
    os.write(cfg["status_fd"], marshal.dumps({"error": message}))
    sys.exit(125)


def kill_all(child: int, cg: str | None) -> None:
    """SIGKILL C's process group (C, P, Q and what kept the group), the cgroup's members and our adopted
    orphans. Inside the namespaces P's death alone takes everything with it; this is for isolation "none"."""
    try:
        os.killpg(child, signal.SIGKILL)
    except OSError:
        pass
    if cg:
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                for p in f.read().split():
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
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        os.kill(int(p), signal.SIGKILL)
            except (OSError, IndexError):
                pass


if __name__ == "__main__":
    main()
