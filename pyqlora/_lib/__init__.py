"""Compiled bindings to nf4core (built from bindings/*.pyx). Internal."""
