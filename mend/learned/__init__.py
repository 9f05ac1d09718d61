"""Learned editors and what they share: the gradient factors of an edit (``factors``), the frozen lower blocks run
once per batch (``upper_blocks``), the hypernetwork's transform and statistics (``hypernet``), the Lightning
module's common part (``module``), the data module (``lit_data``), the run directory (``run_dir``), checkpoints
(``checkpointing``) and the training command (``train``, ``train_config``). One room per method: ``mend`` (one
edit's factors summed, Mitchell et al. 2022) and ``malmen`` (many edits, least squares, Tan et al. 2024)."""
