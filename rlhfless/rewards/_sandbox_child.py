"""Inside the sandbox: apply the limits, install the guard, then run the untrusted program.

Run as `python -I -S -B _sandbox_child.py CONFIG_JSON` with the private directory as cwd (the
parent sets the process group, scrubbed environment and, where it can, a network namespace).
Uses the standard library only, and runs the program in this same interpreter so that the
guard is in place before its first line.

The guard is a `sys.audit` hook (it cannot be removed once added) that refuses, by default:
sockets, new processes (fork, exec, spawn, system), signals to other processes, ctypes and
other native escape hatches, writes and file-system changes outside the private directory,
and reads of other processes' /proc entries (their environment). Its settings are bound as
immutable default arguments, so a program that patches modules cannot change what it checks.
"""

import json
import os
import resource
import sys

cfg = json.loads(sys.argv[1])


def _limit(which, value):
    if value is None:
        return
    soft, hard = value if isinstance(value, list) else (value, value)
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:  # only root may raise a hard limit
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (int(soft), int(hard)))


_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
_limit(resource.RLIMIT_CPU, [cfg["cpu_s"], cfg["cpu_s"] + 1])
_limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NOFILE, 64)
_limit(resource.RLIMIT_NPROC, cfg.get("nproc"))

_ROOT = os.path.realpath(os.getcwd())
# /proc is closed (another process's environ, or /proc/self/root/proc/...) but for these.
_PROC_READABLE = frozenset(f"/proc/{who}/{name}" for who in ("self", os.getpid())
                           for name in ("stat", "statm", "status", "limits")) | frozenset(
    {"/proc/cpuinfo", "/proc/meminfo"})
_DENIED = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "os.startfile", "os.killpg", "os.symlink", "os.link", "os.chroot", "os.setns",
    "os.unshare", "subprocess.Popen",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.setprofile",
    "sys.settrace", "resource.prlimit", "mmap.__new__", "pty.spawn",
})
_DENIED_PREFIXES = ("ctypes.", "_ctypes.", "winreg.", "msvcrt.", "_winapi.")
_DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess",
                             "multiprocessing", "_multiprocessing", "_xxsubinterpreters"})
# path-taking events: (indexes of path arguments)
_MUTATIONS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.chdir": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    pass


def _guard(event, args, _root=_ROOT, _proc_readable=_PROC_READABLE, _denied=_DENIED,
           _prefixes=_DENIED_PREFIXES, _imports=_DENIED_IMPORTS,
           _mutations=tuple(_MUTATIONS.items()), _write_flags=_WRITE_FLAGS,
           _fspath=os.fspath, _fsdecode=os.fsdecode, _join=os.path.join,
           _normpath=os.path.normpath, _getcwd=os.getcwd, _getpid=os.getpid,
           _getpgid=os.getpgid, _isdir=os.path.isdir, _isinstance=isinstance, _str=str,
           _int=int, _any=any, _exc=SandboxViolation):
    def inside(path):
        if _isinstance(path, _int):
            return True  # an open descriptor: already vetted when it was opened
        text = _fsdecode(_fspath(path))
        full = _normpath(_join(_getcwd(), text))
        return full == _root or full.startswith(_root + "/") or full == "/dev/null"

    if event in _denied or event.startswith(_prefixes):
        raise _exc(f"sandbox: {event} is not allowed")
    if event == "import":
        name = _str(args[0])
        if name.split(".")[0] in _imports:
            raise _exc(f"sandbox: import of {name} is not allowed")
    elif event == "open":
        path, mode, flags = args
        if path is None or _isinstance(path, _int):
            return
        writing = (_any(c in mode for c in "wax+") if _isinstance(mode, _str)
                   else bool((flags or 0) & _write_flags))
        if writing:
            if not inside(path):
                raise _exc(f"sandbox: writing {path!r} outside the sandbox is not allowed")
            return
        full = _normpath(_join(_getcwd(), _fsdecode(_fspath(path))))
        if full.startswith("/proc/") and full not in _proc_readable:
            raise _exc(f"sandbox: reading {path!r} is not allowed")
        if _isdir(full) and not inside(full):
            raise _exc(f"sandbox: opening directory {path!r} is not allowed")
    elif event in ("os.kill",):
        pid = args[0]
        if pid not in (0, _getpid()):
            raise _exc("sandbox: signalling another process is not allowed")
    elif event == "object.__setattr__":
        # Raised for a function's __code__/__defaults__ (the guard's among them) and types.
        if args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
            raise _exc(f"sandbox: setting {args[1]} is not allowed")
    else:
        for name, indexes in _mutations:
            if event == name:
                for i in indexes:
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        raise _exc(f"sandbox: {event} outside the sandbox is not allowed")


sys.addaudithook(_guard)
del cfg, _limit

with open("solution.py", encoding="utf-8") as _f:
    _source = _f.read()
_code = compile(_source, "solution.py", "exec")
sys.argv = ["solution.py"]
del _f, _source
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
