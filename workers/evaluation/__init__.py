"""Evaluation protocols (docs/methods.md section 4) and `attnseg evaluate`."""
