"""MEND (Mitchell et al. 2022): the editor and its Lightning module."""
