"""Stage 0: answer a dataset's instructions with a VLM through vLLM (``pipeline run generate``)."""
