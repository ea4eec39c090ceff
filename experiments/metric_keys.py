"""The evaluation keys the ablation reads from the runs' metrics.jsonl, grouped by what is done with them.

The names are the trainer's (retromae_ds/evaluate.py); the lists fix the order of every table and report, so
the runs, the statistics and the report agree on one set without each spelling it out.
"""

from __future__ import annotations

# Final-evaluation keys of metrics.jsonl, in table order. "encoder_loss" (the last logged training
# window of the encoder MLM loss) is added by runs.final_metrics.
HELDOUT_MEAN_METRICS = ["heldout/mrr10_mean", "heldout/recall1_mean", "heldout/recall10_mean",
                        "heldout/recall100_mean"]  # the same queries ranked by mean-pooled cosine
EVAL_METRICS = ["lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean",
                "lee/ndcg10_cls", "heldout/mrr10", "heldout/recall1", "heldout/recall10",
                "heldout/recall100"] + HELDOUT_MEAN_METRICS
# Evaluation keys of the decoder (retromae_ds/evaluate.py cls_gain): only objectives with a decoder log
# them (not mlm), and they measure the decoder too, so they are not part of the step-0 encoder check.
DECODER_METRICS = ["cls_gain", "heldout/decoder_loss"]
TABLE_METRICS = EVAL_METRICS + DECODER_METRICS + ["encoder_loss"]
# Evaluation keys followed over training (the JSON report's "eval_curves", the markdown's curve tables).
CURVE_METRICS = ["cls_gain", "heldout/decoder_loss", "heldout/mrr10", "heldout/mrr10_mean", "lee/spearman_cls",
                 "lee/spearman_mean"]

# The metrics with an item level (held-out queries, Lee documents): they get bootstrap intervals.
RETRIEVAL_METRICS = ["heldout/mrr10", "heldout/recall1", "heldout/recall10", "heldout/recall100"]
LEE_CORR_METRICS = ["lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean"]
# retrieval by [CLS] (per-query ranks "ranks") and by mean pooling ("ranks_mean"), same queries
CI_METRICS = LEE_CORR_METRICS + ["lee/ndcg10_cls"] + RETRIEVAL_METRICS + HELDOUT_MEAN_METRICS
