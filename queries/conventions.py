"""Conventions that differ between this project and the paper's code.

The logit scale. This project takes ``a`` itself (about 100 for CLIP: ``a = exp(model.logit_scale)``,
the manifest's ``logit_scale``). The paper's DataComp code takes its log (``4.6052 = log 100``),
where its other code takes ``a``. A value such as ``--logit-scale 4.6`` is almost surely the log
form: as ``a`` it is a temperature of 0.22, and every KL is computed on a nearly flat softmax. It is
accepted (a small ``a`` can be intended) with a warning that names ``--log-logit-scale``, which
takes the log form explicitly.
"""

from __future__ import annotations

import math

from clip_density_index.indexer.errors import InvalidParameter

#: Values of ``a`` at or below this look like the log form (exp(7) = 1097 covers CLIP's 100 and
#: SigLIP's ~112 with room to spare).
LOG_LIKE_MAX = 7.0
#: The largest ``--log-logit-scale`` accepted: exp(50) ~ 5e21, far beyond any trained model.
LOG_MAX = 50.0


def resolve_logit_scale(a: float | None, log_a: float | None) -> float | None:
    """``a`` from ``--logit-scale A`` or ``--log-logit-scale LOG_A`` (None when neither is given).

    >>> round(resolve_logit_scale(None, 4.6052), 2), resolve_logit_scale(100.0, None)
    (100.0, 100.0)

    Raises:
        InvalidParameter: both given, or a log form that is not a finite number up to 50.
    """
    if a is not None and log_a is not None:
        raise InvalidParameter(f"Give --logit-scale {a:g} (a) or --log-logit-scale {log_a:g} (log a), not both")
    if log_a is None:
        return a
    if not (math.isfinite(log_a) and log_a <= LOG_MAX):
        raise InvalidParameter(f"--log-logit-scale must be a finite number up to {LOG_MAX:g} (log a; CLIP's is "
                               f"4.6052), got {log_a!r}")
    return math.exp(log_a)


def log_like_warning(a: float | None, option: str = "--logit-scale") -> str | None:
    """A warning when ``a`` looks like the log form of a logit scale, else None.

    >>> log_like_warning(100.0) is None, "exp(4.6) = 99.48" in log_like_warning(4.6)
    (True, True)
    """
    if a is None or not (0 < a <= LOG_LIKE_MAX):
        return None
    return (f"{option} {a:g} looks like the log form of a logit scale (the paper's DataComp code passes "
            f"log a = 4.6052); this tool takes a itself, so {a:g} is used as a (a temperature of {1 / a:.3g}). "
            f"If you meant a = exp({a:g}) = {math.exp(a):.2f}, pass --log-logit-scale {a:g}")
