"""`python -m serve --stage m7 --model default --port 8000`: serve a stage over HTTP.

Every field of the stage's `EngineConfig` is an option (`--max-model-len`,
`--quantization`, ...; `--stage m7 --help` lists that stage's); the others say where to
listen and how many requests may wait. The server runs until SIGINT or SIGTERM, then
gives running requests `--shutdown-timeout` seconds, aborts the rest and exits.

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import signal
import sys
import threading
import time
import typing

from bench.stages import stages_with

DEFAULT_STAGE = stages_with("batching")[-1].split("_")[0]  # the newest


def stage_package(name: str) -> str:
    """The package of a stage given as `m7` or `m7_gptq`: one with a batching engine (M2
    on, the engine API the server drives)."""
    packages = {p.split("_")[0]: p for p in stages_with("batching")}
    package = packages.get(name, name if name in packages.values() else None)
    if package is None:
        raise SystemExit(f"error: --stage: {name!r} is not a stage with a batching engine; "
                         f"choose one of {', '.join(packages)}")
    return package


def _option_type(hint):
    """The argparse type of an EngineConfig field's type hint ("flag": a bool)."""
    if hint is bool:
        return "flag"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1:  # int | None
        hint = args[0]
    return hint if hint in (int, float, str) else str


def build_parser(package: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="An OpenAI-compatible server (completions, chat completions, "
                    "streaming) over one stage's engine.")
    p.add_argument("--stage", default=DEFAULT_STAGE,
                   help="the stage whose engine serves (m2 ... m7; default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait beyond a full batch; more answer 503")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds for running requests to finish before "
                        "they are aborted")
    config = importlib.import_module(f"{package}.config").EngineConfig
    engine = p.add_argument_group(f"engine settings ({package}.config.EngineConfig)")
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        kind, flag = _option_type(hints[field.name]), "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if kind == "flag":
            engine.add_argument(flag, dest=field.name, default=default,
                                action=argparse.BooleanOptionalAction,
                                help=f"(default {default})")
        else:
            engine.add_argument(flag, dest=field.name, type=kind, default=default,
                                help=f"(default {default})")
    return p


def parse_args(argv: list[str]) -> tuple[str, argparse.Namespace]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", default=DEFAULT_STAGE)
    known, _ = first.parse_known_args(argv)
    package = stage_package(known.stage)
    args = build_parser(package).parse_args(argv)
    if args.max_waiting < 0 or args.shutdown_timeout < 0 or not 0 < args.port < 65536:
        raise SystemExit("error: --max-waiting and --shutdown-timeout must be >= 0, --port "
                         "in [1, 65535]")
    return package, args


def make_server(package: str, args: argparse.Namespace):
    """(uvicorn server, engine loop) for the parsed arguments; the engine is built here."""
    import uvicorn

    from .app import build_app
    from .engine_loop import EngineLoop

    stage = importlib.import_module(package)
    config_class = importlib.import_module(f"{package}.config").EngineConfig
    names = [f.name for f in dataclasses.fields(config_class)]
    try:
        config = config_class(**{name: getattr(args, name) for name in names})
        engine = importlib.import_module(f"{package}.engine.llm_engine").LLMEngine(config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    loop = EngineLoop(engine, args.max_waiting)
    app = build_app(loop, args.served_model_name or config.model, stage.SamplingParams)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    return server, loop


def main(argv: list[str] | None = None) -> int:
    package, args = parse_args(sys.argv[1:] if argv is None else argv)
    server, loop = make_server(package, args)
    loop.start()

    def announce() -> None:  # once the socket listens
        while not (server.started or server.should_exit):
            time.sleep(0.05)
        if server.started:
            print(f"serving {args.served_model_name or args.model} ({package}) on "
                  f"http://{args.host}:{args.port}/v1", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again;
    # this process ignores that second one, so it ends with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # until SIGINT / SIGTERM (uvicorn handles both)
    finally:
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
