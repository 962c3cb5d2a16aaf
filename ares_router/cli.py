"""`python -m ares_router ...` and `ares router ...`: the router process's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ares_router.config import ROUTER_POLICIES, RouterConfig
from ares_router.estimate import OutputEstimator
from ares_router.link_profile import DEFAULT_LINK, load_profiles
from ares_router.policy import DEFAULT_HOLD_MAX_WAIT_S, DEFAULT_RESERVE_TOKENS, Admission, LoadModel, max_wait_arg
from ares_router.policy.gate import RebalanceLimits


class _PrefillAction(argparse.Action):
    """`--prefill URL [BOOTSTRAP_PORT]`, repeatable (sglang_router's syntax)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not 1 <= len(values) <= 2:
            parser.error("--prefill takes URL [BOOTSTRAP_PORT]")
        port = None
        if len(values) == 2 and values[1].lower() != "none":
            try:
                port = int(values[1])
            except ValueError:
                parser.error(f"--prefill bootstrap port must be an integer, got {values[1]!r}")
        getattr(namespace, self.dest).append((values[0], port))


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the router's flags to `p`."""
    p.add_argument(
        "--prefill",
        nargs="+",
        action=_PrefillAction,
        default=[],
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill server and its KV bootstrap port (repeat per server)",
    )
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode server (repeat per server)")
    p.add_argument(
        "--policy",
        default="ares",
        choices=ROUTER_POLICIES,
        help="decode placement policy; the *_hold ones keep a request at the router while no decode server would "
        "admit it (late binding) instead of queueing it on one server",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=30000, help="port to listen on (0: any free port)")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between polls of every server")
    p.add_argument("--poll-timeout", type=float, default=2.0, help="seconds before a poll counts as failed")
    p.add_argument(
        "--stale-after",
        type=float,
        default=10.0,
        help="seconds without a successful poll before a server is no longer chosen",
    )
    p.add_argument(
        "--health-failure-threshold",
        type=int,
        default=3,
        help="failed polls in a row before a server is marked unhealthy (a refused connection: at once)",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to a backend")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds for a whole request (default: none)")
    p.add_argument("--retries", type=int, default=1, help="attempts on another server when one fails before a token")
    p.add_argument("--seed", type=int, default=None, help="seed of the random policy")
    p.add_argument("--horizon-tokens", type=int, default=LoadModel.horizon_tokens, help="load-model horizon (steps)")
    p.add_argument("--horizon-points", type=int, default=LoadModel.points, help="load-model grid points")
    p.add_argument("--use-upper", action="store_true", help="plan with the predicted upper quantile when reported")
    p.add_argument(
        "--reserve-tokens",
        type=int,
        default=DEFAULT_RESERVE_TOKENS,
        help="the decode servers' --num-reserved-decode-tokens: the policies place and migrate by SGLang's decode "
        "admission rule with it (ares_router.policy.admission)",
    )
    e = OutputEstimator()
    p.add_argument(
        "--estimate-base",
        type=float,
        default=e.base_tokens,
        help="initial output estimate: base tokens (until the decode head reports)",
    )
    p.add_argument(
        "--estimate-per-prompt-token",
        type=float,
        default=e.per_prompt_token,
        help="initial output estimate: tokens per prompt token",
    )
    p.add_argument("--estimate-cap", type=float, default=e.cap_tokens, help="initial output estimate: upper bound")
    p.add_argument(
        "--ares-hold-max-wait-s",
        type=max_wait_arg,
        default=DEFAULT_HOLD_MAX_WAIT_S,
        help="aging of requests held at the router (*_hold policies): one held this many seconds is released before "
        "any behind it, and holds them and new arrivals back while it fits nowhere; 'none': no aging "
        f"(default: {DEFAULT_HOLD_MAX_WAIT_S}, as the simulator's)",
    )
    p.add_argument(
        "--ares-rebalance",
        choices=["off", "on"],
        default="off",
        help="migrate running requests between decode servers as the policy plans (ares: predicted load; "
        "current_migrate: current load); off: placement only, so current_migrate places exactly like least_kv",
    )
    p.add_argument(
        "--ares-rebalance-policy",
        default=None,
        choices=ROUTER_POLICIES,
        help="the policy whose rebalancing plan is followed (default: --policy's own)",
    )
    p.add_argument("--ares-rebalance-interval", type=float, default=1.0, help="seconds between rebalancing rounds")
    lim = RebalanceLimits()
    p.add_argument("--ares-migrate-max-concurrent", type=int, default=lim.max_concurrent, help="migrations at once")
    p.add_argument(
        "--ares-migrate-per-instance",
        type=int,
        default=lim.per_instance,
        help="migrations at once per decode server (as source and as target each)",
    )
    p.add_argument(
        "--ares-migrate-max-per-request", type=int, default=lim.max_per_request, help="moves of one request at most"
    )
    p.add_argument(
        "--ares-migrate-request-cooldown",
        type=float,
        default=lim.request_cooldown_s,
        help="seconds before a moved request may move again",
    )
    p.add_argument(
        "--ares-migrate-confirm-rounds",
        type=int,
        default=lim.confirm_rounds,
        help="rounds in a row a (source, target) pair must be proposed before a migration starts",
    )
    p.add_argument(
        "--ares-migrate-slot-timeout",
        type=float,
        default=lim.slot_timeout_s,
        help="seconds after which a migration stuck on a hung server stops counting against the limits",
    )
    p.add_argument("--ares-migrate-max-stages", type=int, default=6, help="pre-copy stages of a migration")
    p.add_argument(
        "--ares-migrate-last-stage-tokens",
        type=int,
        default=32,
        help="pause the migrating request once at most this many KV positions are left to copy",
    )
    p.add_argument(
        "--ares-migrate-stage-delay",
        type=float,
        default=0.0,
        help="seconds between pre-copy stages (default 0; tests use it to keep a request on its source longer)",
    )
    p.add_argument(
        "--ares-migrate-link",
        default=DEFAULT_LINK,
        help="link profile that prices migrations for the rebalancing policy (ares_router/link_profile.py): "
        f"{', '.join(sorted(load_profiles()))}; with the KV bytes per token the decode servers report",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' (SGLang's --api-key); /health and /metrics stay open",
    )
    p.add_argument(
        "--admin-api-key",
        default=None,
        help="key for /ares/migrate, /flush_cache and the X-Ares-Decode pin (without it: loopback clients only); "
        "also sent to the servers on migration commands and flushes unless --backend-admin-api-key is given",
    )
    p.add_argument(
        "--backend-admin-api-key",
        default=None,
        help="the servers' SGLang --admin-api-key, sent on migration commands and /flush_cache "
        "(default: --admin-api-key)",
    )
    # Fault injection for the tests only: the named migration commands act, their answers are dropped.
    p.add_argument("--ares-test-lose-reply", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="relay worker processes serving the port (SO_REUSEPORT), with one brain process for the poller, policy, "
        "rebalancer and migration control (ares_router/brain.py); 1: everything in one process",
    )
    p.add_argument(
        "--brain-listen",
        default=None,
        metavar="HOST:PORT",
        help="also take relay workers of other hosts (started with --relay-of) on this TCP address; needs --brain-key",
    )
    p.add_argument(
        "--relay-of",
        default=None,
        metavar="HOST:PORT",
        help="run --workers relay workers on --port for the brain at HOST:PORT (no brain here); the same server flags "
        "as the brain's; needs --brain-key",
    )
    p.add_argument("--brain-key", default=None, help="the key a brain and its relay workers share over TCP")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (costs latency)")
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """A `RouterConfig` from parsed flags."""
    return RouterConfig(
        prefill=list(args.prefill),
        decode=list(args.decode),
        policy=args.policy,
        host=args.host,
        port=args.port,
        poll_interval_s=args.poll_interval,
        poll_timeout_s=args.poll_timeout,
        stale_after_s=args.stale_after,
        health_failure_threshold=args.health_failure_threshold,
        connect_timeout_s=args.connect_timeout,
        request_timeout_s=args.request_timeout,
        retries=args.retries,
        seed=args.seed,
        load_model=LoadModel(horizon_tokens=args.horizon_tokens, points=args.horizon_points, use_upper=args.use_upper),
        admission=Admission(reserve_tokens=args.reserve_tokens),
        estimator=OutputEstimator(
            base_tokens=args.estimate_base,
            per_prompt_token=args.estimate_per_prompt_token,
            cap_tokens=args.estimate_cap,
        ),
        log_level=args.log_level,
        access_log=args.access_log,
        hold_max_wait_s=args.ares_hold_max_wait_s,
        rebalance=args.ares_rebalance == "on",
        rebalance_interval_s=args.ares_rebalance_interval,
        rebalance_policy=args.ares_rebalance_policy,
        rebalance_limits=RebalanceLimits(
            max_concurrent=args.ares_migrate_max_concurrent,
            per_instance=args.ares_migrate_per_instance,
            max_per_request=args.ares_migrate_max_per_request,
            request_cooldown_s=args.ares_migrate_request_cooldown,
            confirm_rounds=args.ares_migrate_confirm_rounds,
            slot_timeout_s=args.ares_migrate_slot_timeout,
        ),
        migrate_max_stages=args.ares_migrate_max_stages,
        migrate_last_stage_tokens=args.ares_migrate_last_stage_tokens,
        migrate_stage_delay_s=args.ares_migrate_stage_delay,
        migrate_link=args.ares_migrate_link,
        api_key=args.api_key,
        admin_api_key=args.admin_api_key,
        backend_admin_api_key=args.backend_admin_api_key,
        test_lose_replies=tuple(args.ares_test_lose_reply),
        workers=args.workers,
        brain_listen=args.brain_listen,
        relay_of=args.relay_of,
        brain_key=args.brain_key,
    )


def run(args: argparse.Namespace) -> int:
    """Start the router and serve until SIGINT/SIGTERM."""
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"ares router: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        import uvloop  # lower per-request overhead when available (SGLang depends on it)

        uvloop.install()
    except ImportError:
        pass
    from ares_router.app import serve  # aiohttp is imported only when actually serving

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(config)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares router`."""
    p = sub.add_parser("router", help="run the ARES PD router (OpenAI-compatible; places requests by predicted load)")
    configure_parser(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m ares_router`."""
    parser = configure_parser(argparse.ArgumentParser(prog="python -m ares_router", description=__doc__))
    return run(parser.parse_args(argv))
