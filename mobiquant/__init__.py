"""MoBiQuant."""
