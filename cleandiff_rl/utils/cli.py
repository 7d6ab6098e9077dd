"""The pipelines' command-line behaviour: a user's mistake is one line, not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf.errors import MissingMandatoryValue

# What a user can cause by what they type: bad values, missing files or settings, unbuilt datasets.

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingMandatoryValue)


def user_errors(main: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a pipeline's Hydra task: a user error prints `error: <message>` on stderr and exits with 2.

    HYDRA_FULL_ERROR=1 (Hydra's own switch) shows the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        try:
            return main(cfg)
        except USER_ERRORS as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = str(error).splitlines()[0] if isinstance(error, MissingMandatoryValue) else str(error)
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
