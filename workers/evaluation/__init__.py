"""Evaluation protocols (methods.md section 4) and `attnseg evaluate`."""
