"""The errors of the store format, and the base of every error a user can fix.

They live on the ground floor so that every floor above (the shared core, both stages, the tools)
raises and catches one family. ``pipeline.errors`` re-exports ``PipelineError`` for the floors
above; the CLI prints these without a traceback.
"""


class PipelineError(Exception):
    """Bad input a user can fix; the message names the file, sample or key."""


class StoreFormatError(Exception):
    """Data on disk is missing, incomplete, of another format version, or inconsistent."""


class IncompatibleStudentError(PipelineError):
    """The student (tokenizer, chat template, temperature, vocabulary or visual geometry) cannot
    use the store; the message names the store's side and the student's."""
