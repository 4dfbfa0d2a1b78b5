"""Entry-point helpers shared by every script."""
from __future__ import annotations

import sys
from typing import Callable

from utils.errors import UserError


def main_guard(main: Callable[[], object]) -> None:
    """Run ``main``; a UserError prints one readable paragraph and exits 2, no traceback."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
