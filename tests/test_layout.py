"""The package's shape (issue 33): the core (``ncsn`` less ``ncsn.app`` and ``ncsn.tools``) imports neither Lightning
nor Hydra, the tools import the app only where they must, no import circle, no module over 400 lines, and the
names of earlier releases live in one table (``ncsn.moved``) and nowhere else."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from ncsn.moved import MOVED_MODULES, MOVED_NAMES, OLD_COMMANDS

SRC = ROOT / "src" / "ncsn"
MAX_LINES = 400
#: what the core must never load (lightning_utilities is torchmetrics' own dependency, not Lightning)
APP_ONLY = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_core(name: str) -> bool:
    """Everything but ncsn.app, ncsn.tools and the ``python -m`` hooks (``__main__``: they run a tool)."""
    return not (name.startswith(("ncsn.app", "ncsn.tools")) or name.endswith("__main__"))


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules ``path`` imports (``from a import b`` gives ``a`` and, where it is a module, ``a.b``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # a module-level `if TYPE_CHECKING:` or try block still runs at import
        nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(
            stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes += [n for stmt in tree.body if isinstance(stmt, ast.ClassDef) for n in ast.walk(stmt)
                  if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_core_imports_no_lightning_or_hydra():
    """Every module of the core, imported in a fresh interpreter, loads neither Lightning nor Hydra (nor OmegaConf)."""
    core = [name for name in all_modules() if is_core(name)]
    assert "ncsn.sigmas" in core and "ncsn.nets.layers" in core and "ncsn.metrics.quality" in core
    code = ("import importlib, json, sys\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {APP_ONLY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_the_core_never_imports_the_app_or_the_tools():
    """Not even inside a function: the core knows nothing of ncsn.app / ncsn.tools, nor of Lightning."""
    for name, path in all_modules().items():
        if not is_core(name):
            continue
        bad = {m for m in imports(path, top_level_only=False)
               if m.startswith(("ncsn.app", "ncsn.tools")) or m.split(".")[0] in APP_ONLY[:3]}
        bad |= {m for m in imports(path, top_level_only=True) if m.split(".")[0] in APP_ONLY}
        assert not bad, f"{name} imports {sorted(bad)}"


#: the app modules each tool imports when it is imported (module level); each builds a run's objects from its
#: config or reads a checkpoint, which the app owns. A new entry here is a new dependency of a command on the app.
TOOLS_NEED_THE_APP = {
    "ncsn.tools": set(),
    "ncsn.tools.convert": {"ncsn.app.checkpoints"},  # read_torch_file, trust_flag
    "ncsn.tools.official": set(),
    "ncsn.tools.report": set(),
    "ncsn.tools.report_jobs": {"ncsn.app.sweeps"},  # the sweep metadata the app writes
    "ncsn.tools.score": set(),
    "ncsn.tools.sigma_helper": {"ncsn.app.command_line"},  # composes conf/train.yaml as train.py does
}


def test_the_tools_import_the_app_only_where_they_must():
    tools = {name: path for name, path in all_modules().items() if name.startswith("ncsn.tools")}
    assert set(tools) == set(TOOLS_NEED_THE_APP)
    for name, path in tools.items():
        app = {m for m in imports(path, top_level_only=True) if m.startswith("ncsn.app")}
        app = {m for m in app if m in all_modules()}  # `from ncsn.app.x import y`: the module, not y
        assert app == TOOLS_NEED_THE_APP[name], name


def test_there_is_no_import_circle():
    """Module-level imports between ncsn's modules (a package's __init__ counts for its submodules) form no
    circle; imports inside functions (deferred on purpose) are not edges."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for m in imports(path, top_level_only=True):
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name:
                edges.add(m)
        graph[name] = edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_is_longer_than_400_lines():
    files = [*SRC.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"),
             ROOT / "train.py", ROOT / "sample.py"]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    long = {k: v for k, v in long.items() if k.startswith("src/")}  # tests and bench: not held to it (yet)
    assert not long


# ---------------------------------------------------------------------------------------------- old names
OLD = re.compile(r"(?<![\w.])(" + "|".join(re.escape(o) for o in sorted(MOVED_MODULES, key=len, reverse=True))
                 + r")(?!\w)")


def test_every_new_name_exists_and_no_old_module_is_left():
    modules = all_modules()
    for old, new in MOVED_MODULES.items():
        assert new in modules, new
        assert old not in modules or old == "ncsn.app", old  # ncsn.app is now the package
    for old, new in MOVED_NAMES.items():
        module, _, name = new.rpartition(".")
        text = modules[module].read_text() if module in modules else ""
        assert re.search(rf"^(def|class) {name}\b", text, re.MULTILINE), new


def test_the_old_names_live_only_in_the_table():
    """conf/, src/, tests/, bench/ and the entry points name the new places; only ncsn.moved (and the tests of
    it, and the README's history) knows the old ones."""
    files = [p for pattern in ("src/**/*.py", "tests/*.py", "bench/*", "conf/**/*.yaml") for p in ROOT.glob(pattern)]
    files += [ROOT / "train.py", ROOT / "sample.py"]
    for path in files:
        if path.name in ("moved.py", "test_layout.py", "test_earlier_releases.py") or not path.is_file():
            continue
        text = path.read_text()
        stale = [m.group(1) for m in OLD.finditer(text) if m.group(1) != "ncsn.app"]  # ncsn.app: the package now
        app_names = re.findall(r"(?<![\w.])ncsn\.app\.(\w+)", text) + re.findall(r"from ncsn\.app import (\w+)", text)
        stale += [f"ncsn.app.{n}" for n in app_names if not (SRC / "app" / f"{n}.py").exists()]
        stale += re.findall(r"ncsn\.data\.(?:ImageDataModule|ToyDataModule|per_device_batch_size)", text)
        assert not stale, f"{path.relative_to(ROOT)} names {sorted(set(stale))}"


def test_the_old_command_spellings_still_run():
    """``python -m ncsn.convert`` / ``ncsn.report`` / ``ncsn.schedule_cli`` run the tools (the README shows
    ``python -m ncsn.tools.<name>``); ``import ncsn.convert`` is refused: no old module exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for old in OLD_COMMANDS:
        run = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, env=env,
                             timeout=300, check=False)
        assert run.returncode == 0, (old, run.stderr[-2000:])
        assert run.stdout.strip(), old
    refused = subprocess.run([sys.executable, "-c", "import ncsn.convert"], capture_output=True, text=True, env=env,
                             check=False)
    assert refused.returncode != 0 and "No module named 'ncsn.convert'" in refused.stderr


# ---------------------------------------------------------------------------------------------- the README
def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout and design\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```\n", 2)[1].splitlines()


def named_in_layout() -> tuple[set[Path], list[str]]:
    """The files and folders the README's layout block names, and the names it gives that do not exist. A line at
    column 0 names paths from the repository root (``src/ncsn/app/`` then sets the folder of the lines below it);
    an indented line's first word is in that folder, and a folder there (``nets/``) is where its own description
    and continuation lines name files."""
    named: set[Path] = set()
    missing: list[str] = []
    base = pkg = ROOT
    for line in layout_block():
        indent = len(line) - len(line.lstrip())
        words = line.split()
        if not words:
            continue
        if indent == 0:
            base = ROOT / words[0] if words[0].startswith("src/") else ROOT
            pkg = base
            if words[0].startswith("src/"):
                named.add(base)
                words = words[1:]
        elif indent == 2:
            pkg = base / words[0] if words[0].endswith("/") else base
        for word in words:
            word = word.strip(",;:()")
            if not re.fullmatch(r"[\w./]+\.py|[\w]+/", word):
                continue
            places = [pkg / word, base / word, SRC / word, ROOT / word]
            found = next((p for p in places if p.exists()), None)
            if found is None:
                missing.append(word)
            else:
                named.add(found.resolve())
    return named, missing


def test_the_readme_layout_names_every_module_and_only_modules_that_exist():
    named, missing = named_in_layout()
    assert not missing, f"the README's layout names what does not exist: {missing}"
    modules = {p.resolve() for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {p.parent.resolve() for p in SRC.rglob("__init__.py")}
    unnamed = sorted(str(p.relative_to(SRC)) for p in (modules | packages) - named)
    assert not unnamed, f"the README's layout does not name: {unnamed}"
