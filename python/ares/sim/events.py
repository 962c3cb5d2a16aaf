"""The simulator's event kinds: what `ClusterSim.run` pops off its event heap, and each one's payload.

- `_STEP` (decode instance index, version): that instance's planned segment ends (stale once the version moved on).
- `_ARRIVE` request: its KV reached its decode instance, where it joins the batch at the next step boundary.
- `_MIGRATED` (request, source instance index, KV tokens): a migration's transfer and pause are over.
- `_POLL` None: the router polls every decode instance (`router_view`).
- `_PREFILLED` (request, prefill instance index): its prefill is done; its KV transfer asks for the links (`links`).

The numbers order nothing: events are (time, push sequence, kind, payload), so ties go in push order.
"""

_STEP, _ARRIVE, _MIGRATED, _POLL, _PREFILLED = 0, 1, 2, 3, 4
