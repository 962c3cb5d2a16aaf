"""ARES inside an SGLang decode server (only with `--ares`): the length head in every decode step, per-request
predictions in the scheduler, and the `/ares/state` load report.

Process map (SGLang 0.5.23):
- launcher process (HTTP server + tokenizer manager): `install_launcher` adds the `GET /ares/state` route;
- scheduler process of each rank: `install_scheduler` hooks the decode step (`ModelRunner.sample`), feeds the head's
  `[bs]` outputs through SGLang's auxiliary-output protocol to the scheduler (`consume`, aligned with `batch.reqs`),
  and on TP rank 0 starts the state service the route asks over a local ZMQ socket.
"""

from __future__ import annotations

from ares.config import AresServerConfig


def install_launcher(config: AresServerConfig) -> None:
    """Launcher process: serve `/ares/state` on SGLang's own HTTP app."""
    from ares.engine.http_routes import add_routes

    add_routes(config)


def install_scheduler(config: AresServerConfig) -> list[str]:
    """Scheduler processes: register the decode-step and scheduler hooks (applied by the caller); their targets."""
    from ares.engine.hooks import register_scheduler_hooks

    return register_scheduler_hooks(config)
