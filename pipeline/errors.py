"""The base of errors caused by user input (data, files, settings), reported without a traceback.

Defined with the store format (``schemas.errors``, the ground floor) so that every floor shares it.
"""

from schemas.errors import PipelineError

__all__ = ["PipelineError"]
