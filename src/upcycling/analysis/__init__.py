"""The analysis stage (no torch): the store, the laws and their fits, break-even guidance, findings, figures, report."""
