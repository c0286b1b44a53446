"""`attnseg`: run the API, a worker, or the whole stack in the foreground; evaluate; export OpenAPI;
and, as a client of a running API, segment pictures, train one-shot models, look at jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from attnseg.defaults import RESOLUTION, TEXT_TIMESTEPS, OneshotDefaults, TextDefaults
from attnseg.queue import QUEUES, connect
from attnseg.settings import get_settings
from cli.client_commands import DEFAULT_URL, add_client_commands

log = logging.getLogger("attnseg")


def cmd_api(args) -> None:
    from service.app import create_app
    from service.lifecycle import serve

    settings = get_settings()
    serve(create_app(settings), host=args.host or settings.api_host, port=args.port or settings.api_port)


def cmd_worker(args) -> None:
    from workers.engine.worker import run_worker
    from workers.models.stable_diffusion import ModelUnavailableError

    try:
        run_worker(get_settings(), queues=tuple(args.queues or QUEUES), name=args.name, burst=args.burst)
    except ModelUnavailableError as exc:
        sys.exit(f"attnseg worker: {exc}")


def redis_answers(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except redis.RedisError:
        return False


def start_own_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free loopback port (AOF in `data_dir`, so models and concepts
    outlive a restart); returns it and its URL. It is stopped with the stack."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(
            "attnseg up starts its own Redis but no redis-server is installed: install it "
            "(apt-get install redis-server), or give one with --redis-url"
        )
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", "--save", ""),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(50):
        if redis_answers(url):
            return process, url
        time.sleep(0.1)
    process.terminate()
    sys.exit(f"attnseg up: started redis-server on port {port} but it does not answer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def given_redis_url(args, settings) -> str | None:
    """The Redis the user named (--redis-url, else ATTNSEG_REDIS_URL set in the environment or .env);
    None: `up` starts its own. A server nobody named is never written into."""
    if args.redis_url:
        return args.redis_url
    return settings.redis_url if "redis_url" in settings.model_fields_set else None


def up_model(model: str | None, settings, port: int) -> dict[str, str]:
    """The model settings `up` gives its worker: --model, else the configured ATTNSEG_SD_MODEL, else the
    demo model tiny-colour, said plainly (its masks follow colour, not objects)."""
    if model is None and "sd_model" not in settings.model_fields_set:
        from workers.models import tiny_colour

        model = tiny_colour.MODEL_NAME
        print(
            f"attnseg up: no weights configured, so the demo model {model}: {tiny_colour.NOTE} "
            "(attnseg up --model stable-diffusion-v1-5/stable-diffusion-v1-5, or ATTNSEG_SD_MODEL). "
            f"Playground: http://{settings.api_host}:{port}/ui",
            flush=True,
        )
    if model is None:
        return {}
    env = {"ATTNSEG_SD_MODEL": model}
    if model.startswith("tiny-") and "clip_model" not in settings.model_fields_set:
        env["ATTNSEG_CLIP_MODEL"] = "tiny-random"  # tiny-random, tiny-random-sd2, tiny-colour: no CLIP download
    return env


def cmd_up(args) -> None:
    """Redis (its own, or the one named), the API and one worker; Ctrl-C stops them all."""
    settings = get_settings()
    children: list[subprocess.Popen] = []
    redis_url = given_redis_url(args, settings)
    if redis_url is None:
        process, redis_url = start_own_redis(settings.cache_dir / "redis")
        children.append(process)
        log.info("redis: %s, started here (data in %s), stopped on exit", redis_url, settings.cache_dir / "redis")
    elif redis_answers(redis_url):
        log.info("redis: %s, as given (--redis-url or ATTNSEG_REDIS_URL); left running on exit", redis_url)
    else:
        sys.exit(f"attnseg up: no Redis answers at {redis_url} (given by --redis-url or ATTNSEG_REDIS_URL)")
    model = up_model(args.model, settings, args.port or settings.api_port)
    env = {**os.environ, "ATTNSEG_REDIS_URL": redis_url, **model}
    attnseg = [sys.executable, "-m", "cli"]
    port = ["--port", str(args.port)] if args.port else []
    # Own sessions: Ctrl-C reaches only this process, which then stops the children in order.
    children.append(subprocess.Popen([*attnseg, "worker"], env=env, start_new_session=True))
    children.append(subprocess.Popen([*attnseg, "api", *port], env=env, start_new_session=True))
    stop = False

    def request_stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop and all(child.poll() is None for child in children):
        time.sleep(0.5)
    # API first (no new jobs), then the worker (RQ finishes its job), Redis last.
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    failed = [child.args for child in children if child.returncode not in (0, -2, -15, 130)]
    if failed:
        sys.exit(f"stopped; a process exited with an error: {failed}")


def cmd_health(args) -> None:
    """Exit 0 when a worker on this host has announced itself ready (container health check)."""
    from attnseg.workers_registry import ready_workers

    host = socket.gethostname()
    try:
        ours = [w for w in ready_workers(connect(get_settings().redis_url)) if w["host"] == host]
    except redis.RedisError as exc:
        sys.exit(f"redis unavailable: {exc}")
    if not ours:
        sys.exit(f"no ready worker on {host}")
    print(json.dumps(ours))


def cmd_openapi(args) -> None:
    from service.app import create_app

    document = json.dumps(create_app().openapi(), indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(document)
    else:
        sys.stdout.write(document)


def cmd_evaluate(args) -> None:
    required = {
        "unsupervised": ("images", "labels"),
        "text": ("images", "labels", "classes"),
        "oneshot": ("images", "labels", "parts", "train_images", "train_masks"),
        "referring": ("images", "labels", "queries", "class_word"),
    }
    missing = [f"--{name.replace('_', '-')}" for name in required.get(args.protocol, ()) if not getattr(args, name)]
    if missing:
        sys.exit(f"evaluate {args.protocol} needs {', '.join(missing)}")
    if args.protocol == "synthetic":
        cmd_evaluate_synthetic(args)
        return
    from workers.evaluation.evaluate import main as evaluate_main

    evaluate_main(args)


def add_up(sub: argparse._SubParsersAction) -> None:
    """`up`: the whole stack in the foreground."""
    up = sub.add_parser("up", help="Redis + API + one worker in the foreground (Ctrl-C stops all)")
    up.add_argument(
        "--model",
        help="SD model id or directory (default: ATTNSEG_SD_MODEL, else the demo model 'tiny-colour', whose "
        "masks follow colour); 'tiny-random' (SD 1.x) and 'tiny-random-sd2' have random weights",
    )
    up.add_argument("--port", type=int, help="the API's port (default 8000, or ATTNSEG_API_PORT)")
    up.add_argument(
        "--redis-url",
        help="use this Redis (left running on exit); default: ATTNSEG_REDIS_URL if set, "
        "else a redis-server of its own on a free port, stopped on exit",
    )
    up.set_defaults(func=cmd_up)


def cmd_evaluate_synthetic(args) -> None:
    """Every method on held-out synthetic scenes through a running API: a table, and JSON with --output."""
    from attnseg.client import Client
    from cli.client_commands import connection
    from workers.evaluation.quality import METHODS, evaluate_synthetic, table

    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        sys.exit(f"evaluate synthetic: unknown methods {unknown}; choose from {', '.join(METHODS)}")

    url, key = connection(args)
    height, width = args.size
    with Client(url, key, timeout=120) as client:
        result = evaluate_synthetic(
            client,
            args.scenes,
            seed=args.seed,
            height=height,
            width=width,
            resolution=args.resolution,
            epochs=args.epochs,
            methods=args.methods or METHODS,
            **({"sizes": tuple(args.sizes)} if args.sizes else {}),
        )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def picture_size(text: str) -> tuple[int, int]:
    """ "HxW" -> (height, width)."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 384x512, got {text!r}") from None
    return height, width


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """`attnseg evaluate`: the folder protocols (docs/methods.md 4.2-4.5) and the synthetic table (4.6)."""
    evaluate = sub.add_parser(
        "evaluate", help="score a method on a folder of images and label PNGs, or every method on synthetic scenes"
    )
    evaluate.add_argument(
        "protocol",
        choices=["unsupervised", "text", "oneshot", "referring", "synthetic"],
        help="docs/methods.md section 4 (referring: 4.5; synthetic: 4.6, through a running API)",
    )
    evaluate.add_argument("--images", type=Path, help="folder of images (jpg/png/webp)")
    evaluate.add_argument("--labels", type=Path, help="folder of label PNGs with the same stems; 255 = ignore")
    evaluate.add_argument("--resolution", type=int, default=RESOLUTION)
    evaluate.add_argument("--limit", type=int, help="only the first N images")
    evaluate.add_argument("--output", type=Path, help="write the scores as JSON here too")
    evaluate.add_argument("--num-classes", type=int, default=27, help="unsupervised: ground-truth classes")
    evaluate.add_argument("--kl-threshold", type=float, default=1.1, help="unsupervised: 1.1 for COCO-Stuff-27")
    evaluate.add_argument("--classes", help="text: comma-separated class names; label i = i-th class, 0 background")
    evaluate.add_argument("--method", default=TextDefaults.method, choices=list(TEXT_TIMESTEPS))
    evaluate.add_argument("--parts", help="oneshot: comma-separated part names for mask values 1..K-1")
    evaluate.add_argument("--train-images", type=Path, nargs="+", help="oneshot: training image(s)")
    evaluate.add_argument("--train-masks", type=Path, nargs="+", help="oneshot: their label masks")
    evaluate.add_argument("--epochs", type=int, default=OneshotDefaults.epochs, help="oneshot: training epochs")
    evaluate.add_argument(
        "--crops-per-side", type=int, default=OneshotDefaults.crops_per_side, choices=[1, 2], help="oneshot"
    )
    evaluate.add_argument("--queries", type=Path, help="referring: folder of <stem>.json query lists")
    evaluate.add_argument("--concepts", type=Path, help="referring: folder of <identifier>/ diffusers files")
    evaluate.add_argument("--class-word", help="referring: the instances' category, e.g. mug")
    evaluate.add_argument("--scenes", type=int, default=100, help="synthetic: held-out scenes")
    evaluate.add_argument("--seed", type=int, default=1000, help="synthetic: the first scene's seed")
    evaluate.add_argument("--size", type=picture_size, default=(384, 512), help="synthetic: HEIGHTxWIDTH")
    evaluate.add_argument(
        "--sizes", type=float, nargs=2, help="synthetic: object sizes / shorter side, min max (0.12 0.5)"
    )
    evaluate.add_argument(
        "--methods", nargs="+", help="synthetic: some of unsupervised selfcross oneshot oneshot_2x2 referring (all)"
    )
    evaluate.add_argument("--url", help=f"synthetic: the API (default: $ATTNSEG_URL or {DEFAULT_URL})")
    evaluate.add_argument("--api-key", help="synthetic: bearer key (default: $ATTNSEG_API_KEY)")
    evaluate.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API (no models, no torch)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a GPU worker: load the models, then serve the queues")
    worker.add_argument("--queues", nargs="+", choices=QUEUES, help="default: all, segmentation first")
    worker.add_argument("--name", help="worker name (default host.pid)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)

    add_up(sub)

    health = sub.add_parser("health", help="exit 0 when this host's worker is ready")
    health.add_argument("role", choices=["worker"])
    health.set_defaults(func=cmd_health)

    openapi = sub.add_parser("openapi", help="print (or write) the OpenAPI document")
    openapi.add_argument("--output", "-o")
    openapi.set_defaults(func=cmd_openapi)

    add_evaluate_command(sub)

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)
