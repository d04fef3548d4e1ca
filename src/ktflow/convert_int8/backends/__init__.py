"""The INT8 backends by name, in order of preference, and the choice among them."""

from __future__ import annotations

import logging
from pathlib import Path

from ktflow.convert_int8.backends.base import BackendUnavailable, Int8Backend
from ktflow.convert_int8.backends.kt_checkout import KtCheckoutBackend
from ktflow.convert_int8.backends.kt_kernel import KtKernelBackend
from ktflow.errors import KtflowInputError

log = logging.getLogger(__name__)

INT8_BACKENDS: dict[str, type[Int8Backend]] = {
    KtKernelBackend.name: KtKernelBackend,
    KtCheckoutBackend.name: KtCheckoutBackend,
}


def resolve_backend(kt_checkout: Path | None) -> Int8Backend:
    """The first backend that can run here (kt_kernel's API, else the checkout's script); else one error."""
    reasons: list[str] = []
    for backend in INT8_BACKENDS.values():
        try:
            found = backend.found(kt_checkout)
        except BackendUnavailable as why:
            reasons.append(str(why))
            continue
        if reasons:
            log.info("%s; using %s", "; ".join(reasons), found.name)
        return found
    remedies = " or ".join(backend.remedy for backend in INT8_BACKENDS.values())
    raise KtflowInputError(None, "--kt-checkout", f"{' and '.join(reasons)}: {remedies}")
