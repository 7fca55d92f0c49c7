"""Behavioural checks of experts: signature hit rates on held-out questions."""
