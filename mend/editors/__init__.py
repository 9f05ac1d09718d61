"""Editors that live in the framework itself (closed-form editors live in locate_edit)."""
