"""The sandbox an agent-chosen process runs in: bubblewrap (`bwrap`), out of keyturn's reach.

`Sandbox(...).argv(command, cwd=..., writable=..., read_only=...)` returns the argv to spawn instead of `command`.
The process it starts sees:

- its own PID namespace with a fresh `/proc` (keyturn's processes, their `environ` and `fd/` do not exist there;
  signals cannot reach them), a minimal `/dev`, a private tmpfs `/tmp`, its own IPC, UTS and cgroup namespaces, a
  user namespace where the kernel allows one, and no capabilities at all (`--cap-drop ALL`: even when keyturn runs
  as root, the process cannot unmount a mask or remount a read-only mount);
- its own, empty network namespace (no interface but a loopback of its own), unless `network=True`: then it shares
  the host's network, loopback included, and can reach whatever listens there. keyturn's reviewer API on loopback
  then answers it, but every vote needs a reviewer's token, which lives where the sandbox cannot read it;
- the system read-only (`/usr`, `/bin`, `/sbin`, `/lib*`, `/etc`, those that exist; top-level symlinks such as
  `/bin -> usr/bin` are recreated as symlinks), `ro_paths` read-only, the `read_only` paths read-only and the
  `writable` paths writable, each at its own path. Nothing else of the host exists in it: a `..` out of a root
  leads to an empty directory made by bwrap, not to the host's;
- `hidden()` (keyturn's state, asked again at every `argv()`) masked wherever it lies under a mount: a file by
  `/dev/null` bound over it, a directory by an empty read-only tmpfs. Nothing is created on the host for a mask:
  only paths that exist are masked.

It dies with its parent (`--die-with-parent`) and runs in a new session (`--new-session`: no TIOCSTI into a
terminal). When its first process exits, the PID namespace ends and the kernel kills whatever it left behind.

`Limits` are applied with util-linux `prlimit` around bwrap, so they hold for every process in the sandbox:
CPU seconds and address space per process. The number of processes (RLIMIT_NPROC) is set but the kernel does not
enforce it for the host's root (uid 0 is exempt even without capabilities; measured with bwrap 0.8 on Linux 6.18:
as root, ten background processes under a limit of five all start; as an ordinary user the ones past five fail with
EAGAIN). So when keyturn runs as root, only the run's timeout (which ends the whole PID namespace) and the host's own
`pids` cgroup bound a fork bomb; run keyturn as an ordinary user for the limit to hold (it then counts every process
of that user, keyturn's own included).

The system's own files stay readable where their modes allow: a root keyturn's sandbox runs as uid 0 (without
capabilities), so `/etc/shadow` is readable to it. Masks cover keyturn's state only.

`check_available()` starts a real sandbox and checks it: its PID (and, without `network`, network) namespace is
not keyturn's, and no capability is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ConfigError

__all__ = ["SYSTEM_PATHS", "Limits", "Sandbox", "SandboxUnavailable", "sandbox_failure"]

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_VIRTUAL = (Path("/proc"), Path("/dev"))
_CHECK_TIMEOUT_S = 20.0
_FIX = "install bubblewrap (`apt-get install bubblewrap`; it needs Linux), or opt out with the option `sandbox: off`"


class SandboxUnavailable(ConfigError):
    """A sandbox cannot be created here; the message names the fix."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for every process in the sandbox (`None`: no limit)."""

    cpu_seconds: int | None = None
    memory_bytes: int | None = None  # address space (RLIMIT_AS) of each process
    processes: int | None = None  # RLIMIT_NPROC: not enforced for the host's root, see the module docstring

    def prefix(self) -> list[str]:
        """`prlimit ... --` to put before an argv, or nothing when there is no limit."""
        flags = [f"--{name}={value}:{value}" for name, value in
                 (("cpu", self.cpu_seconds), ("as", self.memory_bytes), ("nproc", self.processes)) if value is not None]
        return [_resolve("prlimit", "util-linux prlimit"), *flags, "--"] if flags else []


def _resolve(program: str, what: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise SandboxUnavailable(f"sandbox: {what} not found ({program!r}); {_FIX}")
    return found


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


@dataclass(frozen=True)
class Sandbox:
    """How to start a process in a bubblewrap sandbox; see the module docstring for what it sees."""

    bwrap: str = "bwrap"
    network: bool = False
    ro_paths: tuple[Path, ...] = ()
    hidden: Callable[[], Iterable[Path]] = tuple
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for path in self.ro_paths:
            self._refuse_virtual(_real(path), "ro_paths")

    def argv(
        self, command: Sequence[str], *, cwd: str | os.PathLike[str], writable: Iterable[str | os.PathLike[str]] = (),
        read_only: Iterable[str | os.PathLike[str]] = (),
    ) -> list[str]:
        """The argv that runs `command` in the sandbox, in `cwd` (which must lie under a mount to exist there)."""
        return self._argv(command, cwd=cwd, writable=writable, read_only=read_only)

    def _argv(
        self, command: Sequence[str], *, cwd: str | os.PathLike[str], writable: Iterable[str | os.PathLike[str]] = (),
        read_only: Iterable[str | os.PathLike[str]] = (), info_fd: int | None = None,
    ) -> list[str]:
        bwrap = _resolve(self.bwrap, "bubblewrap (bwrap)")
        mounts: list[tuple[Path, list[str]]] = []
        binds: list[Path] = []
        writable_binds: list[Path] = []
        for name in SYSTEM_PATHS:
            if os.path.islink(name):
                mounts.append((Path(name), ["--symlink", os.readlink(name), name]))
            elif os.path.isdir(name):
                mounts.append((Path(name), ["--ro-bind", name, name]))
                binds.append(Path(name))
        mounts += [(Path("/tmp"), ["--tmpfs", "/tmp"]), (Path("/proc"), ["--proc", "/proc"]),
                   (Path("/dev"), ["--dev", "/dev"])]
        for flag, paths, what in (("--ro-bind", self.ro_paths, "ro_paths"), ("--ro-bind", read_only, "read-only root"),
                                  ("--bind", writable, "writable root")):
            for path in map(_real, paths):
                self._refuse_virtual(path, what)
                mounts.append((path, [flag, str(path), str(path)]))
                binds.append(path)
                if flag == "--bind":
                    writable_binds.append(path)
        mounts.sort(key=lambda m: len(m[0].parts))  # parents before children; stable for equal depth
        args = [bwrap, *(("--info-fd", str(info_fd)) if info_fd is not None else ()),
                "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if self.network:
            args.append("--share-net")
        for _, flags in mounts:
            args += flags
        args += self._masks(binds, writable_binds)
        args += ["--chdir", str(_real(cwd)), "--", *command]
        return [*self.limits.prefix(), *args]

    def _masks(self, binds: list[Path], writable: Sequence[Path] = ()) -> list[str]:
        pins: dict[Path, None] = {}
        args: list[str] = []
        # By real path: a symlink to a state file is shown as it is, and leads to the mask or to nothing.
        for path in dict.fromkeys(_real(p) for p in self.hidden()):
            if not path.exists() or not any(_inside(path, b) for b in binds):
                continue
            if path.is_dir():
                args += ["--tmpfs", str(path), "--remount-ro", str(path)]
            else:
                args += ["--ro-bind", "/dev/null", str(path)]
            # A mount point cannot be renamed, but the directories above it can: under a writable mount, renaming
            # the directory that holds the policy would let a new one take its place. Each is bound onto itself.
            for root in (w for w in writable if path != w and path.is_relative_to(w)):
                pins.update((d, None) for d in path.parents if d != root and d.is_relative_to(root))
        pinned = [arg for d in sorted(pins, key=lambda d: len(d.parts)) for arg in ("--bind", str(d), str(d))]
        return pinned + args

    @staticmethod
    def _refuse_virtual(path: Path, what: str) -> None:
        for v in _VIRTUAL:
            if _inside(path, v) or _inside(v, path):
                raise ConfigError(f"sandbox: a {what} may not be {path}: {v} in the sandbox is its own, not the host's "
                                  f"(and a mount of / would show all of the host: /run's sockets, /sys, /root)")

    def check_available(self, *, writable: Iterable[str | os.PathLike[str]] = (),
                        read_only: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Start a real sandbox (with these options and mounts) and check it: its PID namespace (and network
        namespace, unless `network`) is not keyturn's, and its process has no capability. Raise `SandboxUnavailable`
        naming the fix (or `ConfigError` for a path that cannot be mounted)."""
        info_r, info_w = os.pipe()
        try:
            argv = self._argv(["cat", "/proc/self/status"], cwd="/", writable=writable, read_only=read_only,
                              info_fd=info_w)
            done = subprocess.run(argv, capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S, check=False,
                                  stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C"},
                                  pass_fds=(info_w,))
            os.close(info_w)
            info_w = -1
            with os.fdopen(info_r, "rb") as f:
                info_r = -1
                raw = f.read()
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailable(f"sandbox: bubblewrap could not be started: {e}; {_FIX}") from None
        finally:
            for fd in (info_r, info_w):
                if fd >= 0:
                    os.close(fd)
        if done.returncode != 0:
            why = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0]
            raise SandboxUnavailable(
                f"sandbox: bubblewrap could not create a sandbox ({why}); it needs user or PID namespaces "
                f"(`sysctl kernel.unprivileged_userns_clone=1`, or an AppArmor profile allowing bwrap) and `cat` "
                f"in /usr/bin or /bin; else {_FIX}")
        try:
            info = json.loads(raw)
        except ValueError:
            raise SandboxUnavailable(f"sandbox: bubblewrap reported no namespaces; {_FIX}") from None
        for ns in ("pid", *(() if self.network else ("net",))):
            if info.get(f"{ns}-namespace") in (None, os.stat(f"/proc/self/ns/{ns}").st_ino):
                raise SandboxUnavailable(f"sandbox: the sandbox did not get a {ns} namespace of its own; {_FIX}")
        status = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
        if any(int(status.get(cap, "1").strip() or "1", 16) for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb")):
            raise SandboxUnavailable(f"sandbox: the sandboxed process kept capabilities; {_FIX}")


def sandbox_failure(exit_code: int | None, stderr: str) -> OSError | None:
    """The sandbox's own failure (a mount it could not make, a program it could not exec), told apart from the
    command's: bwrap then exits 1 before the command starts, and its message opens stderr."""
    if exit_code != 1 or not stderr.startswith("bwrap: "):
        return None
    message = stderr.splitlines()[0]
    if message.startswith("bwrap: execvp ") and message.endswith("No such file or directory"):
        return FileNotFoundError(message.removeprefix("bwrap: "))
    if message.startswith("bwrap: execvp "):
        return PermissionError(message.removeprefix("bwrap: "))
    return OSError(message)
