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


class ThroughputBar:
    """Samples done of a known total, with samples/s, tokens/s and ETA (tqdm computes rate and ETA)."""

    def __init__(self, total: int, desc: str):
        import time

        self._time = time.monotonic
        self._start = self._time()
        self.tokens = 0
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.2 if interactive else 10.0)

    def update(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(1e-9, self._time() - self._start)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(samples)

    def close(self) -> None:
        self.bar.close()
