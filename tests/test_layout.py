"""The files stand in layers (README, project map): a file imports only project files of a
lower layer or of its own bottom layer, so no model depends on a script and nothing
depends on the tokenizer that does not use it."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    {"layers", "training", "data", "latents", "plot"},
    {"tokenizer", "dit", "losses", "inception"},
    {"vae"},
    {"sample", "bench"},
    {"train_tokenizer", "train_diffusion", "evaluate"},
    {"ablations"},
]


def project_imports(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set().union(*LAYERS)


def test_every_file_imports_only_from_below():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} == set(level)
    for name in level:
        for imported in project_imports(name) - {name}:
            assert level[imported] < level[name] or (level[imported] == level[name] == 0), \
                f"{name}.py imports {imported}.py, which is not below it"
    bottom_edges = {(n, m) for n in LAYERS[0] for m in project_imports(n) - {n}}
    assert not {(m, n) for n, m in bottom_edges} & bottom_edges, "an import cycle in the bottom layer"
