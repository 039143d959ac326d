"""Silence the chatter of the tools an export drives (torch.onnx, onnxscript, ONNX Runtime's quantization): they print
progress and advice on stdout and as warnings/log records, and the CLI reports what matters itself."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Within the block: stdout is swallowed, warnings are ignored, and the named loggers (the root logger when none is
    named) drop records below ERROR; their levels are restored afterwards."""
    loggers = [logging.getLogger(n) for n in logger_names] or [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
