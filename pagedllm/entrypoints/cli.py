"""The `pagedllm` command: generate, chat, plugins."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from pagedllm.bench.cli import add_bench_parser
from pagedllm.core.config import EngineConfig, load_config_file


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field; unset flags stay absent so the config file can fill them."""
    parser.add_argument("--config", help="YAML file of engine options (flat keys); flags override it.")
    group = parser.add_argument_group("engine options")
    for name, (_, field) in EngineConfig.option_fields().items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = str(field.type)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list"):
            kwargs["nargs"] = "*"
        elif kind.startswith("int"):
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        group.add_argument(flag, **kwargs)


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None, help="Per-request sampling seed.")
    group.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = load_config_file(args.config) if args.config else {}
    fields = EngineConfig.option_fields()
    options.update({k: v for k, v in vars(args).items() if k in fields and k != "model"})
    if getattr(args, "model", None):
        options["model"] = args.model
    return options


def _sampling_params(args: argparse.Namespace):
    from pagedllm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, stop=args.stop,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    llm = LLM(**_engine_options(args))
    params = _sampling_params(args)
    has_template = bool(getattr(llm.get_tokenizer(), "chat_template", None))
    if has_template and not args.raw:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, output in zip(args.prompts, outputs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(output.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    llm = LLM(**_engine_options(args))
    engine = llm.engine
    params = _sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": text})
        prompt = llm.apply_chat_template(history, add_generation_prompt=True)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, prompt, params)
        printed = ""
        while engine.has_unfinished_requests():
            for output in engine.step():
                answer = output.outputs[0].text
                print(answer[len(printed):], end="", flush=True)
                printed = answer
        print(flush=True)
        history.append({"role": "assistant", "content": printed})
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from pagedllm.core.config import PluginConfig
    from pagedllm.entrypoints.plugins_cmd import plugins_command

    options = load_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(PluginConfig)}
    return plugins_command(PluginConfig(**{k: v for k, v in options.items() if k in names}), as_json=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    options = _engine_options(args)  # config-file errors first, before the heavy imports
    from pagedllm.entrypoints.openai.api_server import run_server

    if args.log_level.upper() == "WARNING":  # left at its default: a server shows its banner and request log
        logging.getLogger("pagedllm").setLevel(logging.INFO)
    return run_server(options)


def _add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (default http://127.0.0.1:8000/v1)")
    serve.add_argument("model", nargs="?", default=None, help="model directory or .gguf file (default: embedded SmolLM2)")
    _add_engine_options(serve)
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: paged, continuously batched LLM inference")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="generate answers for prompts (chat template applied when the model has one)")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--model", "-m", default=None, help="model directory or .gguf file (default: embedded SmolLM2)")
    gen.add_argument("--raw", action="store_true", help="use the prompts as-is, without the chat template")
    _add_sampling_options(gen)
    _add_engine_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat on stdin/stdout (/exit to leave)")
    chat.add_argument("--model", "-m", default=None, help="model directory or .gguf file (default: embedded SmolLM2)")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_options(chat)
    _add_engine_options(chat)
    chat.set_defaults(func=cmd_chat)

    plugins = sub.add_parser("plugins", help="list every plugin kind, name, package, version and load errors")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--config", help="YAML file with plugins_allow / plugins_deny / plugins_allow_override")
    plugins.set_defaults(func=cmd_plugins)
    _add_serve_parser(sub)

    add_bench_parser(sub, _add_engine_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from pagedllm import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagedllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
