"""The whole test suite: every notebook in nbs/ is one pytest test (run with nbdev's notebook runner,
`#| slow` cells skipped), plus checks that the exported package and the cleaned notebooks are in sync.

Run from the repository root: `python -m pytest nbs`.
"""
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parent
ROOT = NBS.parent
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))
if not NOTEBOOKS:  # an empty collection must fail loudly, never pass as "0 tests"
    raise RuntimeError(f"no notebooks found in {NBS}: nothing to test")

os.environ.setdefault("TSDIFFBENCH_QUIET", "1")


# Warnings that third-party code raises on our calls, each filtered by category, message and module, with the reason; every
# other warning a notebook raises fails its test (listed with where it came from), so new ones are fixed at the source.
KNOWN_WARNINGS = [
    # fastcore's test_close subtracts a torch tensor and a NumPy array; NumPy 2 then calls torch's Tensor.__array_wrap__,
    # whose signature predates NumPy 2 (a torch matter; the values compared are right)
    ("DeprecationWarning", r"__array_wrap__ must accept context and return_scalar", r"fastcore\.test"),
]

RUN_ONE = """
import builtins, collections, sys, warnings
from pathlib import Path
from nbdev.test import test_nb
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category), module=module)
    ok, seconds = test_nb(Path(sys.argv[1]), skip_flags=["slow"], basepath=sys.argv[2])
seen = collections.Counter((w.category.__name__, str(w.message).splitlines()[0][:200], f"{w.filename}:{w.lineno}") for w in caught)
for (category, message, where), n in seen.most_common(): print(f"WARNING ({n}x) {category}: {message} [{where}]")
print(f"{Path(sys.argv[1]).name}: {seconds:.1f}s, {sum(seen.values())} warning(s)")
sys.exit(0 if ok and not seen else 3 if ok else 1)
"""


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb):
    """Run every cell of the notebook except `#| slow` ones, in a fresh Python process (as a kernel would: a notebook
    that re-registers a model or sets torch's threads cannot leak into the next); any exception fails the test."""
    script = f"KNOWN_WARNINGS = {KNOWN_WARNINGS!r}\n{RUN_ONE}"
    res = subprocess.run([sys.executable, "-c", script, str(nb), str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "IN_TEST": "1"})
    print(res.stdout[-4000:]); print(res.stderr[-20000:], file=sys.stderr)
    assert res.returncode != 3, f"{nb.name} raised warnings (listed above): fix them at the source or add a precise KNOWN_WARNINGS entry"
    assert res.returncode == 0, f"{nb.name} failed (traceback above in the captured stderr)"


def _copy_project(dst: Path) -> Path:
    for name in ["settings.ini", "setup.py", "README.md"]:
        if (ROOT / name).exists(): shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(NBS, dst / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "_*"))
    shutil.copytree(ROOT / "tsdiffbench", dst / "tsdiffbench", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _tracked(p: Path) -> bool:
    "Generated or source files we compare: no caches, no `_scratch` notebooks (but `__init__.py`, `_modidx.py`)."
    return "__pycache__" not in p.parts and (not p.name.startswith("_") or p.name in ("__init__.py", "_modidx.py"))


def _tree_diff(a: Path, b: Path, pattern: str) -> list:
    "Files under `a` and `b` matching `pattern` that differ, or exist on one side only."
    fa = {p.relative_to(a) for p in a.rglob(pattern) if _tracked(p)}
    fb = {p.relative_to(b) for p in b.rglob(pattern) if _tracked(p)}
    diff = sorted(str(p) for p in fa ^ fb)
    diff += sorted(str(p) for p in fa & fb if not filecmp.cmp(a / p, b / p, shallow=False))
    return diff


def _run(cmd, cwd):
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / cmd[0]), *cmd[1:]], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


def test_export_in_sync(tmp_path):
    "`nbdev_export` on a copy of the project must not change `tsdiffbench/`: the package is generated from nbs/."
    work = _copy_project(tmp_path)
    _run(["nbdev_export"], work)
    diff = _tree_diff(ROOT / "tsdiffbench", work / "tsdiffbench", "*.py")
    assert not diff, f"nbdev_export would change these files (run nbdev_export and commit): {diff}"


def test_clean_in_sync(tmp_path):
    "`nbdev_clean` on a copy of nbs/ must change nothing: committed notebooks carry no outputs or stray metadata."
    work = _copy_project(tmp_path)
    _run(["nbdev_clean"], work)
    diff = _tree_diff(NBS, work / "nbs", "*.ipynb")
    assert not diff, f"nbdev_clean would change these notebooks (run nbdev_clean and commit): {diff}"
