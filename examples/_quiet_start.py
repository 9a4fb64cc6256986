"""Hides TensorFlow's start-up noise in the examples' output, and nothing else.

TensorFlow 2.21 logs from C++ through absl before absl is initialized, so its
start-up lines ("oneDNN custom operations are on", "Could not find cuda
drivers on your machine", absl's "All log messages before
absl::InitializeLog() ..." banner) go straight to the process's standard error
(file descriptor 2), and `TF_CPP_MIN_LOG_LEVEL` no longer hides them (checked
with TensorFlow 2.21.0 at levels 1 to 3).

`hide_tensorflow_noise()` puts a line filter on descriptor 2 for the rest of
the process: a line that matches `NOISE` is dropped; every other line (Python
warnings and tracebacks, Keras' and keras_adapters' messages, any other
TensorFlow or XLA message) is written through unchanged. Call it before
importing TensorFlow, Keras or JAX. Set `KA_VERBOSE_STARTUP=1` to see
everything.
"""

import atexit
import os
import re
import sys
import threading

_NO_GPU_DRIVER = not os.path.exists("/proc/driver/nvidia/version")

# Messages that say nothing the user must act on. The cuInit failure is noise
# only on a machine without an NVIDIA driver (TensorFlow probes for one).
NOISE = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called",
            r"oneDNN custom operations are on",
            r"Could not find cuda drivers on your machine",
            r"oneDNN supports DT_INT64 only on platforms with AVX-512",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
        ]
        + ([r"failed call to cuInit"] if _NO_GPU_DRIVER else [])
    )
)

_started = False


def hide_tensorflow_noise():
    """Filters `NOISE` lines out of standard error (descriptor 2) from now on."""
    global _started
    if _started or os.environ.get("KA_VERBOSE_STARTUP"):
        return
    _started = True
    sys.stderr.flush()
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump():
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not NOISE.search(line.decode("utf-8", "replace")):
                    os.write(original, line)

    thread = threading.Thread(target=pump, name="quiet-start", daemon=True)
    thread.start()

    @atexit.register
    def _restore():
        # Puts the real stderr back, which closes the pipe's last write end in
        # this process, and lets the filter write what is left.
        sys.stderr.flush()
        os.dup2(original, 2)
        thread.join(timeout=5)
