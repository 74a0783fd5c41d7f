"""The training corpus: CPython's stdlib sources, split by module into train and held-out.

Every machine with Python has this corpus, so the bundled pair rebuilds anywhere
without a dataset hub. The split is by top-level module (a package's files stay
together) so held-out text is genuinely unseen code, not neighbouring lines.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Every 1 in HELDOUT_MODULUS top-level modules (by a stable hash of the name) is held out.
HELDOUT_MODULUS = 16
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class CorpusSplit:
    train: list[Path]
    heldout: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_level_module(path: Path, root: Path) -> str:
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def is_heldout(module: str) -> bool:
    digest = hashlib.sha1(module.encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELDOUT_MODULUS == 0


def split_corpus(root: Path | None = None) -> CorpusSplit:
    root = root or stdlib_root()
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        (heldout if is_heldout(top_level_module(path, root)) else train).append(path)
    if not train or not heldout:
        raise RuntimeError(f"no usable stdlib sources under {root}")
    return CorpusSplit(train=train, heldout=heldout)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
