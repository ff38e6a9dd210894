"""CI checks of the built wheel (used by ``.ci/run``).

    python .ci/wheel_check.py contents WHEEL   # in the repo: the wheel holds exactly the package's .py files
    python -I wheel_check.py imports           # in the fresh venv, outside the repo: every module imports

``contents``: every ``.py`` under ``dsv4_compile/`` and ``lowerings/`` (as ``dsv4_compile/lowerings/``)
is in the wheel, and the wheel has no other ``.py`` (a stale build directory would add some).

``imports``: ``dsv4_compile`` comes from the venv's site-packages (not the repository); every package
and module ``pkgutil.walk_packages`` finds under it imports (a module may only lack ``cutlass``, the
``cute`` extra, which the venv does not install); and ``walk_packages`` saw every ``.py`` file
installed (a directory without ``__init__.py`` would be skipped by it and flagged here).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import sysconfig
import zipfile

OPTIONAL = {"cutlass"}  # top-level modules of the extras the venv leaves out (cute: nvidia-cutlass-dsl)


def contents(wheel: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    want = set()
    for top, prefix in (("dsv4_compile", "dsv4_compile"), ("lowerings", "dsv4_compile/lowerings")):
        for d, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            rel = os.path.relpath(d, os.path.join(root, top))
            for f in files:
                if f.endswith(".py"):
                    want.add("/".join(p for p in (prefix, rel, f) if p != "."))
    have = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        sys.exit(f"wheel {os.path.basename(wheel)}: missing {missing}; not in the source tree {extra}")
    print(f"wheel {os.path.basename(wheel)}: all {len(want)} .py files of dsv4_compile/ and lowerings/")


def imports() -> None:
    import dsv4_compile

    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    pkg_dir = os.path.realpath(dsv4_compile.__path__[0])
    if not pkg_dir.startswith(site + os.sep):
        sys.exit(f"dsv4_compile imported from {pkg_dir}, not from the venv's {site}")
    errors, skipped, found = [], [], {"dsv4_compile"}

    def onerror(name):
        errors.append(f"{name}: {sys.exc_info()[1]!r}")

    for m in pkgutil.walk_packages(dsv4_compile.__path__, "dsv4_compile.", onerror=onerror):
        found.add(m.name)
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in OPTIONAL:
                skipped.append(m.name)
            else:
                errors.append(f"{m.name}: {e!r}")
        except Exception as e:  # noqa: BLE001 (report every failure, then fail)
            errors.append(f"{m.name}: {e!r}")
    on_disk = set()
    for d, dirs, files in os.walk(pkg_dir):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        rel = os.path.relpath(d, pkg_dir)
        parts = ["dsv4_compile"] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                on_disk.add(".".join(parts if f == "__init__.py" else parts + [f[:-3]]))
    if on_disk - found:
        errors.append(f"installed but not found by pkgutil.walk_packages (no __init__.py?): {sorted(on_disk - found)}")
    if errors:
        sys.exit("import check failed:\n  " + "\n  ".join(errors))
    n_pkg = sum(1 for m in found if m == "dsv4_compile" or os.path.isdir(os.path.join(pkg_dir, *m.split(".")[1:])))
    print(f"imported {len(found) - len(skipped)} modules ({n_pkg} packages) of dsv4_compile from {pkg_dir}"
          + (f"; without the cute extra: {', '.join(sorted(skipped))}" if skipped else ""))


if __name__ == "__main__":
    if sys.argv[1:2] == ["contents"] and len(sys.argv) == 3:
        contents(sys.argv[2])
    elif sys.argv[1:] == ["imports"]:
        imports()
    else:
        sys.exit(__doc__)
