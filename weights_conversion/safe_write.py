"""One write path for every command that writes a checkpoint folder (``convert``, ``export-hf``, ``export_hf``).

    with atomic_directory(dst, sources=[src], overwrite=True) as tmp:
        ...write the files into tmp, check them there...
    # here dst is the new output, complete; the old one is gone

The output is built in a temporary folder beside DST (same filesystem, never inside DST) and swapped
in only once it is complete: on Linux with one ``renameat2(RENAME_EXCHANGE)``, so DST is at every
instant the whole old output or the whole new one; elsewhere by renaming the old output aside,
the new one in, and only then removing the old (a run killed between the two renames leaves DST
absent and the old output aside, and the next run puts it back). An exception, Ctrl-C, SIGTERM or
SIGHUP removes the temporary folder; a SIGKILL or a power cut leaves it, and the next write into
the same parent folder removes it. Signals that arrive during the swap are held until it is done.

DST is refused, whatever ``overwrite`` says, when it equals or contains a source, is the working
directory or one of its parents, is a file or a symbolic link, or is a non-empty folder packvit did
not write. Every folder packvit writes holds a manifest (``.packvit-output.json``) naming its files;
a folder holding anything else is someone's data, and ``overwrite`` never deletes it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from packvit._version import __version__

MANIFEST = ".packvit-output.json"
# What a packvit-native folder holds: folders converted before manifests existed are recognised by it.
_NATIVE_FILES = re.compile(
    r"config\.json|preprocessor_config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors"
)
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class UnsafeDestinationError(ValueError):
    """DST cannot be written without risking data that is not packvit's output."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a write, raised like Ctrl-C so the temporary folder is removed."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def note(message: str) -> None:
    print(f"packvit: {message}", file=sys.stderr, flush=True)


# -- which folders may be replaced ----------------------------------------------------------------


def packvit_wrote(folder: Path) -> tuple[bool, str]:
    """Whether ``folder`` holds packvit's output and nothing else; else (False, why not)."""
    names = sorted(e.name for e in folder.iterdir())
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())["files"]
            if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                raise TypeError("files is not a list of names")
        except (ValueError, KeyError, TypeError) as e:
            return False, f"its {MANIFEST} is unreadable ({e})"
        extra = [n for n in names if n not in listed and n != MANIFEST]
        if extra:
            return False, f"it holds {extra[:3]}{' and more' if len(extra) > 3 else ''} besides what packvit wrote"
        return True, ""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("format") == "packvit":  # written before manifests existed
        extra = [n for n in names if not _NATIVE_FILES.fullmatch(n)]
        if not extra:
            return True, ""
        return False, f"it holds {extra[:3]} besides a packvit checkpoint"
    return False, f"it has no {MANIFEST}, and holds {names[:3]}{' and more' if len(names) > 3 else ''}"


def check_destination(dst: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False) -> Path:
    """The absolute DST, or an error saying why writing it could lose data. Touches nothing."""
    raw = Path(dst).expanduser()
    if str(dst) == "":
        raise UnsafeDestinationError("DST is empty: give an output folder")
    if raw.is_symlink():
        raise UnsafeDestinationError(f"DST {str(dst)!r} is a symbolic link: give the folder itself")
    target = raw.resolve()
    if target.parent == target:
        raise UnsafeDestinationError(f"DST {str(dst)!r} is the filesystem root")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UnsafeDestinationError(
            f"DST {str(dst)!r} is the working directory or one of its parents: give a new folder for the output"
        )
    for src in sources:
        if src is None or not Path(src).expanduser().exists():
            continue  # a hub id: its cache is never a folder packvit wrote, so it is refused below
        s = Path(src).expanduser().resolve()
        if s == target or target in s.parents:
            what = "is the source" if s == target else "contains the source"
            raise UnsafeDestinationError(f"DST {str(dst)!r} {what} {str(src)!r}: write the output to another folder")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnsafeDestinationError(f"DST {str(dst)!r} lies under {str(ancestor)!r}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):  # found now, not after reading gigabytes
        raise PermissionError(errno.EACCES, f"cannot write DST {str(dst)!r}: no write permission in", str(ancestor))
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UnsafeDestinationError(f"DST {str(dst)!r} is a file, not a folder")
        if any(target.iterdir()):
            ok, why = packvit_wrote(target)
            if not ok:
                raise UnsafeDestinationError(
                    f"DST {str(dst)!r} is a folder packvit did not write ({why}); refusing to replace it, even with "
                    "--overwrite: choose a new folder, or empty it yourself"
                )
            if not overwrite:
                raise FileExistsError(
                    f"destination {str(dst)!r} exists; choose another one or pass overwrite=True (--overwrite)"
                )
    return target


# -- leftovers of killed runs ---------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _side_name(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target``, named after this process so a later run can tell whether it is stale."""
    return target.parent / f".{target.name}.packvit-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def clean_stale(target: Path) -> None:
    """Remove the temporary folders killed runs left beside ``target`` (for any DST in that folder),
    and put back an old output that a run killed mid-swap had moved aside. Folders of live runs, or
    of other hosts, are only reported."""
    if not target.name or not target.parent.is_dir():
        return
    pattern = re.compile(r"\.(.+)\.packvit-(tmp|old)-([A-Za-z0-9]+)-(\d+)-[0-9a-f]{8}")
    legacy = f".{target.name}.tmp-"  # packvit <= 0.1.0's mkdtemp prefix: no owner recorded
    for entry in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None:
            if entry.name.startswith(legacy) and entry.is_dir():
                note(
                    f"{entry} looks like a temporary folder left by a killed packvit run; remove it if no packvit "
                    "is writing there"
                )
            continue
        owner = target.parent / m.group(1)
        kind, host, pid = m.group(2), m.group(3), int(m.group(4))
        if host != _host() or _alive(pid):
            if owner == target:
                note(f"leaving {entry}: it belongs to a packvit run still writing {target} (pid {pid} on {host})")
            continue
        if kind == "old" and not (owner.exists() or owner.is_symlink()):
            _rename(entry, owner, replace=False)
            note(f"put back {owner}: a packvit run was killed while replacing it")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            note(f"removed {entry}, left by a killed packvit run")


# -- renames and durability -------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(2); False where the platform or filesystem lacks it (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename(src: Path, dst: Path, replace: bool) -> None:
    if not replace and _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if not replace and (dst.exists() or dst.is_symlink()):
        raise FileExistsError(errno.EEXIST, "appeared while packvit was writing", str(dst))
    os.rename(src, dst)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; whatever was at ``target`` ends up at ``new``."""
    if not (target.exists() or target.is_symlink()):
        _rename(new, target, replace=False)
        return
    if _renameat2(new, target, _RENAME_EXCHANGE):
        return
    aside = _side_name(target, "old")
    os.rename(target, aside)  # the old output, whole, under a name the next run recognises
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)  # so the caller removes it with the temporary folder


# -- signals ----------------------------------------------------------------------------------------


@contextmanager
def _signals(mode: str) -> Iterator[list[int]]:
    """``raise``: SIGTERM / SIGHUP raise ``Interrupted`` (where nobody installed a handler), so the
    temporary folder is removed as on Ctrl-C. ``hold``: SIGINT, SIGTERM, SIGHUP are recorded, not acted
    on, until the block ends (the swap must not stop half way). Main thread only, as Python's signals."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    if mode == "hold":

        def handler(signum, frame):
            received.append(signum)

        chosen = _SIGNALS
    else:

        def handler(signum, frame):
            raise Interrupted(signum)

        chosen = tuple(s for s in _SIGNALS if s != signal.SIGINT and signal.getsignal(s) == signal.SIG_DFL)
    previous = {s: signal.signal(s, handler) for s in chosen}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- the write path ---------------------------------------------------------------------------------


def prepare_destination(dst: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False) -> Path:
    """Clean up after killed runs, then check DST: what a command calls before reading gigabytes."""
    target = Path(dst).expanduser().absolute()
    clean_stale(target.parent.resolve() / target.name if target.parent.exists() else target)
    return check_destination(dst, sources=list(sources), overwrite=overwrite)


def write_manifest(folder: Path, command: str) -> None:
    files = sorted(e.name for e in folder.iterdir() if e.name != MANIFEST)
    record = {"written_by": "packvit", "packvit_version": __version__, "command": command, "files": files}
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


@contextmanager
def atomic_directory(
    dst: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False, command: str = "packvit"
) -> Iterator[Path]:
    """Yield an empty temporary folder beside DST; on a clean exit, swap it in as DST (see the module doc).

    Raise inside the block (a failed check, say) and nothing changes at DST.
    """
    sources = list(sources)
    target = prepare_destination(dst, sources=sources, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _side_name(target, "tmp")
    os.mkdir(tmp)  # 0o777 minus the umask, like any folder the user makes
    try:
        with _signals("raise"):
            yield tmp
            write_manifest(tmp, command)
            mode = 0o666 & ~_umask()  # safetensors creates its files 0600, whatever the umask
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, mode)
                _fsync(f)
            _fsync(tmp)
            with _signals("hold") as received:
                check_destination(target, sources=sources, overwrite=overwrite)  # DST may have changed meanwhile
                _swap(tmp, target)
                _fsync(target.parent)
                if os.path.lexists(tmp):
                    shutil.rmtree(tmp)  # the old output, swapped out
            if received:
                note(f"{target} was being replaced when a signal came; it is complete, so the write was finished")
    except BaseException:
        with _signals("hold"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
