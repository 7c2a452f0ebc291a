"""The base of errors caused by user input (data, files, settings), reported without a traceback."""


class PipelineError(Exception):
    """Bad input a user can fix; the message names the file, sample or key."""
