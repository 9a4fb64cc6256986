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
   The README's python blocks run too (`test_readme_runs`).
3. Printed output: a ```text block that directly follows a run ```python
   block (only blank lines, or the mark below, between them) is that block's
   expected output.
   What the block prints must match it after this normalization:
   - whitespace: lines are stripped, runs of spaces become one space, blank
     lines are dropped;
   - `...` in the expected text matches any text (also across lines), as
     doctest's ELLIPSIS does;
   - integers (`22,098`, `4`) must be equal;
   - a number with a decimal point or an exponent (`4.79`, `1.2e-05`) matches
     a printed number within one unit of its last written digit (`4.79`
     accepts 4.78 to 4.80), so the docs may round;
   - after a `<!-- output: numbers vary -->` line (measured errors, timings),
     every such decimal number matches any number.
   A ```text block after a skipped block, or after prose, is not compared.
4. Every relative link in `docs/**/*.md` and `README.md` points to an
   existing file or directory.
5. `docs/api/*.md` has a `::: keras_adapters.<name>` entry for every name of
   `keras_adapters.__all__` and every public submodule, through public paths
   only (the site's API reference; `mkdocs build --strict` renders them).
"""

import contextlib
import importlib
import io
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
VARY_MARK = "<!-- output: numbers vary -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
REFERENCE = re.compile(r"(?<![\w.])(ka|keras_adapters)((?:\.[A-Za-z_]\w*)+)")
LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _rel(path):
    return str(path.relative_to(ROOT))


def _blocks(text):
    """`[(language, first code line number (1-based), code, skipped)]`."""
    return [block[:4] for block in _fenced(text)]


def _fenced(text):
    """`[(language, first code line, code, skipped, mark, follows_block)]`.

    `mark` is the last non-blank line before the opening fence; `follows_block`
    is true when only blank lines (and a `VARY_MARK`) separate the fence from
    the previous block.
    """
    lines = text.splitlines()
    blocks, i, previous_end = [], 0, None
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        previous = [line.strip() for line in lines[:i] if line.strip()]
        mark = previous[-1] if previous else ""
        follows = previous_end is not None and all(
            line.strip() in ("", VARY_MARK) for line in lines[previous_end + 1 : i]
        )
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
        blocks.append(
            (language.lower(), start + 1, code, mark == SKIP_MARK, mark, follows)
        )
        previous_end = i
        i += 1
    return blocks


def _runnable(text):
    """`[(first code line, code, expected output or None, numbers vary)]`."""
    blocks = _fenced(text)
    run = []
    for k, (language, line, code, skipped, _, _) in enumerate(blocks):
        if language != "python" or skipped:
            continue
        expected, vary = None, False
        if k + 1 < len(blocks):
            next_language, _, next_code, _, mark, follows = blocks[k + 1]
            if follows and next_language == "text":
                expected, vary = next_code, mark == VARY_MARK
        run.append((line, code, expected, vary))
    return run


NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+)(?![\w.])"
)
ANY_NUMBER = r"([-+]?(?:nan|inf|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))"


def _normalize(text):
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _tolerance(written):
    """One unit of the last written digit of `written` (`4.79` -> 0.01)."""
    mantissa, _, exponent = written.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def output_matches(expected, printed, vary=False):
    """Whether `printed` matches the documented `expected` output (see above)."""
    expected, printed = _normalize(expected), _normalize(printed)
    pattern, numbers, position = [], [], 0
    tokens = re.compile(r"\.\.\.|" + NUMBER.pattern)
    for match in tokens.finditer(expected):
        pattern.append(re.escape(expected[position : match.start()]))
        if match.group() == "...":
            pattern.append(".*?")
        else:
            pattern.append(ANY_NUMBER)
            numbers.append(match.group())
        position = match.end()
    pattern.append(re.escape(expected[position:]))
    found = re.fullmatch("".join(pattern), printed, re.DOTALL)
    if found is None:
        return False
    if vary:
        return True
    for written, value in zip(numbers, found.groups(), strict=True):
        if abs(float(value) - float(written)) > _tolerance(written) * 1.0001:
            return False
    return True


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


def _run_page(page, text, namespace):
    mismatches = []
    for line, code, expected, vary in _runnable(text):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            # Padding keeps line numbers in tracebacks equal to the page's.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
        if expected is not None and not output_matches(
            expected, printed.getvalue(), vary
        ):
            mismatches.append(
                f"{_rel(page)}:{line}: the block printed\n{printed.getvalue()}"
                f"but the page shows\n{expected}\n"
            )
    assert not mismatches, "printed output differs from the docs:\n" + "\n".join(
        mismatches
    )


@pytest.mark.parametrize("name", RUNNABLE_PAGES)
def test_runnable_blocks(name, clean_keras):
    page = DOCS / name
    _run_page(page, page.read_text(), {"__name__": "__docs__"})


def test_readme_runs(clean_keras):
    """The README's python blocks run as written and print what it shows."""
    readme = ROOT / "README.md"
    _run_page(readme, readme.read_text(), {"__name__": "__docs__"})


@pytest.mark.parametrize(
    "expected, printed, vary, result",
    [
        ("a  b\n\n c", "a b\nc\n", False, True),
        (
            "trainable 1,058 of 22,098 (4.79%)",
            "trainable 1,058 of 22,098 (4.79%)",
            0,
            1,
        ),
        ("trainable 1,058 of 22,098", "trainable 1,058 of 22,099", False, False),
        ("(4.79%)", "(4.8%)", False, True),
        ("(4.79%)", "(4.81%)", False, False),
        ("error 7.2e-05", "error 7.19e-05", False, True),
        ("error 7.2e-05", "error 9.1e-05", False, False),
        ("error 7.2e-05", "error 9.1e-05", True, True),
        ("['a', ..., 'z']", "['a', 'b', 'c', 'z']", False, True),
        ("x\n...\nz", "x\ny\ny\nz", False, True),
        ("x", "x\ny", False, False),
    ],
)
def test_output_comparison(expected, printed, vary, result):
    assert output_matches(expected, printed, vary) == bool(result)
