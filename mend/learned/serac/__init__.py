"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale"): edits kept in a memory, a trained scope
classifier, and the base model answering in the light of the retrieved edit (docs/serac.md)."""
