"""The SGLang plugin: `--ares*` flags in SGLang's own CLI, startup errors, and no hooks when ARES is off."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ares.config import ENV_VAR, AresServerConfig, split_ares_args
from ares.cpu import add_cpu_default_flags


def _launch_server(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every SGLang launch this module checks, run two at a time: each spends ~10 s importing SGLang on one core,
    so run one by one they leave the other core idle. Keyed by test."""
    from ares.predictor.head import HeadConfig, LengthHead, save_head

    head = tmp_path_factory.mktemp("wrong-size-head") / "head"
    save_head(LengthHead(HeadConfig(hidden_size=32)), head)
    tiny_decode = ("--model-path", str(tiny_model), "--device", "cpu", "--disaggregation-mode", "decode", "--ares")
    launches = {
        "help": ("--help",),
        "prefill": ("--model-path", str(tiny_model), "--device", "cpu", "--disaggregation-mode", "prefill", "--ares"),
        "wrong_size": (*tiny_decode, "--ares-predictor", str(head)),
        "no_checkpoint": tiny_decode,
    }
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(launches, pool.map(lambda a: _launch_server(*a), launches.values()), strict=True))


def test_help_lists_ares_flags(launched):
    out = launched["help"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--ares " in out.stdout and "--ares-predictor" in out.stdout


def test_ares_on_prefill_server_is_a_startup_error(launched):
    out = launched["prefill"]
    assert out.returncode != 0
    assert "--ares is only valid on a PD decode server" in out.stderr + out.stdout


def test_split_ares_args_on_decode_implies_hidden_states():
    argv = ["--model-path", "m", "--disaggregation-mode", "decode", "--ares", "--device", "cpu"]
    config, rest = split_ares_args(argv)
    assert config == AresServerConfig(enabled=True, cpu_mode=True, predictor=None)
    assert "--ares" not in rest
    assert rest[-2:] == ["--return-hidden-states-mode", "last"]


def test_split_ares_args_off_changes_nothing():
    argv = ["--model-path", "m", "--disaggregation-mode=decode", "--port", "30000"]
    config, rest = split_ares_args(argv)
    assert config == AresServerConfig()
    assert rest == argv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ares"], "--disaggregation-mode null"),
        (["--ares", "--disaggregation-mode", "prefill"], "--disaggregation-mode prefill"),
        (["--ares", "--disaggregation-mode", "decode", "--return-hidden-states-mode", "full"], "last"),
        (["--ares-predictor", "x", "--disaggregation-mode", "decode"], "--ares-predictor needs --ares"),
        (["--ares-return-predictions", "--disaggregation-mode", "decode"], "--ares-return-predictions needs --ares"),
    ],
)
def test_split_ares_args_rejects(argv, message):
    with pytest.raises(ValueError, match=message):
        split_ares_args(argv)


def test_config_round_trips_through_environment():
    config = AresServerConfig(enabled=True, cpu_mode=False, predictor="/ckpt")
    assert AresServerConfig.from_env({ENV_VAR: config.to_env()}) == config
    assert AresServerConfig.from_env({}) == AresServerConfig()


def test_cpu_flags_respect_user_choices():
    argv = add_cpu_default_flags(["--attention-backend=triton", "--disaggregation-mode", "decode"], decode=True)
    assert argv.count("--attention-backend=triton") == 1 and "torch_native" not in argv
    assert argv[argv.index("--disaggregation-decode-retraction-backup") + 1] == "cpu_tensor"
    assert "--disaggregation-decode-retraction-backup" not in add_cpu_default_flags([], decode=False)


_PROBE = """
import json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
print(json.dumps({"targets": sorted(HookRegistry._hooks), "vllm": "vllm" in sys.modules}))
"""


def _probe_hooks(env_config: AresServerConfig | None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_config is not None:
        env[ENV_VAR] = env_config.to_env()
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    """The two hook probes, side by side (each a one-core SGLang import, as in `launched`)."""
    configs = {"off": None, "cpu": AresServerConfig(cpu_mode=True)}
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(configs, pool.map(_probe_hooks, configs.values()), strict=True))


def test_plugin_without_ares_installs_only_cli_hooks(probes):
    """SGLang loads the installed plugin; with ARES off it adds flags and nothing else."""
    from ares.plugin import CLI_HOOK_TARGETS

    probe = probes["off"]
    assert sorted(probe["targets"]) == sorted(CLI_HOOK_TARGETS)
    assert probe["vllm"] is False


def test_plugin_cpu_mode_installs_cpu_patches_in_children(probes):
    probe = probes["cpu"]
    assert probe["vllm"] is True


def test_predictor_of_the_wrong_size_fails_at_startup(launched):
    """A head trained for another hidden size stops the server before it loads anything, naming both sizes."""
    out = launched["wrong_size"]
    assert out.returncode != 0
    assert "checkpoint hidden size 32 does not match model hidden size 64" in out.stderr + out.stdout


def test_ares_without_a_fitting_checkpoint_fails_at_startup_naming_the_flag(launched):
    """The shipped head fits SmolLM2-135M only; another model with --ares and no --ares-predictor stops at startup."""
    out = launched["no_checkpoint"]
    assert out.returncode != 0
    assert "--ares needs a length-predictor checkpoint" in out.stderr + out.stdout
    assert "--ares-predictor PATH" in out.stderr + out.stdout


def test_shipped_checkpoint_is_the_default_for_smollm2(tmp_path):
    import json

    from ares.config import SHIPPED_PREDICTOR, SHIPPED_PREDICTOR_MODEL, resolve_predictor

    (tmp_path / "config.json").write_text(json.dumps({**SHIPPED_PREDICTOR_MODEL, "model_type": "llama"}))
    config = resolve_predictor(AresServerConfig(enabled=True), str(tmp_path))
    assert config.predictor == str(SHIPPED_PREDICTOR)
    assert resolve_predictor(AresServerConfig(enabled=True, predictor="/x"), str(tmp_path)).predictor == "/x"
    assert resolve_predictor(AresServerConfig(), "/nonexistent") == AresServerConfig()
