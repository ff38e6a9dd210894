"""The documentation stays true: README usage snippets run as written, docs/ops.md is what
``docs/gen_ops.py`` generates from the registered schemas and docstrings, every "docs/<file>.md §N"
reference names an existing section, and the README lists every measured result."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _gen_ops():
    spec = importlib.util.spec_from_file_location("_gen_ops", DOCS / "gen_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Usage\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert m, "README.md has no '## Usage' section"
    blocks = re.findall(r"^```python\n(.*?)^```", m.group(1), flags=re.S | re.M)
    assert blocks, "README.md's Usage section has no python code block"
    return blocks


@pytest.mark.parametrize("index", range(2))
def test_readme_usage_snippet_runs(index):
    """Each python block of README.md's Usage section runs as written, on its own, on this machine
    (CPU here: the snippets pick the device and a config that fit it)."""
    blocks = _usage_blocks()
    assert len(blocks) == 2, "update the parametrization to the number of README usage snippets"
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", blocks[index]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README usage snippet {index + 1} failed:\n{blocks[index]}\n{proc.stderr[-4000:]}"


def test_readme_install_commands_unchanged():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Install and test.*?\n```bash\n(.*?)```", readme, flags=re.S | re.M)
    assert m, "README.md has no install block"
    assert m.group(1).splitlines() == [
        'python -m pip install torch==2.13.0 && python -m pip install -e ".[test,cute]"',
        "python -m pytest -q tests",
    ]


def test_ops_md_is_current():
    """docs/ops.md is exactly what ``python docs/gen_ops.py`` writes (schemas, docstrings, mutation)."""
    gen = _gen_ops()
    text = gen.render()  # raises DocError on a docstring that lacks a section or misnames an argument
    current = (DOCS / "ops.md").read_text()
    made_with = re.search(r"\(torch (\d+\.\d+)\)", current)
    here = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if made_with and made_with.group(1) != here:
        pytest.skip(f"docs/ops.md was generated with torch {made_with.group(1)}; schemas print per version")
    assert current == text, "docs/ops.md is not current: run `python docs/gen_ops.py`"


def test_every_registered_op_is_documented():
    import dsv4_compile  # noqa: F401

    gen = _gen_ops()
    names = gen.registered_ops()
    assert len(names) >= 21
    text = (DOCS / "ops.md").read_text()
    for name in names:
        assert f"### dsv4::{name}\n" in text, name
        schema = str(getattr(torch.ops.dsv4, name).default._schema)
        assert schema in text, f"docs/ops.md does not show the schema of dsv4::{name}"


def _sections(path: pathlib.Path) -> set[str]:
    """Section numbers ("3", "3.2") of a docs file's numbered headings."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", path.read_text(), flags=re.M))


_REF = re.compile(r"\b(?:docs/)?(numerics|compile)\.md((?:(?:,| and|-|–| to)?\s*§\d+(?:\.\d+)*)+)")


def _source_files():
    for sub in ("dsv4_compile", "lowerings", "tests", "benchmarks", "examples", "docs"):
        for path in sorted((ROOT / sub).rglob("*")):
            if path.suffix in (".py", ".md") and "egg-info" not in str(path):
                yield path
    yield ROOT / "README.md"


def test_section_references_exist():
    """Every "docs/numerics.md §N" / "docs/compile.md §N" in code and docs names a real section, and
    no reference points to the old, unpublished design notes."""
    sections = {name: _sections(DOCS / f"{name}.md") for name in ("numerics", "compile")}
    assert {"1", "3.1", "5.2", "9.3"} <= sections["numerics"]
    bad, stale = [], []
    for path in _source_files():
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        for m in _REF.finditer(text):
            for num in re.findall(r"§(\d+(?:\.\d+)*)", m.group(2)):
                if num not in sections[m.group(1)]:
                    bad.append(f"{path.relative_to(ROOT)}: {m.group(0)!r}")
        if path.parent == DOCS and path.suffix == ".md":  # bare "§N" inside a doc means its own sections
            own = sections.get(path.stem)
            if own is not None:
                plain = _REF.sub("", text)
                bad += [f"{path.relative_to(ROOT)}: §{n}" for n in re.findall(r"§(\d+(?:\.\d+)*)", plain)
                        if n not in own]
        stale += [f"{path.relative_to(ROOT)}: {m.group(0)!r}"
                  for m in re.finditer(r"spec §[\d.]+|torch-compile-notes|dsv4-attention-spec", text)]
    assert not bad, "references to missing sections:\n" + "\n".join(bad)
    assert not stale, "references to the unpublished design notes (cite docs/*.md):\n" + "\n".join(stale)


def test_readme_lists_every_result():
    readme = (ROOT / "README.md").read_text()
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    assert results
    missing = [p.name for p in results if f"benchmarks/results/{p.name}" not in readme]
    assert not missing, f"README.md's 'Measured results' does not list {missing}"
