"""The code's shape (README, Layout): imports go one way, with no cycle between files or
packages, and the code stays within its line budgets."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Scripts and the engine -> eval -> model -> backbone / dataset -> utils: a package may import
# only packages of a lower rank (and its own modules).
RANK = {'utils': 0, 'backbone': 1, 'dataset': 1, 'model': 2, 'eval': 3, '': 4}
PRETRAINING_PATH = ['local_nce.py', 'local_coclr.py', 'model/moco.py', 'model/losses.py',
                    'engine_pretrain.py', 'model/classifier.py']


def source_files():
    """Every non-test, non-bench Python file of the project, relative to the root."""
    files = sorted(ROOT.glob('*.py'))
    for package in RANK:
        if package:
            files += sorted((ROOT / package).glob('*.py'))
    return [f.relative_to(ROOT) for f in files]


def module_name(path):
    parts = list(path.with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path, ours):
    """Our modules that importing ``path`` runs, at module level or inside functions: the
    imported module and the packages above it (Python runs each package's ``__init__``)."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(filter(None, [package.rsplit('.', node.level - 1)[0]
                                              if node.level > 1 else package, base]))
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in ours else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split('.')
            found |= {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)} & ours
    return found - {name}


def import_graph():
    files = source_files()
    ours = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, ours) for f in files}


def find_cycle(graph):
    """A list of nodes forming a cycle, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def package_of(module):
    return module.split('.')[0] if '.' in module or module in RANK else ''


def test_the_graph_sees_imports():
    graph = import_graph()
    assert 'model.losses' in graph['model.moco']
    assert 'dataset.video_dataset' in graph['dataset.preview']   # a relative import
    assert 'dataset' in graph['dataset.preview']                 # its package runs first
    assert 'model.fast' in graph['engine_pretrain']              # imported inside a function


def test_no_import_cycle_between_files():
    assert find_cycle(import_graph()) is None


def test_imports_go_one_way_between_packages():
    graph = import_graph()
    wrong = [f'{a} -> {b}' for a, targets in graph.items() for b in targets
             if package_of(a) != package_of(b)
             and RANK[package_of(b)] >= RANK[package_of(a)]]
    assert not wrong
    packages = {}
    for a, targets in graph.items():
        packages.setdefault(package_of(a), set()).update(
            package_of(b) for b in targets if package_of(b) != package_of(a))
    assert find_cycle(packages) is None
    assert not packages['utils']    # utils imports nothing of ours


def lines(paths):
    return sum(len((ROOT / p).read_text().splitlines()) for p in paths)


def test_line_budgets():
    """Non-test, non-bench Python <= 4,800 lines; what a researcher reads to follow
    pretraining (the scripts, the model, the loop; not the GPU fast path) <= 1,000."""
    assert lines(source_files()) <= 4800
    assert lines(PRETRAINING_PATH) <= 1000
