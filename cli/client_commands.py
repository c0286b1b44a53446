"""`attnseg segment|oneshot|concept|jobs`: the API from the command line, on `attnseg.client`.

Pictures (files, or folders of .jpg/.jpeg/.png/.webp) run concurrently, at most `--concurrency`
at a time, with a progress bar on stderr. Outputs: a COCO-style results JSON (`-o`, else stdout),
`--masks-dir` (one PNG label map per picture: label_id, or the segment id when unsupervised) and
`--overlay-dir` (the API's overlay). Ctrl-C cancels the jobs of this run that have not ended and
writes the results of those that have, marked partial. A picture the API still
holds from an earlier run (the same bytes, the same tenant) is asked about by its id, not sent
again, so a second run with other classes or parameters skips the upload (and the worker may reuse
the picture's latents).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from attnseg.client import (
    AsyncClient,
    AsyncJob,
    AttnsegError,
    Client,
    JobFailed,
    NotFound,
    PictureInput,
    Progress,
    Result,
    StoredPicture,
    WaitTimeout,
)
from attnseg.defaults import TEXT_TIMESTEPS, TextDefaults
from attnseg.wording import count

DEFAULT_URL = "http://127.0.0.1:8000"
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
INTERRUPTED = 130  # the shell's code for a SIGINT death

# What fails one picture and not the run: the API's refusal, a failed job, the network, a file.
PICTURE_ERRORS = (AttnsegError, httpx.HTTPError, OSError)
Submit = Callable[[AsyncClient, PictureInput], Awaitable[AsyncJob]]


class CommandError(Exception):
    """A mistake on the command line (a missing file, clashing outputs): one line, exit 2."""


def words(values: list[str] | None) -> list[str]:
    """`--classes dog grass` and `--classes dog,grass` alike (names never contain commas)."""
    return [word.strip() for value in values or [] for word in value.split(",") if word.strip()]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def pictures(paths: list[Path]) -> list[Path]:
    """Files as given; a folder gives its pictures (by suffix, sorted, not recursive)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise CommandError(f"no such file or folder: {path}")
    if not found:
        raise CommandError(f"no pictures ({', '.join(PICTURE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


def check_output_names(paths: list[Path]) -> None:
    """Per-picture outputs are named after the picture's stem: two pictures must not share one."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise CommandError(f"{seen[path.stem]} and {path} would write the same output file {path.stem}.png")
        seen[path.stem] = path


def label_png(label_map: np.ndarray) -> Image.Image:
    """(H, W) int label map -> an 8-bit PNG image, or 16-bit when a value passes 255."""
    return Image.fromarray(label_map.astype(np.uint8 if label_map.max(initial=0) < 256 else np.uint16))


def failure(path: Path, error: BaseException) -> dict:
    return {
        "file_name": str(path),
        "code": getattr(error, "code", type(error).__name__),
        "message": describe(error),
        "job_id": getattr(error, "job_id", None),
    }


def coco_document(paths: list[Path], ended: dict, *, partial: bool = False) -> dict:
    """COCO-style results of the pictures that `ended` (path -> (path, job id, Result) or the error),
    in the order of `paths`: `images` (with the job id), `annotations` (RLE, bbox xywh, area, score),
    `categories`, `failed`; `partial` (interrupted) with the `unfinished` pictures.

    Category ids are label_ids when the result has `labels` (text, one-shot, referring: 0 is background);
    segments without one (unsupervised; a referring result's other instances) get one category per name
    (`segment` when unnamed), numbered after those.
    """
    outcomes = [ended[path] for path in paths if path in ended]
    done = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    failed = [failure(path, ended[path]) for path in paths if isinstance(ended.get(path), BaseException)]
    categories: dict[str, int] = {}
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, (path, job_id, result) in enumerate(done, start=1):
        images.append(
            {"id": image_id, "file_name": str(path), "width": result.width, "height": result.height, "job_id": job_id}
        )
        for label_id, name in enumerate(result.labels or []):  # every class asked for, found or not
            categories.setdefault(name, label_id)
        for segment in result.segments:
            if segment.label_id is not None:
                category = segment.label_id
            else:
                category = categories.setdefault(segment.label or "segment", max(categories.values(), default=0) + 1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segment.rle,
                    "area": segment.area,
                    "bbox": list(segment.bbox),
                    "score": segment.score,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in sorted(categories.items(), key=lambda c: c[1])],
        "failed": failed,
        "partial": partial,
        "unfinished": [str(path) for path in paths if path not in ended],
    }


class Submitted:
    """Every job this run created, so that Ctrl-C can cancel them (submissions in flight included)."""

    def __init__(self):
        self.jobs: list[AsyncJob] = []
        self.in_flight: set[asyncio.Task] = set()

    async def submit(self, submission: Awaitable[AsyncJob]) -> AsyncJob:
        # Shielded: a Ctrl-C during the POST must not lose a job the server has already created.
        task = asyncio.ensure_future(submission)
        self.in_flight.add(task)
        task.add_done_callback(self._landed)
        return await asyncio.shield(task)

    def _landed(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is None:
            self.jobs.append(task.result())

    async def cancel_all(self, client: AsyncClient) -> int:
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=30)
        open_jobs = [job for job in self.jobs if not job.done]
        # Newest first: the queued ones go before a running one stops and frees the worker for them.
        for job in reversed(open_jobs):
            try:
                await client.cancel(job.id)
            except PICTURE_ERRORS as exc:
                print(f"attnseg: could not cancel job {job.id}: {describe(exc)}", file=sys.stderr)
        return len(open_jobs)


def describe(error: BaseException) -> str:
    if isinstance(error, httpx.HTTPError):
        return f"cannot reach the API: {type(error).__name__}: {error}"
    return str(error)


async def reusing_stored(client: AsyncClient, path: Path, submit: Submit) -> AsyncJob:
    """Ask about the picture by its id (the SHA-256 of its bytes, as the API names it) when the API
    still holds it; upload it when it does not (404 on `image_id`)."""
    try:
        return await submit(client, StoredPicture(hashlib.sha256(path.read_bytes()).hexdigest()))
    except NotFound as exc:
        if exc.field != "image_id":
            raise
        return await submit(client, path)


async def segment_pictures(args, submit: Submit) -> int:
    """Submit every picture (at most --concurrency at a time), wait, write the outputs; 1 if any failed.
    Ctrl-C cancels the jobs not finished and writes the pictures that were, marked partial."""
    paths = pictures(args.images)
    if args.masks_dir or args.overlay_dir:
        check_output_names(paths)
    for folder in (args.masks_dir, args.overlay_dir):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    limit = asyncio.Semaphore(args.concurrency)
    submitted = Submitted()
    ended: dict[Path, tuple[Path, str, Result] | BaseException] = {}  # a picture's result or error, once it has one
    bar = tqdm(total=len(paths), unit="picture", file=sys.stderr)

    async def one(client: AsyncClient, path: Path) -> None:
        async with limit:
            try:
                job = await submitted.submit(reusing_stored(client, path, submit))
                bar.write(f"{path}: job {job.id}", file=sys.stderr)
                result = await job.result()
                if args.overlay_dir:
                    (args.overlay_dir / f"{path.stem}.png").write_bytes(await job.overlay())
                if args.masks_dir:
                    label_png(result.label_map()).save(args.masks_dir / f"{path.stem}.png")
                ended[path] = (path, job.id, result)
            except PICTURE_ERRORS as exc:
                bar.write(f"attnseg: {path}: {describe(exc)}", file=sys.stderr)
                ended[path] = exc
            bar.update()  # only a picture that ended counts: one canceled by Ctrl-C does not

    async with AsyncClient(*connection(args)) as client:
        try:
            outcomes = await asyncio.gather(*(one(client, path) for path in paths), return_exceptions=True)
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
            bar.close()
            canceled = await submitted.cancel_all(client)
            write_json(coco_document(paths, ended, partial=True), args.output)
            print(
                f"attnseg: interrupted; wrote {count(len(ended), 'picture')} that ended (marked partial); "
                f"canceled {count(canceled, 'unfinished job')} of this run (a running one stops at its next step)",
                file=sys.stderr,
            )
            raise
    bar.close()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):  # not a picture's error: a bug, said as such
            raise outcome
    write_json(coco_document(paths, ended), args.output)
    return 1 if any(isinstance(outcome, BaseException) for outcome in ended.values()) else 0


def write_json(document: dict, output: Path | None) -> None:
    text = json.dumps(document)
    if output:
        output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def connection(args) -> tuple[str, str | None]:
    return (
        args.url or os.environ.get("ATTNSEG_URL") or DEFAULT_URL,
        args.api_key or os.environ.get("ATTNSEG_API_KEY") or None,
    )


def params(args, names: tuple[str, ...]) -> dict:
    """The method parameters given on the command line; the rest are the server's defaults."""
    values = {name: getattr(args, name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


UNSUPERVISED = ("kl_threshold", "grid", "iterations", "timestep", "resolution", "refine", "vocabulary", "seed")
TEXT = (
    "background",
    "background_words",
    "samples",
    "timestep",
    "resolution",
    "seed",
    "gate_threshold",
    "background_threshold",
)
NAMING = ("name", "description")
TRAIN = (*NAMING, "epochs", "learning_rate", "crops_per_side", "min_crop", "resolution", "seed")
ONESHOT_SEGMENT = ("crops_per_side", "resolution", "seed")
REFERRING = ("max_instances", "resolution", "seed")
CONCEPT_TRAIN = (*NAMING, "train_kv", "steps", "learning_rate", "batch_size", "num_vectors", "resolution", "seed")


def cmd_segment_unsupervised(args) -> int:
    options = {**params(args, UNSUPERVISED), "vocabulary": words(args.vocabulary) or None}
    return asyncio.run(segment_pictures(args, lambda client, path: client.segment_unsupervised(path, **options)))


def cmd_segment_text(args) -> int:
    classes = words(args.classes)
    options = {**params(args, TEXT), "background_words": words(args.background_words) or None}
    return asyncio.run(
        segment_pictures(args, lambda client, path: client.segment_text(path, classes, method=args.method, **options))
    )


def cmd_segment_referring(args) -> int:
    options = params(args, REFERRING)
    return asyncio.run(
        segment_pictures(
            args, lambda client, path: client.segment_referring(path, args.class_word, args.queries, **options)
        )
    )


def cmd_oneshot_segment(args) -> int:
    options = params(args, ONESHOT_SEGMENT)
    return asyncio.run(segment_pictures(args, lambda client, path: client.oneshot_segment(args.model, path, **options)))


def training_bar(total: int | None, unit: str) -> tuple[tqdm, Callable[[Progress], None]]:
    """A progress bar over epochs (one-shot) or steps (concepts), with the loss (and IoU) as they come;
    without a `total` (the server's default) the first report gives it."""
    bar = tqdm(total=total, unit=unit, file=sys.stderr)

    def show(progress: Progress) -> None:
        done = getattr(progress, unit)
        if done is None:
            bar.set_description(progress.stage)
            return
        if bar.total is None:
            bar.total = getattr(progress, unit + "s")
        bar.set_description("training")
        bar.update(done - bar.n)
        bar.set_postfix(
            {
                name: f"{value:.3f}"
                for name, value in (("loss", progress.loss), ("iou", progress.best_iou))
                if value is not None
            }
        )

    return bar, show


def follow_training(client: Client, what: str, record, job_id: str, total: int | None, unit: str, no_wait: bool) -> int:
    """Say which record (`what`: model, concept) is being made, then follow its job with a bar unless
    `no_wait`; Ctrl-C cancels that job. Returns the exit code (0, or INTERRUPTED)."""
    print(f"{what} {record.id}: {record.status} (job {job_id})", file=sys.stderr)
    if no_wait:
        return 0
    bar, show = training_bar(total, unit)
    try:
        record.wait(on_progress=show)
    except KeyboardInterrupt:
        client.cancel(job_id)
        print(f"attnseg: interrupted; canceled training job {job_id}", file=sys.stderr)
        return INTERRUPTED
    finally:
        bar.close()
    return 0


def cmd_oneshot_train(args) -> int:
    if len(args.image) != len(args.mask):
        raise CommandError(f"{len(args.image)} --image but {len(args.mask)} --mask: give one mask per image")
    existing_files(*args.image, *args.mask)
    with Client(*connection(args)) as client:
        model = client.train_oneshot(args.image, args.mask, words(args.labels), **params(args, TRAIN))
        code = follow_training(
            client, "model", model, model.state.train_job_id, model.state.raw["params"]["epochs"], "epoch", args.no_wait
        )
        if code == 0:
            write_json(model.state.raw, args.output)
    return code


def existing_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise CommandError(f"no such file: {path}")


def cmd_concept_train(args) -> int:
    if args.mask and len(args.image) != len(args.mask):
        raise CommandError(f"{len(args.image)} --image but {len(args.mask)} --mask: give one mask per image, or none")
    existing_files(*args.image, *(args.mask or []))
    with Client(*connection(args)) as client:
        concept = client.train_concept(
            args.image, args.identifier, args.class_word, masks=args.mask or None, **params(args, CONCEPT_TRAIN)
        )
        code = follow_training(
            client, "concept", concept, concept.state.job_id, concept.state.raw["params"]["steps"], "step", args.no_wait
        )
        if code == 0:
            write_json(concept.state.raw, args.output)
    return code


def cmd_concept_import(args) -> int:
    existing_files(args.embeddings, *([args.weights] if args.weights else []))
    with Client(*connection(args)) as client:
        concept = client.import_concept(
            args.identifier, args.class_word, args.embeddings, args.weights, **params(args, NAMING)
        )
        write_json(concept.wait().state.raw, None)
    return 0


@dataclass(frozen=True)
class Records:
    """A kind of stored record (one-shot models, concepts) and the client methods that reach it."""

    key: str  # the listing's key: {"models": [...]}
    noun: str
    list: str  # Client method names
    get: str


MODELS = Records("models", "model", "oneshot_models", "oneshot_model")
CONCEPTS = Records("concepts", "concept", "concepts", "concept")


def cmd_record_list(records: Records, args) -> int:
    with Client(*connection(args)) as client:
        write_json({records.key: [one.state.raw for one in getattr(client, records.list)(limit=500)]}, None)
    return 0


def cmd_record_get(records: Records, args) -> int:
    with Client(*connection(args)) as client:
        write_json(getattr(client, records.get)(args.record_id).state.raw, None)
    return 0


def cmd_record_delete(records: Records, args) -> int:
    with Client(*connection(args)) as client:
        getattr(client, records.get)(args.record_id).delete()
    return 0


def add_record_commands(group: argparse._SubParsersAction, records: Records, api: argparse.ArgumentParser) -> None:
    """`list`, `get <id>` and `delete <id>` of one kind of record."""
    listing = group.add_parser("list", parents=[api], help=f"print your {records.noun}s' JSON (id, name, status, ...)")
    listing.set_defaults(func=partial(run, partial(cmd_record_list, records)))
    for name, command, text in (
        ("get", cmd_record_get, f"print a {records.noun}'s JSON"),
        ("delete", cmd_record_delete, f"delete a {records.noun} (its training is canceled)"),
    ):
        one = group.add_parser(name, parents=[api], help=text)
        one.add_argument("record_id", metavar=f"{records.noun}_id")
        one.set_defaults(func=partial(run, partial(command, records)))


def cmd_concept_export(args) -> int:
    """Write a ready concept's diffusers files into a folder, printing their paths."""
    with Client(*connection(args)) as client:
        concept = client.concept(args.concept_id)
        if concept.status != "ready":
            raise CommandError(f"concept {concept.id} is {concept.status}: only a ready concept has files")
        args.directory.mkdir(parents=True, exist_ok=True)
        for name in concept.state.files:
            (args.directory / name).write_bytes(concept.file(name))
            print(args.directory / name)
    return 0


def cmd_jobs_get(args) -> int:
    with Client(*connection(args)) as client:
        job = client.job(args.job_id)
        if args.wait:
            try:
                job.wait(timeout=args.wait)
            except (WaitTimeout, JobFailed):
                pass  # the state is what this command prints, whatever it is
        write_json(job.state.raw, None)
    return 0


def cmd_jobs_cancel(args) -> int:
    with Client(*connection(args)) as client:
        write_json(client.cancel(args.job_id).state.raw, None)
    return 0


def run(command: Callable[[argparse.Namespace], int], args) -> None:
    """Run a client command; errors become one line on stderr and an exit code."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        code = command(args)
    except CommandError as exc:
        sys.exit(f"attnseg: {exc}")
    except (AttnsegError, httpx.HTTPError) as exc:
        print(f"attnseg: {describe(exc)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = INTERRUPTED
    sys.exit(code)


def add_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMG", help="pictures, or folders of pictures")
    parser.add_argument("-o", "--output", type=Path, help="COCO-style results JSON (default: stdout)")
    parser.add_argument("--masks-dir", type=Path, help="one PNG label map per picture, named after it")
    parser.add_argument("--overlay-dir", type=Path, help="the API's overlay PNG per picture")
    parser.add_argument("--concurrency", type=positive, default=4, help="jobs in flight at once (default 4)")


def add_naming(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--name", help=f"what listings call it (default: {default})")
    parser.add_argument("--description", help="a longer note, up to 500 characters")


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Registers `segment`, `oneshot`, `concept` and `jobs` on the `attnseg` parser."""
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", help=f"the API (default: $ATTNSEG_URL or {DEFAULT_URL})")
    api.add_argument("--api-key", help="bearer key (default: $ATTNSEG_API_KEY)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--resolution", type=int, help="working resolution (256..1024, multiple of 64)")
    common.add_argument("--seed", type=int, help="the same seed gives the same masks")
    add_segment_commands(sub, [common, api])
    add_oneshot_commands(sub, api, [common, api])
    add_concept_commands(sub, api, [common, api])
    add_jobs_commands(sub, [api])


def add_segment_commands(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`segment unsupervised|text|referring`: pictures through one method each."""
    segment = sub.add_parser("segment", help="segment pictures through the API").add_subparsers(
        dest="method_name", required=True
    )
    add_unsupervised(segment, parents)
    add_text(segment, parents)
    add_referring(segment, parents)


def add_unsupervised(segment: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`segment unsupervised`."""
    unsupervised = segment.add_parser("unsupervised", parents=parents, help="DiffSeg, no prompt")
    add_outputs(unsupervised)
    unsupervised.add_argument("--kl-threshold", type=float, help="tau: larger merges more (default 1.0)")
    unsupervised.add_argument("--grid", type=int, help="anchors per side (16)")
    unsupervised.add_argument("--iterations", type=int, help="merging iterations (3)")
    unsupervised.add_argument("--timestep", type=int, help="the UNet pass's timestep (300)")
    unsupervised.add_argument("--refine", action="store_const", const=True, help="k-means refinement")
    unsupervised.add_argument("--vocabulary", nargs="+", help="words to name the segments")
    unsupervised.set_defaults(func=partial(run, cmd_segment_unsupervised))


def add_text(segment: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`segment text`."""
    text = segment.add_parser("text", parents=parents, help="one segment per class name")
    add_outputs(text)
    text.add_argument("--classes", nargs="+", required=True, help="class names (space- or comma-separated)")
    text.add_argument("--method", default=TextDefaults.method, choices=list(TEXT_TIMESTEPS))
    text.add_argument(
        "--no-background", dest="background", action="store_const", const=False, help="no background class"
    )
    text.add_argument("--background-words", nargs="+", help="selfcross: extra words that absorb attention")
    text.add_argument("--samples", type=int, help="selfcross: noise draws averaged (1)")
    text.add_argument("--timestep", type=int, help="default per method")
    text.add_argument(
        "--gate-threshold", type=float, help="selfcross: box gate level on the class maps (0.2 as VOC; COCO 0.5)"
    )
    text.add_argument(
        "--background-threshold",
        type=float,
        help="selfcross: thr of the background (2 * thr - max)^2 (0.5 as VOC; COCO 0.35); lower, less background",
    )
    text.set_defaults(func=partial(run, cmd_segment_text))


def add_referring(segment: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`segment referring`."""
    referring = segment.add_parser(
        "referring", parents=parents, help="the instance each query refers to (queries may name concepts)"
    )
    add_outputs(referring)
    referring.add_argument("--class-word", required=True, help="the category of the instances ('mug')")
    referring.add_argument(
        "--queries", nargs="+", required=True, help="1 to 8 queries, each one argument: '<my-mug> mug' 'a red mug'"
    )
    referring.add_argument("--max-instances", type=int, help="most instances the clustering finds (8)")
    referring.set_defaults(func=partial(run, cmd_segment_referring))


def add_oneshot_commands(
    sub: argparse._SubParsersAction, api: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]
) -> None:
    """`oneshot train|segment|list|get|delete`; `parents` (the API and the model options) for train and segment."""
    oneshot = sub.add_parser("oneshot", help="train and use one-shot part models (SLiMe)").add_subparsers(
        dest="oneshot_command", required=True
    )
    train = oneshot.add_parser("train", parents=parents, help="train from picture(s) and label mask(s)")
    train.add_argument("--image", type=Path, action="append", required=True, help="a training picture (repeatable)")
    train.add_argument(
        "--mask",
        type=Path,
        action="append",
        required=True,
        help="its mask: a PNG of class ids, 0 background (repeatable, same order)",
    )
    train.add_argument("--labels", nargs="+", required=True, help="names of mask values 1..K-1")
    add_naming(train, "the part names")
    train.add_argument("--epochs", type=int, help="(200)")
    train.add_argument("--learning-rate", type=float, help="(0.1)")
    train.add_argument("--crops-per-side", type=int, choices=[1, 2], help="1 whole objects, 2 fine parts (1)")
    train.add_argument("--min-crop", type=float, help="smallest random crop side, a fraction (0.7)")
    train.add_argument("--no-wait", action="store_true", help="print the model at once; do not follow training")
    train.add_argument("-o", "--output", type=Path, help="the model's JSON (default: stdout)")
    train.set_defaults(func=partial(run, cmd_oneshot_train))
    oneshot_segment = oneshot.add_parser("segment", parents=parents, help="segment pictures into a model's parts")
    oneshot_segment.add_argument("model", help="the model id (from `oneshot train`)")
    add_outputs(oneshot_segment)
    oneshot_segment.add_argument("--crops-per-side", type=int, choices=[1, 2], help="default: the model's")
    oneshot_segment.set_defaults(func=partial(run, cmd_oneshot_segment))
    add_record_commands(oneshot, MODELS, api)


def add_concept_commands(
    sub: argparse._SubParsersAction, api: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]
) -> None:
    """`concept train|import|list|get|delete|export`; `parents` (the API and the model options) for training."""
    concept = sub.add_parser(
        "concept", help="teach the model your object, then refer to it as <identifier>"
    ).add_subparsers(dest="concept_command", required=True)
    add_concept_train(concept, parents)
    bring = concept.add_parser(
        "import", parents=[api], help="import diffusers Textual Inversion / Custom Diffusion files"
    )
    bring.add_argument("--embeddings", type=Path, required=True, help="learned_embeds.safetensors (or .bin)")
    bring.add_argument("--weights", type=Path, help="pytorch_custom_diffusion_weights (.safetensors or .bin)")
    bring.add_argument("--identifier", required=True)
    bring.add_argument("--class-word", required=True)
    add_naming(bring, "the identifier")
    bring.set_defaults(func=partial(run, cmd_concept_import))
    add_record_commands(concept, CONCEPTS, api)
    export = concept.add_parser("export", parents=[api], help="write a ready concept's diffusers files to a folder")
    export.add_argument("concept_id")
    export.add_argument("directory", type=Path)
    export.set_defaults(func=partial(run, cmd_concept_export))


def add_concept_train(concept: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`concept train`."""
    learn = concept.add_parser("train", parents=parents, help="learn a concept from 3 to 20 photos")
    learn.add_argument("--image", type=Path, action="append", required=True, help="a photo of the object (repeatable)")
    learn.add_argument(
        "--mask", type=Path, action="append", help="its mask, non-zero = the object (repeatable, same order; optional)"
    )
    learn.add_argument("--identifier", required=True, help="letters, digits and '-': queries write <identifier>")
    learn.add_argument("--class-word", required=True, help="the object's category ('mug')")
    add_naming(learn, "the identifier")
    learn.add_argument(
        "--textual-inversion",
        dest="train_kv",
        action="store_const",
        const=False,
        help="learn the embedding alone (default: Custom Diffusion, embedding + cross-attention K/V)",
    )
    learn.add_argument("--steps", type=int, help="(250 Custom Diffusion, 3000 Textual Inversion)")
    learn.add_argument("--learning-rate", type=float)
    learn.add_argument("--batch-size", type=int)
    learn.add_argument("--num-vectors", type=int, help="vectors of the identifier (1)")
    learn.add_argument("--no-wait", action="store_true", help="print the concept at once; do not follow training")
    learn.add_argument("-o", "--output", type=Path, help="the concept's JSON (default: stdout)")
    learn.set_defaults(func=partial(run, cmd_concept_train))


def add_jobs_commands(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`jobs get|cancel`."""
    jobs = sub.add_parser("jobs", help="look at or cancel a job").add_subparsers(dest="jobs_command", required=True)
    get = jobs.add_parser("get", parents=parents, help="print a job's JSON")
    get.add_argument("job_id")
    get.add_argument("--wait", type=float, help="first wait up to this many seconds for it to end")
    get.set_defaults(func=partial(run, cmd_jobs_get))
    cancel = jobs.add_parser("cancel", parents=parents, help="cancel a job (a running one stops at its next step)")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=partial(run, cmd_jobs_cancel))
