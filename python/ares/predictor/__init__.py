"""Remaining-output-length prediction from the serving model's own hidden state (the ARES/STAR head)."""
