"""Human-readable logging and progress bars, one style for every command."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr as ``12:00:01 INFO  stage1.dump: message``; quiet noisy libraries."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=_FORMAT,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file bars while saving tiny checkpoints are noise
    for name in ("urllib3", "filelock", "datasets", "transformers", "PIL", "matplotlib", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A progress bar on stderr; on a non-terminal it redraws at most every 10 s to keep logs short."""
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            items,
            total=total,
            desc=desc,
            unit=unit,
            dynamic_ncols=True,
            mininterval=0.2 if interactive else 10.0,
            file=sys.stderr,
        )
    )
