"""A stage's input files checked against the sha256 their writer recorded (download's manifest,
normalize's stats), before the stage reads them: a file damaged on disk (a flipped bit, a copy
cut short) or changed since is named, with the fix, instead of feeding a model wrong bytes.

Files that DVC restored are links into its cache (hardlinks, or symlinks across file systems:
.dvc/config), so a damaged file means a damaged cache object. DVC does not notice (it trusts
its cache: `dvc fetch` skips an object it has, `dvc pull --force` links the damaged one again);
the fix is to remove the object, fetch it from the remote and link it again.
"""

from __future__ import annotations

from pathlib import Path

from ftflow.errors import StageError
from ftflow.hashing import file_sha256


class DamagedInput(StageError):
    pass


def check(files: dict[Path, str], writer: str, redo: str) -> None:
    """Each file against the sha256 `writer` recorded; `redo` says how to write them again."""
    for path, digest in files.items():
        if not path.exists():
            raise DamagedInput(f"{path} is missing, though {writer} wrote it. {redo}")
        if file_sha256(path) != digest:
            fix = dvc_fix(path) or redo
            raise DamagedInput(f"{path} is not the file {writer} wrote (its sha256 differs): damaged on disk or "
                               f"changed since. {fix}")  # fmt: skip


def dvc_fix(path: Path) -> str:
    """How to restore a file that is a link into DVC's cache ("" when it is not one)."""
    objects = cache_objects(path)
    if not objects:
        return ""
    # an object whose content lost the md5 it is filed under is the damaged original; one that
    # has it holds the damaged content: `dvc repro` records a changed data folder as a new version
    damaged = [o for o in objects if file_md5(o) != o.parent.name + o.name]
    recorded = [o for o in objects if o not in damaged]
    fix = f"It is a link into DVC's cache, so the cached copy is damaged too ({', '.join(map(str, damaged))}). "
    if not damaged:
        fix = "It is a link into DVC's cache. "
    steps = ["remove " + ("that object" if len(damaged) == 1 else "those objects")] if damaged else []
    if recorded:
        steps.append(f"undo DVC's record of the damaged content as a new version ({recorded[0]}): `git checkout` "
                     "the .dvc file or dvc.lock that changed")  # fmt: skip
    steps.append("then `dvc fetch` (from the remote) and `dvc checkout --relink --force` restore both")
    text = "; ".join(steps)
    return fix + text[0].upper() + text[1:] + "."


def cache_objects(path: Path) -> list[Path]:
    """The DVC cache objects that `path` is a link to (a hardlink may share its inode with
    several: the original and a new version DVC recorded since)."""
    if not path.exists() or (not path.is_symlink() and path.stat().st_nlink < 2):
        return []
    cache = dvc_cache(path)
    if cache is None:
        return []
    if path.is_symlink():
        target = path.resolve()
        return [target] if cache.resolve() in target.parents else []
    st = path.stat()
    # searched only when something is wrong
    return sorted(obj for obj in (cache / "files").rglob("*")
                  if obj.is_file() and (obj.stat().st_ino, obj.stat().st_dev) == (st.st_ino, st.st_dev))  # fmt: skip


def file_md5(path: Path) -> str:
    """The md5 DVC files an object under (its content's)."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_cache(path: Path) -> Path | None:
    """The cache of the DVC repository holding path: .dvc/cache unless .dvc/config moves it."""
    for folder in path.absolute().parents:  # (not resolve(): a symlink leads into the cache)
        if (folder / ".dvc").is_dir():
            try:
                from dvc.repo import Repo

                with Repo(str(folder)) as repo:
                    return Path(repo.cache.local.path).parent.parent  # <cache>/files/md5
            except Exception:  # DVC not importable or the repo unreadable: its default place
                return folder / ".dvc" / "cache"
    return None
