"""Keeps the documentation true to the code.

Run with `nox -s docs`, or directly:

    KERAS_BACKEND=jax python -m pytest docs/test_docs.py -q

Checks:

1. Every `ka.<name>` and `keras_adapters.<name>` (dotted further or not)
   written in `docs/**/*.md` or `README.md` exists in the package.
2. The fenced ```python blocks of every page under `docs/` (but those in
   `NOT_RUN`) run, top to bottom, in one namespace per page, in a temporary
   working directory. A block is skipped when the last non-blank line before
   its opening fence is `<!-- skip -->` (use it for snippets that need a
   pretrained preset, network access, or undefined names such as
   `train_ds`). Only `python` blocks run; `text`, `bash` and other blocks
   never do. Every `python` block, skipped or not, of every page and the
   README must compile.
3. Every relative link in `docs/**/*.md` and `README.md` points to an
   existing file or directory.
"""

import importlib
import pathlib
import re

import keras
import pytest

import keras_adapters

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
# Pages whose python blocks are not run yet, with the reason. Remove an entry
# once the page marks its non-runnable blocks with <!-- skip -->.
NOT_RUN = {}
# Pages whose python blocks run (relative to docs/): all others.
RUNNABLE_PAGES = sorted(
    name
    for name in (str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    if name not in NOT_RUN
)

SKIP_MARK = "<!-- skip -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
REFERENCE = re.compile(r"(?<![\w.])(ka|keras_adapters)((?:\.[A-Za-z_]\w*)+)")
LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _rel(path):
    return str(path.relative_to(ROOT))


def _blocks(text):
    """`[(language, first code line number (1-based), code, skipped)]`."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        previous = [line.strip() for line in lines[:i] if line.strip()]
        skipped = bool(previous) and previous[-1] == SKIP_MARK
        start = i + 1
        i = start
        while i < len(lines) and not (
            lines[i].strip().startswith(fence)
            and lines[i].strip().strip(fence[0]) == ""
        ):
            i += 1
        code = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[start:i]
        )
        blocks.append((language.lower(), start + 1, code, skipped))
        i += 1
    return blocks


def _without_code(text):
    """`text` with fenced blocks and inline code spans blanked out."""
    lines = text.splitlines()
    kept, fence = [], None
    for line in lines:
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            kept.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
            kept.append("")
        else:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _references():
    """`[(page, line, dotted name)]` for every `ka.x` / `keras_adapters.x`."""
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for match in REFERENCE.finditer(line):
                found.append((_rel(page), number, "keras_adapters" + match.group(2)))
    return found


def _resolve(dotted):
    """Imports or looks up `keras_adapters.a.b.c`; raises if it does not exist."""
    parts = dotted.split(".")
    obj = keras_adapters
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        # A submodule that the package does not import eagerly.
        obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_pages_exist():
    for name in ["index.md", "getting_started.md", "how_adapters_attach.md"]:
        assert (DOCS / name).is_file(), name


def test_api_references_exist():
    references = _references()
    assert references, "no ka.<name> references found; is the pattern broken?"
    missing = []
    for page, line, dotted in references:
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(f"{page}:{line}: {dotted}")
    assert not missing, "names the docs use but the package lacks:\n" + "\n".join(
        sorted(set(missing))
    )


def test_index_lists_the_public_api():
    index = (DOCS / "index.md").read_text()
    unlisted = [name for name in keras_adapters.__all__ if f"`ka.{name}" not in index]
    assert not unlisted, f"docs/index.md does not list {unlisted}"


PUBLIC_SUBMODULES = [
    "optimizers",
    "interop",
    "quantization",
    "distribution",
    "calibration",
    "workflows",
]


def test_api_reference_covers_the_public_api():
    """Every public name has a `::: keras_adapters.<name>` entry under docs/api/.

    Entries name public paths only (`keras_adapters.LoRA`, not the module that
    defines it), so the reference survives moves of internal modules.
    """
    entries = set()
    for page in sorted((DOCS / "api").glob("*.md")):
        entries.update(
            re.findall(r"^:::\s+(keras_adapters(?:\.\w+)*)\s*$", page.read_text(), re.M)
        )
    expected = {f"keras_adapters.{name}" for name in keras_adapters.__all__}
    expected |= {f"keras_adapters.{name}" for name in PUBLIC_SUBMODULES}
    assert not expected - entries, f"no API entry for {sorted(expected - entries)}"
    internal = {
        entry
        for entry in entries
        if entry.count(".") > 1 or entry.split(".")[1] not in keras_adapters.__all__
    }
    assert not internal, f"API entries through internal paths: {sorted(internal)}"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = _without_code(page.read_text())
        for number, line in enumerate(text.splitlines(), 1):
            for match in LINK.finditer(line):
                target = match.group(1)
                if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
                    continue  # http:, https:, mailto:, or an anchor on this page
                path = target.split("#", 1)[0]
                if not (page.parent / path).exists():
                    broken.append(f"{_rel(page)}:{number}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_blocks_parse():
    """Fence parsing sanity: every python block in every page compiles."""
    for page in PAGES:
        for language, line, code, _ in _blocks(page.read_text()):
            if language == "python":
                compile("\n" * (line - 1) + code, str(page), "exec")


@pytest.fixture
def clean_keras(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy(policy)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", RUNNABLE_PAGES)
def test_runnable_blocks(name, clean_keras):
    page = DOCS / name
    blocks = [
        (line, code)
        for language, line, code, skipped in _blocks(page.read_text())
        if language == "python" and not skipped
    ]
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        # Padding keeps line numbers in tracebacks equal to the page's.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
