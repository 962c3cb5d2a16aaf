"""Remaining-output-length prediction from the serving model's own hidden state (the ARES/STAR head).

Engine use: ``head = load_head(path, model_hidden_size=H)``; per decode step
``point, p90 = head(hidden[bs, H], head.make_extra(generated[bs], prompt_len[bs]))`` (remaining tokens, >= 1),
where ``generated`` counts the tokens generated before this step (0 at the prefill's last position).
"""

from ares.predictor.features import extra_features
from ares.predictor.head import HeadConfig, LengthHead, load_head, save_head

__all__ = ["HeadConfig", "LengthHead", "extra_features", "load_head", "save_head"]
