"""The documentation points at things that exist: every relative link of README.md and
docs/*.md (and its #anchor) resolves, every `file.py:name` the pages name is a function,
class or method of that file (read with ast), the README's figure is a real PNG, and the
README stays short, with its two commands first."""
import ast
import glob
import os
import re

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR = re.compile(r"`([A-Za-z_]\w*\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")
FIRST_COMMANDS = ["pip install -r requirements.txt && bash run_demo.sh",
                  "pip install -r requirements-dev.txt && python -m pytest -q"]


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def without_code(text):
    """Markdown text without its fenced code blocks (where links and headings are not)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def heading_slugs(text):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*$", without_code(text), re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return slugs


def broken_links(page, text):
    """The relative links of a page whose file, or whose #anchor in a Markdown file, is missing."""
    broken = []
    for target in LINK.findall(without_code(text)):
        if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md"):
            with open(resolved) as f:
                if anchor not in heading_slugs(f.read()):
                    broken.append(target)
    return broken


def missing_anchors(text):
    """The `file.py:name` and `file.py:Class.method` anchors of a text that the file does
    not define at its top level (functions, classes) or in that class (methods)."""
    missing = []
    for filename, name in ANCHOR.findall(text):
        path = os.path.join(ROOT, filename)
        if not os.path.isfile(path):
            missing.append(f"{filename}:{name}")
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        defined = {node.name: node for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        outer, _, method = name.partition(".")
        node = defined.get(outer)
        if node is None or (method and not (isinstance(node, ast.ClassDef) and any(
                isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name == method for m in node.body))):
            missing.append(f"{filename}:{name}")
    return missing


def prose_words(text):
    """Words of a Markdown text outside code (fenced blocks, 4-space indented lines,
    inline code counts as words) and tables."""
    lines = [line for line in without_code(text).splitlines()
             if not line.startswith("    ") and not line.lstrip().startswith("|")]
    return len(" ".join(lines).split())


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = read(page)
    assert LINK.search(text) or page != "README.md"
    assert broken_links(page, text) == []


def test_link_checker_finds_a_broken_link_and_anchor():
    text = "[ok](docs/method.md) [a](docs/nowhere.md) [b](docs/method.md#no-such-heading) [c](https://x.org/y)"
    assert broken_links("README.md", text) == ["docs/nowhere.md", "docs/method.md#no-such-heading"]
    assert broken_links("README.md", "[ok](docs/method.md#the-method-and-its-conventions-in-one-page)") == []


@pytest.mark.parametrize("page", PAGES)
def test_named_functions_exist(page):
    assert missing_anchors(read(page)) == []


def test_walkthrough_steps_each_name_a_function():
    text = read("docs/walkthrough.md")
    reading = re.search(r"^## The reading\n(.*?)^## ", text, re.S | re.M).group(1)
    steps = re.split(r"^\d+\. ", reading, flags=re.M)[1:]
    assert len(steps) >= 12, "the walkthrough's reading has about a dozen steps"
    assert [step[:60] for step in steps if not ANCHOR.search(step)] == [], "each step names a file:function"


def test_anchor_checker_rejects_what_does_not_exist():
    good = "`tokenizer.py:AlignTok.frozen_reference` `losses.py:semantic_preservation_loss` `dit.py:sample`"
    assert missing_anchors(good) == []
    bad = ("`tokenizer.py:AlignTok.frozen_refrence` `losses.py:semantic_loss` `nowhere.py:main` "
           "`dit.py:sample.euler` `tokenizer.py:Decoder.frozen_reference`")
    assert missing_anchors(bad) == ["tokenizer.py:AlignTok.frozen_refrence", "losses.py:semantic_loss",
                                    "nowhere.py:main", "dit.py:sample.euler", "tokenizer.py:Decoder.frozen_reference"]


def test_demo_figure_is_a_png_of_reasonable_size():
    path = os.path.join(ROOT, "docs", "demo.png")
    assert "](docs/demo.png)" in read("README.md")
    assert 10_000 < os.path.getsize(path) < 1_000_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 2000 and 300 <= image.height <= 2000
        image.verify()        # a truncated or corrupt file raises here


def test_readme_is_short_and_starts_with_the_two_commands():
    text = read("README.md")
    assert prose_words(text) <= 2300
    commands = [line.strip() for line in text.splitlines() if line.startswith("    ")][:2]
    assert commands == FIRST_COMMANDS
    assert text.index(FIRST_COMMANDS[1]) < text.index("## ")


def test_prose_count_skips_code_and_tables():
    text = "one two\n\n```bash\nnot counted here\n```\n\n    indented code\n| a | table |\nthree `four`\n"
    assert prose_words(text) == 4
