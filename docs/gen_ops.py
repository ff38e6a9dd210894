#!/usr/bin/env python
"""Generate ``docs/ops.md``, the reference of every ``dsv4::`` op, from the registered schemas and the
op docstrings.

    python docs/gen_ops.py           # rewrite docs/ops.md
    python docs/gen_ops.py --check   # exit 1 if docs/ops.md is not current (tests/test_docs.py)

The op list, the signatures, the defaults and what each op mutates come from the registry
(``torch.ops.dsv4`` and each op's schema: ``Tensor(a!)`` marks a mutated argument), never from
prose. The docstrings (``dsv4_compile/ops/*.py``) supply the rest in a fixed structure::

    One-line summary.

    Description (optional paragraphs).

    Args:
        <every schema argument, in order>: shape, dtype, units, meaning.
    Returns:
        ...
    Mutates:
        <every mutated argument>: what is written.   (or "Nothing." for a functional op)
    Raises:
        ValueError: when.
    Source:
        The public formula or kernel it implements.

The generator fails when a docstring misses a section, documents arguments other than the schema's
(or in another order), or names in ``Mutates:`` other arguments than the schema mutates.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import pkgutil
import re
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "ops.md"
SECTIONS = ("Args", "Returns", "Mutates", "Raises", "Source")
# op modules in reading order (a module not listed here is appended under its own name)
GROUPS = {
    "rope": "Rotation primitives",
    "quant": "Quantization primitives",
    "indexer_q": "Lightning-indexer query",
    "cache": "Paged caches",
    "compressor": "Compressor",
    "indices": "Index construction",
    "attention": "Attention core",
    "output": "Output path",
}
_HEADER = re.compile(r"^(" + "|".join(SECTIONS) + r"):\s*$")
_ENTRY = re.compile(r"^    (\w+): (.*)$")


class DocError(Exception):
    pass


def registered_ops() -> list[str]:
    """Names of every op registered in the ``dsv4`` namespace (after ``import dsv4_compile``)."""
    import dsv4_compile  # noqa: F401  (registers torch.ops.dsv4.*)

    return sorted(name for name in dir(torch.ops.dsv4)
                  if isinstance(getattr(torch.ops.dsv4, name, None), torch._ops.OpOverloadPacket))


def python_defs() -> dict[str, object]:
    """``{name: the decorated Python function}`` of every ``custom_op`` defined in ``dsv4_compile.ops``."""
    import dsv4_compile.ops as pkg

    defs = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            fn = getattr(obj, "_init_fn", None)  # torch.library.CustomOpDef keeps the decorated function
            if callable(fn) and getattr(obj, "_namespace", None) == "dsv4" and fn.__module__ == module.__name__:
                defs[obj._name] = fn
    return defs


def parse_docstring(name: str, doc: str | None) -> dict:
    """Split a docstring into summary, description and the sections of ``SECTIONS``."""
    if not doc:
        raise DocError(f"dsv4::{name}: no docstring")
    lines = inspect.cleandoc(doc).splitlines()
    out = {"summary": [], "description": [], **{s: [] for s in SECTIONS}}
    current = "summary"
    for line in lines:
        m = _HEADER.match(line)
        if m:
            if out[m.group(1)]:
                raise DocError(f"dsv4::{name}: section {m.group(1)}: appears twice")
            current = m.group(1)
            continue
        if current == "summary" and not line.strip():
            current = "description"
            continue
        if current in SECTIONS and line.strip() and not line.startswith("    "):
            raise DocError(f"dsv4::{name}: section {current}: line not indented: {line!r}")
        out[current].append(line[4:] if current in SECTIONS else line)
    missing = [s for s in SECTIONS if not any(l.strip() for l in out[s])]
    if missing:
        raise DocError(f"dsv4::{name}: docstring lacks the section(s) {', '.join(missing)}")
    return out


def entries(name: str, section: str, lines: list[str]) -> list[tuple[str, str]]:
    """``(key, text)`` items of an ``Args`` / ``Mutates`` / ``Raises`` section, continuation lines joined."""
    items: list[list[str]] = []
    for line in lines:
        m = _ENTRY.match("    " + line)
        if m and not line.startswith(" "):
            items.append([m.group(1), m.group(2).strip()])
        elif line.strip():
            if not items:
                raise DocError(f"dsv4::{name}: section {section}: expected 'name: text', got {line!r}")
            items[-1][1] += " " + line.strip()
    return [(k, v) for k, v in items]


def md(text: str) -> str:
    """Docstring (reST) inline markup to Markdown; "docs/x.md" references become links (this file is in docs/)."""
    text = text.replace("``", "`")
    return re.sub(r"\bdocs/(\w+)\.md\b", r"[\1.md](\1.md)", text)


def cell(text: str) -> str:
    """Text for a Markdown table cell (a ``|``, even in code, would end the cell)."""
    return text.replace("|", "\\|")


def paragraphs(lines: list[str]) -> str:
    """Lines to Markdown paragraphs (blank-line separated, each joined on one line)."""
    out, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(md(" ".join(cur)))
            cur = []
    return "\n\n".join(out)


def describe(name: str, fn) -> dict:
    schema = getattr(torch.ops.dsv4, name).default._schema
    doc = parse_docstring(name, fn.__doc__)
    args = [a.name for a in schema.arguments]
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]

    arg_docs = entries(name, "Args", doc["Args"])
    if [k for k, _ in arg_docs] != args:
        raise DocError(f"dsv4::{name}: Args documents {[k for k, _ in arg_docs]} but the schema has {args}")
    mut_docs = entries(name, "Mutates", doc["Mutates"]) if mutated else []
    if mutated and [k for k, _ in mut_docs] != mutated:
        raise DocError(f"dsv4::{name}: Mutates documents {[k for k, _ in mut_docs]} but the schema mutates "
                       f"{mutated}")
    if not mutated and any(_ENTRY.match("    " + l) and l.split(":")[0] in args for l in doc["Mutates"]):
        raise DocError(f"dsv4::{name}: Mutates names an argument but the schema mutates nothing")
    raises = entries(name, "Raises", doc["Raises"])

    rows = []
    for a, (_, text) in zip(schema.arguments, arg_docs):
        bits = [f"`{a.type}`"]
        if a.has_default_value():
            bits.append(f"default `{a.default_value!r}`")
        if a.name in mutated:
            bits.append("**mutated**")
        rows.append(f"- `{a.name}` ({', '.join(bits)}): {md(text)}")
    if mutated:
        mutates = "\n".join(f"- `{k}`: {md(v)}" for k, v in mut_docs)
    else:
        mutates = "Nothing (no `Tensor(a!)` argument): the op is functional."
    file = pathlib.Path(inspect.getsourcefile(fn)).resolve().relative_to(ROOT).as_posix()
    return {
        "name": name,
        "module": fn.__module__.rsplit(".", 1)[-1],
        "line": fn.__code__.co_firstlineno,
        "file": file,
        "schema": str(schema),
        "summary": md(" ".join(l.strip() for l in doc["summary"])),
        "description": paragraphs(doc["description"]),
        "args": "\n".join(rows),
        "returns": paragraphs(doc["Returns"]),
        "mutated": mutated,
        "mutates": mutates,
        "raises": "\n".join(f"- `{k}`: {md(v)}" for k, v in raises),
        "source": paragraphs(doc["Source"]),
    }


def render() -> str:
    names = registered_ops()
    defs = python_defs()
    missing = [n for n in names if n not in defs]
    if missing:
        raise DocError(f"registered ops without a custom_op definition in dsv4_compile/ops: {missing}")
    ops = [describe(n, defs[n]) for n in names]
    order = list(GROUPS)
    ops.sort(key=lambda o: (order.index(o["module"]) if o["module"] in order else len(order), o["module"], o["line"]))
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])

    out = [
        "# `dsv4::` ops reference",
        "",
        "<!-- Generated by `python docs/gen_ops.py` from the registered op schemas and the op docstrings in",
        f"dsv4_compile/ops/ (torch {torch_mm}). Do not edit: edit the docstrings and rerun it;",
        "tests/test_docs.py fails when this file is not current. -->",
        "",
        f"Every op below is `torch.ops.dsv4.<name>` once `dsv4_compile` is imported ({len(ops)} ops). Each has",
        "a pure-PyTorch reference as its kernel on CPU (and any device), a Triton or CuTe-DSL kernel on",
        "CUDA, and a fake with the exact output shapes and strides, so it runs under `torch.compile`",
        "and CUDA graphs ([compile.md](compile.md)). Shapes use `T` tokens, `H` heads, `R` requests",
        "(block-table rows), `M` pages per request; the numerics and byte layouts the ops refer to are",
        "in [numerics.md](numerics.md). *Mutates* comes from the schema (`Tensor(a!)`); every other",
        "output is freshly allocated. Value checks (positions, slots, table entries in range) run on CPU",
        "tensors, and on every device under `DSV4_CHECK_INDICES=1`.",
        "",
        "| op | mutates | summary |",
        "|---|---|---|",
    ]
    for o in ops:
        mut = ", ".join(f"`{m}`" for m in o["mutated"]) or "—"
        out.append(f"| [`{o['name']}`](#dsv4{o['name']}) | {mut} | {cell(o['summary'])} |")
    group = None
    for o in ops:
        if o["module"] != group:
            group = o["module"]
            out += ["", f"## {GROUPS.get(group, group)}"]
        out += [
            "",
            f"### dsv4::{o['name']}",
            "",
            "```",
            o["schema"],
            "```",
            "",
            f"{o['summary']} Defined in `{o['file']}`.",
        ]
        if o["description"]:
            out += ["", o["description"]]
        out += [
            "", "**Arguments**", "", o["args"],
            "", "**Returns**", "", o["returns"],
            "", "**Mutates**", "", o["mutates"],
            "", "**Raises**", "", o["raises"],
            "", "**Source**", "", o["source"],
        ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if docs/ops.md differs from what would be generated")
    args = ap.parse_args(argv)
    try:
        text = render()
    except DocError as e:
        print(f"gen_ops: {e}", file=sys.stderr)
        return 2
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is not current: run `python docs/gen_ops.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
