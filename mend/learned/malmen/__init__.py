"""MALMEN (Tan et al. 2024): the solve and split backward (``solve``), the hypernetwork (``hypernet``), the Lightning
module and the editor."""
