"""Where the appliance may write: output folders that are written only inside, only through
private temporaries, and outputs that can never land on an input or on each other.

Each run keeps its temporaries in a private folder of its own inside each output folder,
``.flare22-run.<random>/`` (mode 0700, made by ``mkdtemp``), holding a lock file the run
keeps locked (``flock``) while it lives. Outputs are renamed from there into place: a
link planted under an output's name is replaced, never written through. A run removes only
its own private folder, and the private folders of runs that are provably dead (their lock
can be taken: the process that held it is gone) -- never a file it did not make.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .ctio import OUTPUT_MODE, case_name, list_cases
from .errors import Flare22Error

log = logging.getLogger("flare22")
RUN_PREFIX = ".flare22-run."
_NEW_PREFIX = ".flare22-new."
_LOCK = "lock"


class OutputFolder:
    """One folder this run writes into; ``close()`` removes the run's private folder."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_dead_runs(self.folder)
            staging = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=self.folder))
            fd = os.open(staging / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:  # a file system without flock: the folder is then never
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # provably dead,
                    raise  # so no other run removes it; this run still removes it itself
            self.private = self.folder / (RUN_PREFIX + staging.name[len(_NEW_PREFIX):])
            os.rename(staging, self.private)  # visible as a run's folder only once locked
        except OSError as exc:
            raise Flare22Error(f"{what} {self.folder} cannot be written ({exc.strerror})") from None
        self._lock_fd: int | None = fd

    def write_text(self, name: str, text: str) -> Path:
        """``name`` in the folder, written whole under a private temporary, then renamed."""
        fd, tmp = tempfile.mkstemp(prefix="part.", dir=self.private)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, OUTPUT_MODE)
            os.replace(tmp, self.folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.folder / name

    def close(self) -> None:
        if self._lock_fd is None:
            return
        shutil.rmtree(self.private, ignore_errors=True)  # our own folder: temporaries and lock
        os.close(self._lock_fd)
        self._lock_fd = None


def remove_dead_runs(folder: Path) -> list[str]:
    """Remove the private folders of runs that are gone (their lock is free); returns them."""
    removed = []
    for p in folder.iterdir():
        if not p.name.startswith(RUN_PREFIX) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p / _LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock we can read: not provably ours to remove
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run (or no flock here: nothing provable)
            os.close(fd)
            continue
        try:
            for q in p.iterdir():  # a run's folder holds only plain files
                if q.is_file() or q.is_symlink():
                    q.unlink()
            p.rmdir()
            removed.append(p.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def hidden_cases(folder: Path) -> list[str]:
    """``*_0000`` CT names that start with a dot: skipped, and said so."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")
                  and any(p.name.endswith("_0000" + s) for s in (".nii.gz", ".nii", ".mha")))


def plan_outputs(input_dir: Path, output_dir: Path, report_dir: Path, *, uncertainty: bool,
                 protected: list[Path] = ()) -> list[Path]:
    """The cases to run, after refusing by name every clash: two inputs with one case name,
    two outputs on one path, an output on an input (or on a ``protected`` file)."""
    cases = list_cases(input_dir)
    by_name: dict[str, list[Path]] = {}
    for c in cases:
        by_name.setdefault(case_name(c), []).append(c)
    dup = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if dup:
        n, ps = next(iter(sorted(dup.items())))
        raise Flare22Error(f"input folder {input_dir}: {', '.join(p.name for p in ps)} are all case {n!r} "
                           f"(one output {n}.nii.gz); keep one of them" + (f" (and {len(dup) - 1} more such cases)"
                                                                            if len(dup) > 1 else ""))
    owner: dict[str, str] = {}

    def entry(path: Path) -> str:  # the folder entry itself: a link there is replaced, not followed
        return os.path.join(os.path.realpath(path.parent), path.name)

    def claim(path: Path, what: str) -> None:
        key = entry(path)
        if key in owner:
            raise Flare22Error(f"{owner[key]} and {what} would both be {path}; rename one of the cases")
        owner[key] = what

    for c in cases:
        n = case_name(c)
        claim(output_dir / f"{n}.nii.gz", f"case {n!r}'s labels")
        claim(report_dir / f"{n}.json", f"case {n!r}'s report")
        if uncertainty:
            claim(report_dir / f"{n}_uncertainty.nii.gz", f"case {n!r}'s uncertainty map")
    claim(report_dir / "review.csv", "the review list")
    for src in [*cases, *protected]:
        what = owner.get(entry(src))
        if what is not None:
            raise Flare22Error(f"{what} would overwrite the input {src}; choose another output folder")
    return cases
