"""
The repository's modules import one way: no module imports one that imports it back, directly or
through others, counting imports anywhere in a file (a lazy import inside a function closes a loop too).

    python -m pytest tests/test_imports.py
"""

import ast
import os

from conftest import REPO


def local_imports(path, local):
    """The names in local that the file at path imports, at its top or inside a function."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & local


def import_loops(folders):
    """Each loop among the modules of folders (a script's folder is on its path, so a module is named by its
    file), as the list of modules it walks through back to the first, e.g. ['a', 'b', 'a']."""
    files = {name[:-3]: os.path.join(folder, name) for folder in folders for name in sorted(os.listdir(folder))
             if name.endswith('.py')}
    imports = {module: sorted(local_imports(path, set(files))) for module, path in files.items()}
    loops, done = [], set()

    def walk(module, path):
        if module in path:
            loop = path[path.index(module):] + [module]
            if set(loop) not in [set(seen) for seen in loops]:
                loops.append(loop)
            return
        if module in done:
            return
        for imported in imports[module]:
            walk(imported, path + [module])
        done.add(module)

    for module in imports:
        walk(module, [])
    return loops


def test_no_module_imports_one_that_imports_it_back():
    loops = import_loops([REPO, os.path.join(REPO, 'analysis')])
    assert not loops, 'imports that come back: ' + '; '.join(' -> '.join(loop) for loop in loops)


def test_a_loop_through_several_modules_or_a_lazy_import_is_found(tmp_path):
    (tmp_path / 'a.py').write_text('import os\nimport b\n')
    (tmp_path / 'b.py').write_text('from c import thing\n')
    (tmp_path / 'c.py').write_text('def thing():\n    import a.sub\n')  # lazily, inside a function
    (tmp_path / 'd.py').write_text('import a\n')  # imports into the loop, but is not in it
    (tmp_path / 'e.py').write_text('import e\nimport d\n')  # itself
    assert import_loops([tmp_path]) == [['a', 'b', 'c', 'a'], ['e', 'e']]
    (tmp_path / 'c.py').write_text('thing = 1\n')
    (tmp_path / 'e.py').write_text('import d\n')
    assert import_loops([tmp_path]) == []
