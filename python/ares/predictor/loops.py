"""Greedy repetition loops: how the collector recognises them, and when it looks (no torch: the CLI imports it).

Greedy decoding that has repeated one cycle for `LOOP_SPAN` tokens practically never leaves it: no EOS-ended
response in the collected data has a periodic 256-token stretch, while 551 of the 916 that hit the length limit do
(`ares predictor features`, `loops_256`). Stopping them early frees their slot for a prompt that teaches the head
something; such records keep ``finish == "loop"`` and, like ``"length"``, count as censored.
"""

from __future__ import annotations

LOOP_SPAN = 256  # default of `ares predictor collect --stop-loops`
LOOP_MAX_PERIOD = 64
LOOP_CHECK_EVERY = 16  # the collector checks when a response reaches a multiple of this: at most 15 tokens late


def repeating_tail(tokens: list[int], span: int, max_period: int = LOOP_MAX_PERIOD) -> bool:
    """Whether the last `span` tokens repeat a cycle of <= `max_period` (and <= span / 4) tokens: a greedy loop."""
    if span <= 0 or len(tokens) < span:
        return False
    tail = tokens[-span:]
    # A period of at most a quarter of the span: at least four full cycles, never a coincidence of a few tokens.
    return any(tail[p:] == tail[:-p] for p in range(1, min(max_period, span // 4) + 1))


def loop_due(tokens: list[int], span: int) -> bool:
    """The collector's test after each new token: a check point is reached and the tail is a loop."""
    return span > 0 and len(tokens) % LOOP_CHECK_EVERY == 0 and repeating_tail(tokens, span)


def has_loop(tokens: list[int], span: int) -> bool:
    """Whether the collector with `span` would have stopped `tokens` at some check point."""
    return any(loop_due(tokens[:n], span) for n in range(LOOP_CHECK_EVERY, len(tokens) + 1, LOOP_CHECK_EVERY))
