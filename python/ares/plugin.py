"""SGLang plugin entry point (`sglang.srt.plugins` group): adds the `--ares*` flags and installs ARES's hooks.

`register()` runs in every SGLang process. In the launcher process it only extends the argument parser and wraps
`prepare_server_args`, which splits off ARES's flags and stores the resulting config in the environment. Spawned
children (scheduler, detokenizer) read that config when their own `register()` runs. With neither `--ares` nor
`--device cpu`, no runtime hook is installed anywhere. With `--ares`, the launcher adds the `/ares/state` route and
the schedulers get the decode-step hooks (`ares.engine`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from dataclasses import replace

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from ares.config import (
    ENV_VAR,
    AresServerConfig,
    add_ares_args,
    check_predictor,
    flag_value,
    resolve_predictor,
    split_ares_args,
)

logger = logging.getLogger(__name__)

ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
PREPARE_SERVER_ARGS = "sglang.srt.server_args.prepare_server_args"
CLI_HOOK_TARGETS = (ADD_CLI_ARGS, PREPARE_SERVER_ARGS)


def _after_add_cli_args(_result, parser, *args, **kwargs):
    add_ares_args(parser)


def _around_prepare_server_args(original, argv, *args, **kwargs):
    config, argv = split_ares_args(list(argv))
    model_path = flag_value(argv, "--model-path")
    config = resolve_predictor(config, model_path)
    if config.predictor:
        check_predictor(config.predictor, model_path)
    if config.cpu_mode:
        from ares.cpu import add_cpu_default_flags

        argv = add_cpu_default_flags(argv, decode="decode" in argv)
    if config.enabled:
        ipc = os.path.join(tempfile.gettempdir(), f"ares-state-{os.getpid()}-{uuid.uuid4().hex[:8]}.ipc")
        config = replace(config, state_ipc=f"ipc://{ipc}", migrate_ipc=f"ipc://{ipc}.migrate")
    # Children spawned from here on inherit it; a stale value from the caller's shell is overwritten.
    os.environ[ENV_VAR] = config.to_env()
    install_runtime_hooks(config, launcher=True)
    return original(argv, *args, **kwargs)


def install_runtime_hooks(config: AresServerConfig, launcher: bool = False) -> list[str]:
    """Install what `config` asks for in this process (`launcher`: the process serving HTTP; else a spawned child
    such as a scheduler); return what was installed (empty when all is off)."""
    installed: list[str] = []
    if config.cpu_mode:
        from ares.cpu import apply_cpu_patches

        apply_cpu_patches()
        installed.append("cpu")
    if config.enabled:
        from ares import engine

        logger.info("ARES enabled on this decode server: %s", config)
        if launcher:
            engine.install_launcher(config)
        else:
            engine.install_scheduler(config)
        installed.append("ares")
    HookRegistry.apply_hooks()
    return installed


def register() -> None:
    """Plugin entry point, called by SGLang's `load_plugins()` in every process."""
    HookRegistry.register(ADD_CLI_ARGS, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(PREPARE_SERVER_ARGS, _around_prepare_server_args, HookType.AROUND)
    config = AresServerConfig.from_env()
    if config.enabled and not _called_from(SCHEDULER_ENTRY):
        # Children other than schedulers (detokenizer, DP controller) have nothing of ARES to run.
        config = replace(config, enabled=False)
    install_runtime_hooks(config)


SCHEDULER_ENTRY = "run_scheduler_process"  # sglang.srt.managers.scheduler: where scheduler processes load plugins


def _called_from(function_name: str) -> bool:
    """Whether a function of that name is on the current call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back
    return False
