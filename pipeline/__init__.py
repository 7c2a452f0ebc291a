"""Offline Align-TI distillation for vision-language models.

``pipeline`` holds what both stages share: configuration, the command line, the data layer
(LLaVA-format records to model inputs with position sets) and the tiny model families used by
tests and the demo.
"""

__version__ = "0.1.0"
