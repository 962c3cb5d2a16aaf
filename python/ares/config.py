"""ARES server-side configuration: the `--ares*` flags, parsed out of SGLang's argv and handed to spawned children.

SGLang's ServerArgs is a sealed record, so ARES keeps its own settings. The launcher process parses them once and
stores them as JSON in an environment variable, which SGLang's scheduler/detokenizer subprocesses inherit.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

ENV_VAR = "ARES_SERVER_CONFIG"


@dataclass(frozen=True)
class AresServerConfig:
    """What the plugin does in this server: nothing unless `enabled` or `cpu_mode`."""

    enabled: bool = False  # --ares: length prediction and load reporting on a decode server
    cpu_mode: bool = False  # the server runs with --device cpu: apply ares.cpu patches
    predictor: str | None = None  # --ares-predictor: head checkpoint path (without suffix)
    return_predictions: bool = False  # --ares-return-predictions: per-token predictions in each response's meta_info
    admission: str = "sglang"  # --ares-admission: "sglang" | "predictive" (P90) | "predictive_point"
    # Set by the launcher process for its children: where the scheduler (TP rank 0) serves `/ares/state` reports.
    state_ipc: str | None = None
    migrate_ipc: str | None = None  # ... and where its migration agent takes commands

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AresServerConfig:
        """The configuration the launcher process stored; the default (all off) when none was stored."""
        raw = (environ if environ is not None else os.environ).get(ENV_VAR)
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def add_ares_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--ares*` flags (an argument group in `--help`)."""
    group = parser.add_argument_group("ARES (adaptive decode rescheduling)")
    group.add_argument(
        "--ares",
        action="store_true",
        help="Enable ARES on this decode server (requires --disaggregation-mode decode; "
        "implies --return-hidden-states-mode last).",
    )
    group.add_argument(
        "--ares-predictor",
        type=str,
        default=None,
        metavar="PATH",
        help="ARES length-predictor checkpoint (PATH.safetensors + PATH.json); checked at startup against the "
        "model's hidden size. Default: the shipped head when the model is SmolLM2-135M, else required.",
    )
    group.add_argument(
        "--ares-return-predictions",
        action="store_true",
        help="Add meta_info.ares_predicted_remaining to every response: per output token, the remaining length the "
        "head predicted at the decode step that produced it (null for tokens without one, e.g. the prefill's).",
    )
    group.add_argument(
        "--ares-admission",
        choices=("sglang", "predictive", "predictive_point"),
        default="sglang",
        help="Decode admission rule. sglang: SGLang's own (--num-reserved-decode-tokens per active request, and "
        "the largest running request's max_new_tokens, clipped at 4096). predictive: admit while the forecast KV "
        "peak of the running set plus the new request fits the pool, each request at its predicted remaining "
        "length (the head's P90, capped by max_new_tokens; a prior until the head has seen it). SGLang's "
        "retraction stays the safety net; /ares/state reports the mode, the forecast and the retractions. "
        "predictive_point: the same with each request at the head's point prediction instead of its P90.",
    )


# The shipped checkpoint was trained on SmolLM2-135M-Instruct; a model of exactly that shape gets it by default.
SHIPPED_PREDICTOR = Path(__file__).resolve().parent / "predictor" / "checkpoints" / "ours"
SHIPPED_PREDICTOR_MODEL = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


def model_config(model_path: str | None) -> dict:
    """The model directory's config.json (the text config for multimodal wrappers); {} when not a local dir."""
    config_file = os.path.join(model_path, "config.json") if model_path else None
    if not config_file or not os.path.isfile(config_file):
        return {}
    with open(config_file) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def resolve_predictor(config: AresServerConfig, model_path: str | None) -> AresServerConfig:
    """`config` with a predictor checkpoint: the one given, else the shipped head for a SmolLM2-135M-shaped model.

    Raises ValueError naming `--ares-predictor` when ARES is on and no checkpoint fits the model.
    """
    if not config.enabled or config.predictor:
        return config
    cfg = model_config(model_path)
    if cfg and all(cfg.get(k) == v for k, v in SHIPPED_PREDICTOR_MODEL.items()):
        return replace(config, predictor=str(SHIPPED_PREDICTOR))
    shape = {k: cfg.get(k) for k in SHIPPED_PREDICTOR_MODEL} if cfg else "unknown (not a local model directory)"
    raise ValueError(
        f"--ares needs a length-predictor checkpoint for model {model_path!r} (shape {shape}): pass "
        f"--ares-predictor PATH (train one with `ares predictor train`); the shipped head fits only SmolLM2-135M"
    )


def flag_value(argv: list[str], flag: str) -> str | None:
    """Value of `--flag X` or `--flag=X` in argv (last one wins, as argparse does), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def split_ares_args(argv: list[str]) -> tuple[AresServerConfig, list[str]]:
    """Parse the `--ares*` flags out of SGLang's argv; return the ARES config and argv without them.

    Raises ValueError for `--ares` on a server that is not a PD decode server.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_ares_args(parser)
    known, rest = parser.parse_known_args(argv)
    mode = flag_value(rest, "--disaggregation-mode") or "null"
    if known.ares and mode != "decode":
        raise ValueError(
            f"--ares is only valid on a PD decode server (--disaggregation-mode decode); this server has "
            f"--disaggregation-mode {mode}"
        )
    needs_ares = {
        "--ares-predictor": known.ares_predictor,
        "--ares-return-predictions": known.ares_return_predictions,
        f"--ares-admission {known.ares_admission}": known.ares_admission != "sglang",
    }
    for flag, value in needs_ares.items():
        if value and not known.ares:
            raise ValueError(f"{flag} needs --ares")
    config = AresServerConfig(
        enabled=known.ares,
        cpu_mode=flag_value(rest, "--device") == "cpu",
        predictor=known.ares_predictor,
        return_predictions=known.ares_return_predictions,
        admission=known.ares_admission,
    )
    hidden_mode = flag_value(rest, "--return-hidden-states-mode")
    if config.enabled and hidden_mode is None:
        # The length head reads the final hidden state of every decode step.
        rest = [*rest, "--return-hidden-states-mode", "last"]
    elif config.enabled and hidden_mode != "last":
        raise ValueError(f"--ares needs --return-hidden-states-mode last (got {hidden_mode})")
    return config, rest


def check_predictor(checkpoint: str, model_path: str | None) -> None:
    """Fail at startup when the head checkpoint cannot be read or does not fit the model's hidden size.

    Only a local model directory can be checked here; a hub id is checked when the scheduler loads the head.
    """
    from ares.predictor.head import load_head

    hidden = model_config(model_path).get("hidden_size")
    try:
        load_head(checkpoint, model_hidden_size=hidden)
    except (OSError, ValueError) as e:
        raise ValueError(f"--ares-predictor {checkpoint}: {e}") from e
