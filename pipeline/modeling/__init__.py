"""Model mechanics that both stages run on a HF VLM: batching of processor outputs, branch rows
(TPA), the instruction-to-visual attention probe (saliency, IRS) and logits at chosen rows.

Stage 1 runs them on the teacher, Stage 2 on the student; neither stage owns them.
"""
