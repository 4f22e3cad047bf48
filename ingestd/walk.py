"""Walking a folder tree iteratively, to a depth limit: a dropped tree of any shape cannot break a scan.

`os.walk` recurses once per level (Python 3.11): a folder 1,200 levels deep raises RecursionError out of every
scan of the drop folder it sits in. `walk` keeps its own stack instead, and does not enter a folder deeper than
`max_depth` levels below the top: it reports it to `too_deep` and goes on with the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DEFAULT_MAX_DEPTH", "walk"]

DEFAULT_MAX_DEPTH = 64
"""Folder levels below a drop folder (or a folder given to `ingestd import`) that are searched.

A scanner's or PACS export nests a handful (PATIENT/STUDY/SERIES/...); 64 leaves room for any real layout while
keeping a path within PATH_MAX for ordinary folder names.
"""


def walk(
    top: Path,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    depth: int = 0,
    onerror: Callable[[OSError], None] | None = None,
    too_deep: Callable[[Path, int], None] | None = None,
) -> Iterator[tuple[Path, list[str], list[str]]]:
    """(folder, subfolder names, other names) for `top` and every folder below it, top-down, like `os.walk`.

    As with `os.walk(followlinks=False)`: a link to a folder is listed among the subfolders but never entered,
    and the caller may prune the subfolder list in place to keep the walk out of some. `depth` is how many levels
    `top` itself is below the folder the limit counts from; a subfolder at `max_depth + 1` levels or more is not
    entered but passed to `too_deep` with its depth. An error listing a folder goes to `onerror` (the folder is
    passed over), as do errors telling what an entry is.
    """
    stack: list[tuple[Path, int]] = [(top, depth)]
    while stack:
        folder, level = stack.pop()
        try:
            scanner = os.scandir(folder)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            continue
        with scanner:
            subfolders, others, links = _list(scanner, onerror)
        yield folder, subfolders, others
        below = []
        for name in subfolders:  # after the caller pruned them
            if name in links:
                continue
            if level + 1 > max_depth:
                if too_deep is not None:
                    too_deep(folder / name, level + 1)
                continue
            below.append((folder / name, level + 1))
        stack.extend(reversed(below))  # the first name is walked first, as os.walk does


def _list(
    scanner: Iterator[os.DirEntry[str]], onerror: Callable[[OSError], None] | None
) -> tuple[list[str], list[str], set[str]]:
    """The subfolder names, other names and links to folders of one folder's listing."""
    subfolders: list[str] = []
    others: list[str] = []
    links: set[str] = set()
    while True:
        try:
            entry = next(scanner)
        except StopIteration:
            break
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            break
        try:
            is_folder = entry.is_dir()
            if is_folder and entry.is_symlink():
                links.add(entry.name)
        except OSError:
            is_folder = False
        (subfolders if is_folder else others).append(entry.name)
    return subfolders, others, links
