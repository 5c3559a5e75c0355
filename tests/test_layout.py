"""The files stand in layers (README, project map): a file imports only project files of a
lower layer or of its own bottom layer, so no model depends on a script and nothing
depends on the tokenizer that does not use it."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    {"layers", "training", "harness", "weights", "data", "latents", "plot", "claims"},
    {"tokenizer", "dit", "losses", "inception"},
    {"vae"},
    {"sample", "bench"},
    {"train_stand_in", "train_tokenizer", "train_diffusion", "evaluate"},
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


ARCHIVE_MAGIC = {b"PK\x03\x04": "zip/wheel", b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz",
                 b"7z\xbc\xaf": "7z"}


def tracked_files():
    """The files git tracks (a clean clone's tree); every file under ROOT without git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(ROOT) for f in files
                if ".git" not in d.split(os.sep)]


def test_no_binary_archives_in_the_tree():
    """Wheels, zips and tarballs do not belong in a source tree (dependencies come from pip)."""
    found = []
    for name in tracked_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(512)
        kind = next((k for magic, k in ARCHIVE_MAGIC.items() if head.startswith(magic)), None)
        if kind or name.endswith((".whl", ".zip", ".tar", ".tgz", ".egg")) or head[257:262] == b"ustar":
            found.append(f"{name} ({kind or 'archive'})")
    assert not found, f"binary archives in the tree: {found}"
