"""Check every jax entry point our code uses against a jax release's source, without importing it.

    python scripts/check_jax_api.py                          # the installed jax
    python scripts/check_jax_api.py --source jax-0.11.2-py3-none-any.whl \
        --write tests/fixtures/jax_api/jax-0.11.2.json       # another release, as a committed fixture

The GPU machine runs jax 0.11.2 on Python 3.12; this machine has jax 0.10.2 on Python 3.11,
where jax 0.11.2 cannot be installed or imported. So the check is static: it reads our
modules (``qlora_jax``, ``pallas_kernels``, ``scripts``) with ``ast``, collects every
dotted name rooted at a jax import (``jax.shard_map``, ``pl.ds``, ``jax.memory.Space.Host``,
``P``...) and the keywords each call passes, then resolves each name in the release's
own source: through ``from x import y as y`` re-exports, ``types.SimpleNamespace``
namespaces (``jax.memory``, ``jax.checkpoint_policies``) and class bodies, down to the
``def`` or ``class`` that defines it, whose parameters must accept those keywords.
Python 3.11's parser does not read PEP 695 syntax (``def f[T](...)``, ``type X = ...``),
which jax 0.11 uses, so type parameters are stripped before parsing; the one file that
still does not parse (a Mosaic GPU module with PEP 701 f-strings) is outside our use.
A name served only through a module ``__getattr__`` (jax's deprecation shims) counts as
missing: it is on its way out. ``tests/test_jax_api.py`` runs this against the installed
jax (and checks the static answers against the imported module) and against the committed
0.11.2 fixture. Download the wheel with
``pip download --no-deps --only-binary=:all: --python-version 3.12 jax==0.11.2``.
"""

import argparse
import ast
import dataclasses
import json
import re
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUR_CODE = ("qlora_jax", "pallas_kernels", "scripts")
_TYPE_PARAMS = re.compile(r"^(\s*(?:async\s+)?(?:def|class)\s+\w+)\[", re.M)
_TYPE_STATEMENT = re.compile(r"^(\s*)type\s+(\w+)(\[[^=]*\])?\s*=", re.M)
_SIMPLE_NAMESPACE = ("SimpleNamespace", "types.SimpleNamespace")


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a dotted name resolves to: its kind and, for callables, the keywords it takes.

    ``params`` is None when the keywords cannot be read statically (a value built by a
    call, a class without ``__init__`` or fields); ``varkw`` means ``**kwargs``.
    """

    kind: str  # "module" | "function" | "class" | "value" | "namespace"
    params: tuple[str, ...] | None = None
    varkw: bool = False

    def rejects(self, keywords) -> list[str]:
        """The keywords of ``keywords`` a call would be refused (none when unknown)."""
        if self.params is None or self.varkw:
            return []
        return sorted(k for k in keywords if k not in self.params)


def strip_type_params(source: str) -> str:
    """Remove PEP 695 type parameter lists and ``type`` statements so Python 3.11 can parse ``source``."""
    pieces, position = [], 0
    for match in _TYPE_PARAMS.finditer(source):
        depth, i = 1, match.end()
        while depth:
            depth += {"[": 1, "]": -1}.get(source[i], 0)
            i += 1
        pieces.append(source[position:match.end() - 1])
        position = i
    pieces.append(source[position:])
    return _TYPE_STATEMENT.sub(r"\1\2 =", "".join(pieces))


# Our side: what we use.

def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to jax modules or names by this file's imports: ``{"pl": "jax.experimental.pallas"}``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "jax" or alias.name.startswith("jax."):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "jax"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "jax" or node.module.startswith("jax."):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def references(roots=OUR_CODE, repo: Path = REPO) -> dict[str, set[str]]:
    """Every jax name our code uses (longest dotted chain) -> the keywords passed where it is called."""
    used: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            tree = ast.parse(path.read_text())
            aliases = _aliases(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute | ast.Name) and not isinstance(getattr(node, "ctx", None), ast.Store):
                    parts = _dotted(node)
                    if parts and parts[0] in aliases and not parts[-1].startswith("__"):
                        used.setdefault(".".join([aliases[parts[0]], *parts[1:]]), set())
                if isinstance(node, ast.Call):
                    parts = _dotted(node.func)
                    if parts and parts[0] in aliases:
                        name = ".".join([aliases[parts[0]], *parts[1:]])
                        used.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
    # Keep only the longest chains: "jax.memory.Space.Host" covers "jax.memory" and "jax.memory.Space".
    return {name: kws for name, kws in used.items()
            if kws or not any(other.startswith(name + ".") for other in used)}


# Their side: a jax source tree.

class Source:
    """A jax source tree (the folder holding ``jax/``), read with ``ast`` only."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._modules: dict[str, ast.Module | None] = {}
        self._visiting: set[tuple[str, str]] = set()  # (module, name) lookups in progress: import cycles

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._modules:
            base = self.root.joinpath(*dotted.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            try:
                self._modules[dotted] = ast.parse(strip_type_params(path.read_text())) if path else None
            except SyntaxError:
                self._modules[dotted] = None
        return self._modules[dotted]

    def resolve(self, dotted: str) -> Entry | None:
        """The definition ``dotted`` names in this tree, or None if the tree does not define it."""
        parts = dotted.split(".")
        return self._attributes(("module", parts[0], None), parts[1:])

    # A "target" is ("module", dotted, None), ("class", module, ClassDef), ("function", module, FunctionDef),
    # ("namespace", module, Call), ("instance", module, ClassDef) (``config = Config()``), ("method", module,
    # FunctionDef) (a function looked up on an instance) or ("value", module, None).

    def _attributes(self, target, names):
        for name in names:
            target = self._member(target, name)
            if target is None:
                return None
        return self._entry(target)

    def _member(self, target, name):
        kind, where, node = target
        if kind == "module":
            return self._lookup(where, name)
        if kind == "namespace":
            value = next((k.value for k in node.keywords if k.arg == name), None)
            return None if value is None else self._expression(where, value)
        if kind == "class":
            return self._class_member(where, node, name)
        if kind == "instance":
            found = self._class_member(where, node, name)
            return ("method", found[1], found[2]) if found and found[0] == "function" else found
        return None

    def _lookup(self, module: str, name: str):
        if (module, name) in self._visiting:
            return None
        self._visiting.add((module, name))
        tree = self.module(module)
        found = None
        for statement in _top_level(tree.body) if tree else ():
            found = self._binding(module, statement, name) or found
        self._visiting.discard((module, name))
        if found is None and self.module(f"{module}.{name}") is not None:
            found = ("module", f"{module}.{name}", None)
        return found

    def _binding(self, module: str, statement: ast.stmt, name: str):
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef) and statement.name == name:
            return ("function", module, statement)
        if isinstance(statement, ast.ClassDef) and statement.name == name:
            return ("class", module, statement)
        if isinstance(statement, ast.ImportFrom):
            source = _absolute(module, statement, self.module(module) is not None and self._is_package(module))
            for alias in statement.names:
                if (alias.asname or alias.name) == name:
                    outside = source.split(".")[0] != "jax"  # numpy's dtype, inf, nan... re-exported
                    return ("value", source, None) if outside else self._lookup(source, alias.name)
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.asname == name:
                    return ("module", alias.name, None)
        targets = (statement.targets if isinstance(statement, ast.Assign)
                   else [statement.target] if isinstance(statement, ast.AnnAssign) and statement.value else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if _wraps_itself(statement.value, name):  # jit = api_boundary(jit, ...): the def above stands
                return None
            return self._expression(module, statement.value)
        return None

    def _is_package(self, module: str) -> bool:
        return self.root.joinpath(*module.split("."), "__init__.py").is_file()

    def _expression(self, module: str, value: ast.expr):
        if isinstance(value, ast.Call):
            callee = _dotted(value.func)
            if callee and ".".join(callee) in _SIMPLE_NAMESPACE:
                return ("namespace", module, value)
            made = self._expression(module, value.func) if callee else None
            if made and made[0] == "class":  # config = Config(): its attributes are the class's
                return ("instance", made[1], made[2])
            return ("value", module, None)
        parts = _dotted(value)
        if parts is None:
            return ("value", module, None)
        target = self._lookup(module, parts[0])
        for attribute in parts[1:]:
            target = target and self._member(target, attribute)
        return target or ("value", module, None)

    def _class_member(self, module: str, node: ast.ClassDef, name: str):
        for statement in node.body:
            found = self._binding(module, statement, name)
            if found is None and isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
                    and statement.target.id == name:
                found = ("value", module, None)
            if found:
                return found
        for base in node.bases:
            parent = self._expression(module, base)
            if parent[0] == "class":
                found = self._class_member(parent[1], parent[2], name)
                if found:
                    return found
        return None

    def _entry(self, target) -> Entry:
        kind, where, node = target
        if kind == "function":
            return _signature(node, skip_self=False)
        if kind == "method":
            return _signature(node, skip_self=True)
        if kind == "class":
            init = self._class_member(where, node, "__init__")
            if init and init[0] == "function":
                signature = _signature(init[2], skip_self=True)
                return Entry("class", signature.params, signature.varkw)
            fields = self._fields(where, node)
            return Entry("class", tuple(fields) if fields else None)
        return Entry(kind)

    def _fields(self, module: str, node: ast.ClassDef) -> list[str]:
        """Annotated fields of a dataclass or NamedTuple, bases first."""
        fields = []
        for base in node.bases:
            parent = self._expression(module, base)
            if parent[0] == "class":
                fields += self._fields(parent[1], parent[2])
        return fields + [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                         and isinstance(s.target, ast.Name)]


def _top_level(body):
    """Statements at module level, including those inside ``if``/``try``/``with`` blocks."""
    for statement in body:
        yield statement
        for block in ("body", "orelse", "finalbody"):
            if isinstance(statement, ast.If | ast.Try | ast.With):
                yield from _top_level(getattr(statement, block, []))
        for handler in getattr(statement, "handlers", []):
            yield from _top_level(handler.body)


def _wraps_itself(value: ast.expr, name: str) -> bool:
    return (isinstance(value, ast.Call) and bool(value.args) and isinstance(value.args[0], ast.Name)
            and value.args[0].id == name)


def _absolute(module: str, statement: ast.ImportFrom, is_package: bool) -> str:
    if statement.level == 0:
        return statement.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - statement.level + 1]
    return ".".join(package + ([statement.module] if statement.module else []))


def _signature(node: ast.FunctionDef, skip_self: bool) -> Entry:
    args = node.args
    names = [a.arg for a in args.args + args.kwonlyargs]
    if skip_self and names:
        names = names[1:]
    return Entry("function", tuple(names), args.kwarg is not None)


# Checks.

def check(source: Source | dict, used: dict[str, set[str]]) -> list[str]:
    """Problems, one line each: names the source lacks and keywords its definitions refuse."""
    problems = []
    for name, keywords in sorted(used.items()):
        entry = source.resolve(name) if isinstance(source, Source) else _from_json(source.get(name))
        if entry is None:
            problems.append(f"{name}: not defined")
        elif entry.rejects(keywords):
            problems.append(f"{name}: does not take {', '.join(entry.rejects(keywords))}")
    return problems


def surface(source: Source, used: dict[str, set[str]]) -> dict:
    """The resolved entries of ``used`` as JSON (the committed fixture for a release we cannot install)."""
    out = {}
    for name in sorted(used):
        entry = source.resolve(name)
        out[name] = None if entry is None else dataclasses.asdict(entry)
    return out


def _from_json(item) -> Entry | None:
    if item is None:
        return None
    params = item["params"]
    return Entry(item["kind"], None if params is None else tuple(params), item["varkw"])


def _open_source(path: Path, scratch: Path) -> tuple[Source, str]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            wheel.extractall(scratch)
        root = scratch
    else:
        root = path
    version = re.search(r'_version = "([^"]+)"', (root / "jax" / "version.py").read_text())
    return Source(root), version.group(1) if version else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a jax wheel or a folder holding jax/ (default: installed jax)")
    parser.add_argument("--write", type=Path, help="write the resolved entries as JSON (a test fixture)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.source is None:
            import jax
            args.source = Path(jax.__file__).parent.parent
        if not args.source.exists():
            print(f"error: {args.source} does not exist", file=sys.stderr)
            return 2
        source, version = _open_source(args.source, Path(scratch))
        used = references()
        problems = check(source, used)
        print(f"jax {version}: {len(used)} names used by our code, {len(problems)} problems")
        for line in problems:
            print(f"  {line}")
        if args.write:
            args.write.parent.mkdir(parents=True, exist_ok=True)
            args.write.write_text(json.dumps({"jax": version, "entries": surface(source, used)}, indent=1) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
