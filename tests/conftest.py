"""The suite's references are computed in float32: `--precision auto` means fp32 here on every
machine (a CPU with native bf16 would otherwise extract in bf16), in this process and in the
commands it starts. tests/test_precision.py sets bf16 explicitly where it tests it."""

import os

from stages.encoders.precision import AUTO_ENV

os.environ[AUTO_ENV] = "fp32"
