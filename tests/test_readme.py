"""Every Python and shell block of README.md, run as written against a live stack (tiny-random).

Commands run one by one in a folder holding the pictures they name (cat.jpg, car.jpg and its mask,
photos/, mug1.jpg, ...). The README's example ids (`5c0e…`, `<job>`, `3f2a…`, ...) stand for the ids
earlier commands answered: each is replaced by the real one, learned from those answers; the stack's
address replaces `127.0.0.1:8000`. Trainings are shortened (SHORTER: the README's 200 epochs and
the default 250 concept steps are many CPU minutes each on a shared 2-core machine; the length is
the only change). A command is skipped only when it needs what this machine lacks
(real weights, a data set, a GPU, the package index) or would run this suite itself; each skip says
why, and `test_every_skip_is_for_a_stated_reason` lists them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import ROOT, free_port, image_bytes, wait_until_ok, worker_env

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"

# (a piece of the command, why it cannot run here)
SKIPS = (
    ("bash .ci/run", "installs the project and runs the whole suite, this test included"),
    (".venv/bin/python -m pytest -q", "the whole suite, this test included"),
    ("attnseg up --model stable-diffusion-v1-5", "starts stable-diffusion-v1-5: needs the real weights from the hub"),
    ("attnseg up &", "a second tiny-colour stack; the first-run command has its own test"),
    (
        "evaluate synthetic --scenes 100",
        "the quality table of bench/RESULTS.md (minutes); test_semantic runs it on 4 scenes",
    ),
    ("ATTNSEG_SD_MODEL=/models/sd-1-5", "needs real weights in a local directory"),
    ("CompVis/stable-diffusion-v1-4", "needs the real SD 1.4 weights (and the COCO-Stuff-27 data)"),
    ("evaluate referring", "needs the Mug19 data set and its concepts"),
    ("pip install uv", "needs the package index"),
    ("requirements/compile.sh", "re-resolves the lock against the package index"),
    ("--device cuda", "needs a GPU"),
    ("bench.bench_service", "a benchmark of several minutes on a stack of its own (bench/RESULTS.md)"),
)


# (as written, as run): the training length, nothing else
SHORTER = (
    ("epochs=200", "epochs=2"),
    ("--epochs 200", "--epochs 2"),
    ("--identifier my-mug --class-word mug", "--identifier my-mug --class-word mug --steps 2 --batch-size 1"),
    (
        "-F class_word=mug \\\n     http://127.0.0.1:8000/concepts/train",
        "-F class_word=mug -F steps=2 -F batch_size=1 \\\n     http://127.0.0.1:8000/concepts/train",
    ),
    ('"my-mug", "mug")', '"my-mug", "mug", steps=2, batch_size=1)'),
)


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str


def readme_blocks() -> list[Block]:
    """The fenced blocks (indented ones too, as in a list item), dedented."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^( *)```(\w+)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(match.group(1))
        code = "".join(line[indent:] + "\n" for line in match.group(3).splitlines())
        for written, shorter in SHORTER:
            code = code.replace(written, shorter)
        blocks.append(Block(text[: match.start()].count("\n") + 1, match.group(2), code))
    return blocks


def commands(code: str) -> list[str]:
    """A shell block's commands: one per line, a trailing backslash continuing it."""
    return [command.strip() for command in code.replace("\\\n", " ").splitlines() if command.strip()]


def is_first_run(command: str) -> bool:
    return command.split("#")[0].strip() == ".venv/bin/attnseg up"


def skip_reason(command: str) -> str | None:
    return next((reason for piece, reason in SKIPS if piece in command), None)


def learn(ids: dict[str, str], output: str) -> None:
    """The README's example ids, bound to the real ones an answer (API or CLI JSON) carries."""
    try:
        answer = json.loads(output)
    except ValueError:
        return
    if not isinstance(answer, dict):
        return
    kind = answer.get("kind")
    if kind == "unsupervised":
        ids["5c0e…"] = answer["id"]
    elif kind == "text":
        ids["<id>"] = answer["id"]
    elif kind == "oneshot_train":
        ids.update({"<job>": answer["id"], "3f2a…": answer["model_id"]})
    elif kind == "oneshot_segment":
        ids["<segment job>"] = answer["id"]
    elif kind == "concept_train":
        ids.update({"<job>": answer["id"], "9b1e…": answer["concept_id"]})
    elif "train_job_id" in answer:  # a model, as `oneshot train` prints it
        ids.update({"3f2a…": answer["id"], "<job id>": answer["train_job_id"]})
    elif "identifier" in answer and kind is None:  # a concept, as `concept train` prints it
        ids["9b1e…"] = answer["id"]


def with_ids(code: str, ids: dict[str, str], base_url: str) -> str:
    for example, real in ids.items():
        code = code.replace(example, real)
    unbound = re.findall(r"[0-9a-f]{4}…|<(?:job|id|segment job|job id)>", code)
    assert not unbound, f"no earlier command gave the id {unbound[0]} stands for"
    return code.replace(README_URL, base_url)


def jpeg(path: Path, seed: int, size=(96, 64)) -> None:
    path.write_bytes(image_bytes(*size, fmt="JPEG", seed=seed))


def three_part_mask() -> np.ndarray:
    """Ids 1, 2, 3 side by side under a background band, as "wheel window body" name them."""
    mask = np.zeros((64, 96), np.uint8)
    for part in range(3):
        mask[16:, 32 * part : 32 * (part + 1)] = part + 1
    return mask


def pictures(folder: Path) -> None:
    """Every picture the README names."""
    for seed, name in enumerate(["cat.jpg", "park.jpg", "car.jpg", "another_car.jpg", "table.jpg"]):
        jpeg(folder / name, seed)
    Image.fromarray(three_part_mask()).save(folder / "car_mask.png")
    for sub, count in (("photos", 2), ("more_cars", 1)):
        (folder / sub).mkdir()
        for i in range(count):
            jpeg(folder / sub / f"{sub}{i}.jpg", 10 + i)
    for i in (1, 2, 3):
        jpeg(folder / f"mug{i}.jpg", 20 + i)


def diffusers_files(folder: Path) -> None:
    """What the diffusers scripts would have written, for the import example: the concept the CLI
    exported to my-mug/, its weights as the scripts' torch `.bin`."""
    import torch
    from safetensors.torch import load_file

    (folder / "learned_embeds.safetensors").write_bytes((folder / "my-mug" / "learned_embeds.safetensors").read_bytes())
    weights = load_file(folder / "my-mug" / "pytorch_custom_diffusion_weights.safetensors")
    torch.save(weights, folder / "pytorch_custom_diffusion_weights.bin")


def run_shell(command: str, folder: Path, env: dict) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        return done.stdout
    if isinstance(answer, dict):  # neither the API's error envelope nor a failed job
        assert set(answer) != {"error"} and answer.get("status") != "failed", f"{command}\n{done.stdout}"
    return done.stdout


def no_error_saved(command: str, folder: Path) -> None:
    """`curl -s -o FILE` saves whatever comes: an error body there is a failed step."""
    saved = re.search(r"-o (\S+)", command)
    if saved and command.startswith("curl"):
        assert not (folder / saved.group(1)).read_bytes().startswith(b'{"error"'), command


def shell_env(folder: Path, base_url: str) -> dict:
    """The README's `.venv/bin/...` inside `folder`, running this tree's code."""
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSEG_")}
    return {**env, "PYTHONPATH": str(ROOT), "ATTNSEG_URL": base_url, "HF_HUB_OFFLINE": "1"}


TRAINS_A_CONCEPT = ("concept train", "concepts/train", "train_concept(")


def one_concept_at_a_time(base_url: str) -> None:
    """The README's examples each teach `my-mug`, as a newcomer tries one at a time; identifiers are
    unique per tenant, so the one an earlier example taught goes first."""
    from attnseg.client import Client

    with Client(base_url) as client:
        for concept in client.concepts(limit=500):
            if concept.state.identifier == "my-mug":
                concept.delete()


def until_ready(base_url: str, concept_id: str) -> None:
    """Export needs a ready concept: wait, as a user waits for training to end."""
    from attnseg.client import Client

    with Client(base_url) as client:
        client.concept(concept_id).wait(timeout=900)


def test_every_shortening_applies():
    text = README.read_text()
    assert [written for written, _ in SHORTER if written not in text] == []


def test_every_skip_is_for_a_stated_reason():
    skipped = [
        (block.line, command)
        for block in readme_blocks()
        if block.language == "bash"
        for command in commands(block.code)
        if skip_reason(command)
    ]
    assert skipped, "no skipped command: drop the SKIPS that match nothing"
    for piece, reason in SKIPS:
        assert any(piece in command for _, command in skipped), f"SKIPS entry {piece!r} ({reason}) matches nothing"


def test_the_first_run_command_starts_the_stack_as_written(tmp_path, shared_stack):
    """`.venv/bin/attnseg up`, word for word (the demo model, no weights configured; its port moved by
    the environment, 8000 being another's on a shared machine), until ready; Ctrl-C stops it cleanly."""
    command = next(c for b in readme_blocks() for c in commands(b.code) if is_first_run(c)).split("#")[0].strip()
    port = free_port()
    env = {
        **shell_env(tmp_path, ""),
        **worker_env("unused", shared_stack.cache_dir),
        "PYTHONPATH": str(ROOT),
        "ATTNSEG_API_PORT": str(port),
    }
    del env["ATTNSEG_REDIS_URL"]  # `up` is told of no Redis: it starts its own
    del env["ATTNSEG_SD_MODEL"]  # nor of weights: it runs tiny-colour
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(command.split(), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/readyz", timeout=300, message="the stack of `attnseg up`")
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=120)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_every_block_runs_as_written(tmp_path, shared_stack, tiny_sd, monkeypatch):
    from attnseg.client import Client

    base_url = shared_stack.base_url
    pictures(tmp_path)
    env = shell_env(tmp_path, base_url)
    monkeypatch.chdir(tmp_path)
    ids: dict[str, str] = {}
    namespace: dict = {}
    ran, skipped = [], []
    for block in readme_blocks():
        if block.language == "python":
            code = with_ids(block.code, ids, base_url)
            if any(piece in code for piece in TRAINS_A_CONCEPT):
                one_concept_at_a_time(base_url)
            if "Client(" not in code and "client." in code:  # a bullet's example, on the client above
                namespace["client"] = Client(base_url)
            if "(sd," in code:  # the Python API without the service: a loaded model and pictures
                rng = np.random.default_rng(0)
                namespace.update(
                    sd=tiny_sd,
                    photos=[rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(3)],
                    scene=rng.integers(0, 256, (64, 96, 3), np.uint8),
                )
            exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
            ran.append(block.line)
        elif block.language == "bash":
            for command in commands(block.code):
                if skip_reason(command) or is_first_run(command):
                    skipped.append(command)  # the first-run `up` has its own test above
                    continue
                if "concepts/import" in command:
                    diffusers_files(tmp_path)
                if any(piece in command for piece in TRAINS_A_CONCEPT):
                    one_concept_at_a_time(base_url)
                if "/files/" in command:
                    until_ready(base_url, ids["9b1e…"])
                learn(ids, run_shell(with_ids(command, ids, base_url), tmp_path, env))
                no_error_saved(command, tmp_path)
                ran.append(block.line)
    assert (tmp_path / "results.json").exists() and (tmp_path / "found").is_dir() and (tmp_path / "my-mug").is_dir()
    print(f"ran {len(ran)} commands and blocks; skipped {len(skipped)}: {skipped}")
