"""The top floor: the command line and the tools built on both stages.

``cli`` (the ``pipeline`` command's table of jobs), ``demo``, ``inspect_store`` (statistics,
samples), ``render`` (the store's figures), ``data_check``, and the fixtures the tests and the demo
build from configs: ``tiny`` (tiny VLM checkpoints) and ``synthetic`` (the shapes VQA set). Nothing
below this floor imports from it.
"""
