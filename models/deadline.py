"""Request deadlines as the model loops see them: an absolute ``time.time()`` (it crosses process
boundaries with the job), or None for no deadline. A loop checks it once per denoising step, AR
token or verify round, and stops its row there, so work nobody waits for frees its batch slot."""

from __future__ import annotations

import time


def past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline
