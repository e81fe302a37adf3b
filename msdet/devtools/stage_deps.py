"""Each DVC stage's code deps are exactly the project files its command imports: compute, check, rewrite.

The import closure is static (``ast``): every ``import``/``from`` of a project module anywhere in a file, imports
inside functions included, followed transitively, with each package's ``__init__.py``; imports under
``if TYPE_CHECKING:`` are left out (they never run). A module's compiled companion (``msdet/kernels/<name>.py``
builds ``<name>.cc`` at run time) and the headers that source includes with quotes are part of its code. The two
imports made by name at run time are resolved from the stage command's ``--model``: the detector registry
(``msdet.detectors.DETECTORS``: ``train_d0`` gets D0's code and not NanoDet's) and, in a closure that imports the
CPU kernel layer (training), that model's kernels (``msdet.kernels.MODEL_KERNELS``: ``train_d0`` gets no
NanoDet-only kernel source).

The same closure fingerprints the code a training run used (:func:`code_sha256`): a resume point left by other
code is not continued (see msdet/engine/trainer.py ``run_key``).

``python -m msdet.devtools.stage_deps`` lists the differences (exit 1 if any); ``--write`` (``make deps``)
rewrites the code entries of every stage's ``deps:`` in dvc.yaml, keeping the data entries and the comments.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import re
import shlex
import sys
from pathlib import Path

from msdet.kernels.build import local_includes

#: top-level packages of this project: imports of anything else (mindspore, numpy, ...) are not followed
PROJECT_PACKAGES = ("msdet", "stages")
REGISTRY_FILE = "msdet/detectors/__init__.py"
REGISTRY_NAME = "DETECTORS"
#: the CPU kernel layer's table of the kernels each model's training uses (modules ``KERNEL_PACKAGE.<name>``)
KERNEL_REGISTRY_FILE = "msdet/kernels/layer.py"
KERNEL_REGISTRY_NAME = "MODEL_KERNELS"
KERNEL_PACKAGE = "msdet.kernels"
#: a module's compiled companion (``msdet/kernels/depthwise_conv.py`` builds ``depthwise_conv.cc`` at run time) is
#: part of its code
NATIVE_SUFFIXES = (".cc",)


def module_file(root: Path, module: str) -> Path | None:
    """The file that defines ``module`` under ``root`` (package ``__init__.py`` or ``.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path) -> set[str]:
    """Dotted names of everything ``path`` imports (and, for ``from a import b``, ``a.b`` too: b may be a
    submodule), relative imports resolved."""
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1])  # the package a module (or an __init__) belongs to
    out: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(tree: ast.AST):
    """``ast.walk`` minus the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _literal_table(path: Path, name: str) -> dict:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no literal {name} table")


def detector_modules(root: Path) -> dict[str, str]:
    """``{model: module}`` from the registry's literal ``DETECTORS`` table."""
    table = _literal_table(root / REGISTRY_FILE, REGISTRY_NAME)
    return {name: entry[0] for name, entry in table.items()}


def kernel_modules(root: Path, model: str) -> list[str]:
    """The kernel modules ``model``'s training imports by name (``MODEL_KERNELS``); none without the table."""
    if not (root / KERNEL_REGISTRY_FILE).is_file():
        return []
    table = _literal_table(root / KERNEL_REGISTRY_FILE, KERNEL_REGISTRY_NAME)
    if model not in table:
        raise ValueError(f"model {model!r} is not in {KERNEL_REGISTRY_FILE} {KERNEL_REGISTRY_NAME}")
    return [f"{KERNEL_PACKAGE}.{name}" for name in table[model]]


def closure(root: Path, start: list[Path], model: str | None = None) -> set[Path]:
    """Project files reachable from ``start`` through imports, with their compiled companions (paths relative
    to ``root``); with ``model``, a closure that reaches the kernel layer's table also imports that model's
    kernel modules."""
    seen: set[Path] = set()
    todo = [root / p for p in start]
    registry = root / KERNEL_REGISTRY_FILE
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for native in (path.with_suffix(s) for s in NATIVE_SUFFIXES):
            if native.is_file():
                seen.add(native)
                seen.update(h for h in local_includes(native) if h.is_file())
        for module in imported_modules(path, root):
            parts = module.split(".")
            if parts[0] not in PROJECT_PACKAGES:
                continue
            # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            for i in range(1, len(parts) + 1):
                found = module_file(root, ".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
        if model is not None and path == registry:
            for name in kernel_modules(root, model):
                found = module_file(root, name)
                if found is None:
                    raise ValueError(f"{KERNEL_REGISTRY_FILE}: kernel module {name} not found")
                todo.append(found)
    return {p.relative_to(root) for p in seen}


def command_model(cmd: str) -> str | None:
    """The ``--model`` of a stage command, or None."""
    args = shlex.split(cmd)
    return args[args.index("--model") + 1] if "--model" in args else None


def command_roots(cmd: str, root: Path) -> list[Path]:
    """The files a stage command starts from: ``python -m pkg.mod`` or ``python path.py``, plus the detector
    module its ``--model`` selects."""
    args = shlex.split(cmd)
    if not args or not re.fullmatch(r"python3?", args[0]):
        raise ValueError(f"stage command {cmd!r}: expected 'python -m <module> ...' or 'python <file>.py ...'")
    if args[1] == "-m":
        parts = args[2].split(".")
        # `python -m a.b` runs a/__init__.py, then a/b.py
        found = [module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        if found[-1] is None:
            raise ValueError(f"stage command {cmd!r}: module {args[2]} not found under {root}")
        start = [f.relative_to(root) for f in found if f is not None]
    else:
        start = [Path(args[1])]
    if "--model" in args:
        model = args[args.index("--model") + 1]
        modules = detector_modules(root)
        if model not in modules:
            raise ValueError(f"stage command {cmd!r}: model {model!r} is not in {REGISTRY_FILE}")
        start.append(module_file(root, modules[model]).relative_to(root))
    return start


def is_code(path: str) -> bool:
    """A dep entry that names project code (as opposed to data, weights or a params file)."""
    return path.endswith(".py") or any(path == p or path.startswith(p + "/") for p in PROJECT_PACKAGES)


def expected_code_deps(cmd: str, root: Path) -> list[str]:
    return sorted(p.as_posix() for p in closure(root, command_roots(cmd, root), command_model(cmd)))


def code_sha256(cmd: str, root: Path) -> str:
    """SHA-256 over the path and content of every file the command imports (its code deps)."""
    digest = hashlib.sha256()
    for path in expected_code_deps(cmd, root):
        digest.update(path.encode() + b"\0" + hashlib.sha256((root / path).read_bytes()).digest())
    return digest.hexdigest()


def load_stages(root: Path) -> dict:
    from ruamel.yaml import YAML

    return YAML().load((root / "dvc.yaml").read_text())["stages"]


def differences(root: Path, stages: dict | None = None) -> list[str]:
    """One line per (stage, file) whose code dep is missing or not imported; empty when deps are honest.
    ``stages``: the ``stages`` mapping of a dvc.yaml (default: the project's)."""
    problems = []
    for name, stage in (load_stages(root) if stages is None else stages).items():
        if "foreach" in stage or "matrix" in stage:
            problems.append(f"{name}: foreach/matrix stages cannot list per-item code deps; write one stage per "
                            f"model")
            continue
        listed = {str(d) for d in stage.get("deps", []) if is_code(str(d))}
        wanted = set(expected_code_deps(stage["cmd"], root))
        for missing in sorted(wanted - listed):
            problems.append(f"{name}: imports {missing}, which its deps do not list")
        for extra in sorted(listed - wanted):
            problems.append(f"{name}: lists {extra}, which its command does not import")
    return problems


def rewrite(root: Path) -> int:
    """Set every stage's code deps to its closure (data deps first, as written); returns the stages changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = yaml.load(path.read_text())
    changed = 0
    for stage in doc["stages"].values():
        deps = stage.get("deps", [])
        data = [d for d in deps if not is_code(str(d))]
        new = data + expected_code_deps(stage["cmd"], root)
        if [str(d) for d in deps] != [str(d) for d in new]:
            stage["deps"] = new
            changed += 1
    tmp = path.with_name(path.name + ".tmp-deps")
    with open(tmp, "w") as f:
        yaml.dump(doc, f)
    tmp.replace(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    ap.add_argument("--root", default=".", help="project root (holds dvc.yaml)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.write:
        print(f"dvc.yaml: code deps of {rewrite(root)} stage(s) rewritten")
        return 0
    problems = differences(root)
    for line in problems:
        print(line)
    if problems:
        print("run `make deps` to rewrite the code deps in dvc.yaml", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
