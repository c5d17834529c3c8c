"""Analysis instruments: expert usage per task, gradient conflicts between tasks, checkpoint comparisons,
statistics over seeds."""

from .conflicts import (ConflictReport, GradientConflicts, gradient_conflicts, measure_conflicts, pair_key,
                        pair_label, parameter_groups, plot_conflict_evolution, plot_conflict_matrices,
                        task_gradient_cosines)
from .experts import ExpertUsage, expert_usage, plot_heatmaps
from .stats import bootstrap_interval, mean_std, summarize

__all__ = ["ExpertUsage", "expert_usage", "plot_heatmaps", "task_gradient_cosines", "gradient_conflicts",
           "GradientConflicts", "ConflictReport", "measure_conflicts", "parameter_groups", "pair_key", "pair_label",
           "plot_conflict_matrices", "plot_conflict_evolution", "bootstrap_interval", "mean_std", "summarize"]
