"""Fine-tuning helpers: WiSE-FT weight merging (`merge`) and its accuracy sweep over α (`sweep`)."""

from clipforge.finetune.merge import check_alpha, merge_models, merge_state_dicts

__all__ = ["check_alpha", "merge_models", "merge_state_dicts"]
