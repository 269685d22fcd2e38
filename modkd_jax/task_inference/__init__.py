"""Task inference: which sub-network (or expert) an input nobody labelled with a task belongs to.

Every rule scores each seen task for every input of a batch; all of a
method's rules run in one compiled evaluation pass (``infer``), and the class
is then the chosen task's own prediction. Rules:

- ``max_prob`` (MIND's rule): the highest ``softmax(z_t / tau)``.
- ``top2_entropy`` (the reference's): of the two most confident tasks, the lower entropy.
- ``energy``: the highest ``logsumexp(z_t)`` (free energy, Liu et al. 2020).
- ``entropy``: the lowest entropy of ``softmax(z_t / tau)``.
- ``entropy_grad``: SupSup's one-shot rule (Wortsman et al. 2020), *per example*: every seen
  sub-network superposed with weight ``1/seen``, the task whose weight's increase lowers the
  entropy of the output over all seen classes fastest (``-dH/dalpha_t`` highest). The published
  rule takes the gradient of the entropy summed over a test batch, one task per batch.
- ``gauss_input``: ``log p(x | t)`` under task t's class-conditional Gaussians of the pixels
  (``gaussians.fit`` on t's training data when t ends).
- ``gauss_own``: the same in the penultimate features of t's own sub-network (frozen once t ends).
- ``gauss_first``: the same in the features of sub-network 0, one fixed space for all tasks.
- ``prototype``: the best cosine of the pixels to t's spherical k-means prototypes
  (``routing.prototype_scores``; the experts' router uses its own).

No rule stores an image: statistics are means, covariance factors and
centroids, kept in the method's state (``init_stats`` / ``fit_task``) so
checkpoints, resumes and exported sub-networks carry them. ``choose`` picks
the rule with the best task identification on validation data.
"""

from modkd_jax.task_inference.rules import (GAUSS_RULES, JOINT, LOGIT_RULES, LOGITS, REGISTRY, REPORTS, RULES,
                                            STAT_RULES, STATS, SUBNET_RULES, InferenceConfig, Rule, best_seen,
                                            choose, correct_counts, entropy_gradient, infer, infer_in_use, pixels,
                                            result_rules, rule_counts, scores, superpose, task_score)
from modkd_jax.task_inference.stats import bytes_per_task, fit_task, init_stats
from modkd_jax.task_inference.choice import choose_rule, head, inference_report, update_subnet_inference

__all__ = ["GAUSS_RULES", "JOINT", "LOGIT_RULES", "LOGITS", "REGISTRY", "REPORTS", "RULES", "STAT_RULES", "STATS",
           "SUBNET_RULES", "InferenceConfig", "Rule", "best_seen", "bytes_per_task", "choose", "choose_rule",
           "correct_counts", "entropy_gradient", "fit_task", "head", "infer", "infer_in_use", "inference_report",
           "init_stats", "pixels", "result_rules", "rule_counts", "scores", "superpose", "task_score",
           "update_subnet_inference"]
