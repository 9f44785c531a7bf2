"""Kill ``packvit convert --overwrite`` at every file-system step of its write, and say what DST holds.

    python tests/safe_write_driver.py SRC WORKDIR SIGNAL MODE

SIGNAL is KILL or INT; MODE is ``exchange`` (renameat2) or ``fallback`` (rename aside, rename in).
For each step k a forked child runs the conversion and sends itself SIGNAL just before its k-th
file-system call (mkdir, rename, unlink, rmdir, fsync, a safetensors or text file written). The
parent then records what DST holds (the old output, the new one, nothing, or a MIX), the hidden
folders left beside it, and both again after the next run's ``clean_stale``. One JSON line per k,
then a summary line. Forking once the imports are done keeps each step at a fraction of a second.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys

import torch

torch.set_num_threads(1)

import safetensors.torch  # noqa: E402

from packvit.cli import main  # noqa: E402
from weights_conversion import safe_write  # noqa: E402

CONVERT = ["--dtype", "bfloat16", "--max-shard-size", "20KB", "--no-progress"]


def snapshot(d: pathlib.Path) -> dict[str, bytes] | None:
    if not d.exists():
        return None
    return {f.name: f.read_bytes() if f.is_file() else b"<dir>" for f in sorted(d.iterdir())}


def leftovers(dst: pathlib.Path) -> list[str]:
    return sorted(e.name for e in dst.parent.iterdir() if e.name.startswith(f".{dst.name}."))


def install_hooks(kill_at: int, signum: int, counter: list[int]) -> None:
    def wrap(owner, name):
        real = getattr(owner, name)

        def hooked(*args, **kwargs):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signum)
            return real(*args, **kwargs)

        setattr(owner, name, hooked)

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync"):
        wrap(os, name)
    wrap(safetensors.torch, "save_file")
    wrap(pathlib.Path, "write_text")
    wrap(safe_write, "_renameat2")


def no_renameat2(a, b, flags):
    return False


def main_driver(src: str, work: str, sig: str, mode: str) -> None:
    work = pathlib.Path(work)
    signum = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}[sig]
    if mode == "fallback":
        safe_write._renameat2 = no_renameat2
    old_dir, new_dir, dst = work / "old", work / "new", work / "out" / "pv"
    assert main(["convert", src, str(old_dir), "--no-progress"]) == 0  # fp32, one file
    assert main(["convert", src, str(new_dir), *CONVERT]) == 0  # bf16, several shards
    old, new = snapshot(old_dir), snapshot(new_dir)
    old.pop(safe_write.MANIFEST), new.pop(safe_write.MANIFEST)  # they name the files; compared below
    assert old != new

    def state(d):
        s = snapshot(d)
        if s is None:
            return "absent"
        manifest = s.pop(safe_write.MANIFEST, None)
        listed = sorted(json.loads(manifest)["files"]) if manifest else None
        if s == old and listed == sorted(old):
            return "old"
        if s == new and listed == sorted(new):
            return "new"
        return "MIX"

    k, steps = 0, None
    while steps is None or k <= steps:
        k += 1
        shutil.rmtree(dst.parent, ignore_errors=True)
        dst.parent.mkdir()
        shutil.copytree(old_dir, dst)
        counter = [0]
        pid = os.fork()
        if pid == 0:  # the child: one conversion, signalled at its k-th step (never, on the counting run)
            code = 99
            try:
                install_hooks(k if steps is not None else -1, signum, counter)
                code = main(["convert", src, str(dst), "--overwrite", *CONVERT])
                if steps is None:
                    (work / "steps").write_text(str(counter[0]))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if steps is None:
            steps = int((work / "steps").read_text())
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and state(dst) == "new", "counting run"
            k = 0
            continue
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        before, left_before = state(dst), leftovers(dst)
        safe_write.clean_stale(dst)  # what the next run does first
        print(
            json.dumps(
                {
                    "k": k,
                    "how": how,
                    "before": before,
                    "leftovers": left_before,
                    "after": state(dst),
                    "leftovers_after": leftovers(dst),
                }
            ),
            flush=True,
        )
    print(json.dumps({"steps": steps}), flush=True)


if __name__ == "__main__":
    main_driver(*sys.argv[1:])
