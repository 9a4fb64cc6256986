"""Paper workflows built on keras_adapters.

- LP-FT (Tomihari & Sato, NeurIPS 2024): `lp_ft`, `linear_probe`,
  `HeadNormCallback`, `head_norm`, with the head helpers `find_head` and
  `feature_extractor`. Temperature scaling and calibration errors live in
  `keras_adapters.calibration`.
- Low-rank teacher-student (Dayi & Chen, COLT 2025): the
  `keras_adapters.workflows.teacher_student` module.
"""

from keras_adapters.workflows import teacher_student
from keras_adapters.workflows.heads import feature_extractor
from keras_adapters.workflows.heads import find_head
from keras_adapters.workflows.lp_ft import HeadNormCallback
from keras_adapters.workflows.lp_ft import LPFTResult
from keras_adapters.workflows.lp_ft import head_norm
from keras_adapters.workflows.lp_ft import linear_probe
from keras_adapters.workflows.lp_ft import lp_ft

__all__ = [
    "HeadNormCallback",
    "LPFTResult",
    "feature_extractor",
    "find_head",
    "head_norm",
    "linear_probe",
    "lp_ft",
    "teacher_student",
]
