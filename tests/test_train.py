"""The training and evaluation CLIs on a tiny dataset: resume bit for bit, DDP ranks agree, evaluate."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from PIL import Image

import sdnet
from sdnet import load_card, load_checkpoint
from sdnet.cards import markdown_table
from sdnet.data import ImageSet, align_classes, cache_dir
from sdnet.evaluate import main as evaluate_main
from sdnet.train import main as train_main

TINY = ["--model", "sdnet18_all", "--no-shortcut", "--width", "4", "--batch-size", "8", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:  # decoded-image cache of this module's own, undone afterwards
        mp.setenv("SDNET_CACHE", str(root / "cache"))
        yield str(make_image_folder(root / "tree", n_train=8, n_test=4))


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    from argparse import Namespace

    from sdnet.train import lr_at
    warm = Namespace(lr=0.1, warmup_epochs=1.0)  # 10 steps an epoch, 100 in all: 10 of warm-up, 90 of cosine
    assert [lr_at(s, 100, warm, 10) for s in (0, 4, 9, 10, 55, 100)] == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.05, 0.0])
    cold = Namespace(lr=0.1, warmup_epochs=0.0)
    assert [lr_at(s, 100, cold, 10) for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0])


def test_resume_continues_bit_for_bit(tmp_path, data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(TINY + ["--data", data, "--epochs", "3", "--out", str(straight)])
    train_main(TINY + ["--data", data, "--epochs", "3", "--out", str(resumed), "--stop-after", "1"])
    assert json.loads((resumed / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    assert not (resumed / "model.pt").exists()
    # the command recorded is one that trains the model: not its time slot (on its own it stops after 1 of 3)
    command = json.loads((resumed / "config.json").read_text())["command"]
    assert "--stop-after" not in command and command.endswith(f"--out {resumed}")
    # a second time slot counts its epochs from where the first stopped (from 0, it trained nothing)
    train_main(TINY + ["--data", data, "--epochs", "3", "--out", str(resumed), "--resume", "--stop-after", "1"])
    assert [json.loads(line)["epoch"] for line in (resumed / "log.jsonl").read_text().splitlines()] == [1, 2]
    train_main(TINY + ["--data", data, "--epochs", "3", "--out", str(resumed), "--resume"])
    a, b = _weights(straight / "last.pt"), _weights(resumed / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert {"train_loss", "train_acc", "test_acc", "lr", "images_per_second"} <= log[-1].keys()
    # the lr of each epoch's last step (3 steps an epoch): the cosine to 0 over the 9, with no warm-up
    assert [r["lr"] for r in log] == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 9)) for s in (2, 5, 8)])
    # weight decay on the convolutions and the linear layer only: BatchNorm and biases (1-d) in a group without it
    groups = torch.load(resumed / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert len(groups[1]["params"]) == sum(p.ndim <= 1 for p in sdnet.build_model(
        "sdnet18_all", width=4, num_classes=3, shortcut=False).parameters())
    # the final checkpoint is self-describing and its dictionaries are unit-norm (projected SGD)
    model, meta = load_checkpoint(resumed / "model.pt")
    # as many outputs as the folder has classes (three of CIFAR-10's here)
    assert meta["config"]["width"] == 4 and meta["classes"] == ["airplane", "automobile", "bird"]
    assert meta["config"]["num_classes"] == 3 and model.linear.out_features == 3
    norms = model.conv1.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the run wrote a model card saying what it trained and how
    card = load_card(resumed / "model.pt")
    assert card["architecture"] == "sdnet18_all" and card["width"] == 4 and card["shortcut"] is False
    assert (card["lam"], card["n_steps"], card["dataset"]) == (0.1, 2, "cifar10")
    assert card["epochs"] == 3 and card["training"]["command"].startswith("python -m sdnet.train ")
    assert card["name"] == "sdnet18_all-w4-e3 (no shortcuts)"  # two schedules of one model get two names
    assert "--resume" in card["training"]["command"] and card["training"]["seconds"] == log[-1]["train_seconds"]
    assert card["training"]["train_subset"] is None  # the whole split (it was said only inside the command)
    # training changed the weights
    assert not torch.equal(a["conv1.weight"], _weights_init())


def test_the_recorded_command_leaves_out_the_time_slot_in_every_spelling():
    from sdnet.train import reproducing_command
    for argv in (["--epochs", "3", "--stop-after", "1", "--resume"], ["--epochs", "3", "--stop-after=1", "--resume"],
                 ["--epochs", "3", "--stop-a", "1", "--resume"]):
        assert reproducing_command(argv) == "python -m sdnet.train --epochs 3 --resume", argv
    assert reproducing_command(["--seed", "5", "--out", "a b"]) == "python -m sdnet.train --seed 5 --out 'a b'"


def test_resume_says_when_the_step_size_rule_changed_since_the_state_was_written(tmp_path, data, capsys):
    """A training state records each layer's step-size rule; one written before the FFT bound (none recorded: every
    layer had Lanczos) resumes with the image layer on the bound, and says so; a state of this version says
    nothing."""
    for run in (tmp_path / "now", tmp_path / "older"):
        train_main(TINY + ["--data", data, "--epochs", "2", "--out", str(run), "--stop-after", "1"])
    state = torch.load(tmp_path / "now" / "last.pt", weights_only=True)
    assert state["step_sizes"]["conv1"] == "fft" and state["step_sizes"]["layer1.0.conv1"] == "lanczos"
    capsys.readouterr()
    train_main(TINY + ["--data", data, "--epochs", "2", "--out", str(tmp_path / "now"), "--resume"])
    assert "step-size rule" not in capsys.readouterr().out
    del state["step_sizes"]  # as an older sdnet wrote it
    torch.save(state, tmp_path / "older" / "last.pt")
    train_main(TINY + ["--data", data, "--epochs", "2", "--out", str(tmp_path / "older"), "--resume"])
    out = capsys.readouterr().out
    assert "note: --resume: the step-size rule of conv1 (lanczos there, fft here) differs" in out
    assert "layer1.0.conv1" not in out.split("note:")[1].split("\n")[0]


def _weights_init():
    torch.manual_seed(0)
    from sdnet import build_model
    return build_model("sdnet18_all", num_classes=3, width=4, shortcut=False).state_dict()["conv1.weight"]


def test_train_never_overwrites_or_mixes_up_runs_and_fails_in_one_line(tmp_path, data, capsys):
    """A finished run is not overwritten without --resume; --resume refuses another run's state; a missing dataset
    or a foreign last.pt ends in one line; none of it writes anything."""
    run = tmp_path / "run"
    train_main(TINY + ["--data", data, "--epochs", "1", "--out", str(run)])
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    for args, message in [(TINY + ["--data", data, "--epochs", "1"], "already holds a training run"),
                          (TINY + ["--model", "resnet18", "--data", data, "--epochs", "1", "--resume"],
                           "is a different run (model='sdnet18_all' there, 'resnet18' here)"),
                          (TINY + ["--data", data, "--epochs", "1", "--width", "8", "--resume"], "width=4 there, 8 here")]:
        with pytest.raises(SystemExit) as info:
            train_main(args + ["--out", str(run)])
        assert message in str(info.value), info.value
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    (run / "last.pt").unlink()  # a model.pt alone (its last.pt removed, or copied in) is a run all the same
    with pytest.raises(SystemExit, match=r"already holds a training run \(model.pt\)"):
        train_main(TINY + ["--data", data, "--epochs", "1", "--out", str(run)])
    with pytest.raises(SystemExit, match=r"^error: dataset not found at") as info:
        train_main(TINY + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()  # no empty run folder left behind
    # a tree without test/: refused before its training images are decoded (minutes for CIFAR's, the first time)
    train_only = shutil.copytree(data, tmp_path / "train-only", ignore=shutil.ignore_patterns("test"))
    import sdnet.data
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sdnet.data, "_decode_all", lambda files: pytest.fail("decoded before the refusal"))
        with pytest.raises(SystemExit, match=r"^error: no 'test' folder in "):
            train_main(TINY + ["--data", str(train_only), "--out", str(tmp_path / "fresh")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(2)}, foreign / "last.pt")
    with pytest.raises(SystemExit, match="not a training state written by python -m sdnet.train"):
        train_main(TINY + ["--data", data, "--out", str(foreign), "--resume"])
    finished = tmp_path / "finished"
    finished.mkdir()
    shutil.copy(run / "model.pt", finished / "model.pt")  # a finished run whose last.pt is gone
    with pytest.raises(SystemExit, match="holds a model.pt but no last.pt"):
        train_main(TINY + ["--data", data, "--out", str(finished), "--resume"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train_main(TINY + ["--data", data, "--out", str(tmp_path / "a-file")])


def test_ctrl_c_says_what_was_kept_in_one_line(tmp_path, data, capsys, monkeypatch):
    """Ctrl-C printed some 45 lines of torch stack; now one line says whether --resume has an epoch to go on from."""
    import sdnet.train as train_module
    run = tmp_path / "run"
    args = TINY + ["--data", data, "--epochs", "2", "--out", str(run)]
    steps = {"n": 0}
    real = train_module.refresh_step_sizes

    def interrupt_at(n):
        def refresh(model, **kw):
            steps["n"] += 1
            if steps["n"] == n:
                raise KeyboardInterrupt
            return real(model, **kw)
        return refresh
    monkeypatch.setattr(train_module, "refresh_step_sizes", interrupt_at(1))
    with pytest.raises(SystemExit) as info:
        train_main(args)
    assert info.value.code == 130
    assert capsys.readouterr().err.strip().endswith("interrupted; no epoch had finished, nothing was saved")
    monkeypatch.setattr(train_module, "refresh_step_sizes", real)
    # a --train-subset larger than the split is the whole split, said so, and recorded as such
    train_main(args + ["--stop-after", "1", "--resume", "--train-subset", "100000"])
    assert "--train-subset 100000: the split has" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["train_subset"] is None
    steps["n"] = 0
    monkeypatch.setattr(train_module, "refresh_step_sizes", interrupt_at(2))
    with pytest.raises(SystemExit):
        train_main(args + ["--resume"])
    assert "last.pt holds the last finished epoch: rerun the same command with --resume" in capsys.readouterr().err
    # under torchrun every rank gets the Ctrl-C: only rank 0 says what was kept
    monkeypatch.setattr(train_module, "_train", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt))
    for world, rank, said in (("2", "1", False), ("2", "0", True), ("1", "3", True)):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as info:
            train_main(args + ["--resume"])
        assert info.value.code == 130 and ("interrupted;" in capsys.readouterr().err) == said


def test_sigterm_during_a_save_and_a_full_disk_end_in_a_line_that_says_what_is_kept(tmp_path, data, monkeypatch,
                                                                                    capsys):
    """SIGTERM (kill, timeout, a scheduler) printed nothing, and during a save left its scratch file for good; a
    full disk was torch's zip writer's error and an OSError, two tracebacks. last.pt is kept as it was."""
    import errno
    import signal

    import sdnet.checkpoint as checkpoint_module
    run = tmp_path / "run"
    args = TINY + ["--data", data, "--epochs", "3", "--out", str(run)]
    train_main(args + ["--stop-after", "1"])
    kept = (run / "last.pt").read_bytes()
    real_save = checkpoint_module.torch.save

    def killed_while_saving(obj, f):
        f.write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(checkpoint_module.torch, "save", killed_while_saving)
    with pytest.raises(SystemExit) as info:
        train_main(args + ["--resume"])
    assert info.value.code == 143
    assert "terminated; " in capsys.readouterr().err and (run / "last.pt").read_bytes() == kept
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt", "log.jsonl"]  # no scratch

    def full_disk(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    for fault in (full_disk, lambda obj, f: (_ for _ in ()).throw(RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 397312 vs 397216"))):
        monkeypatch.setattr(checkpoint_module.torch, "save", fault)
        with pytest.raises(SystemExit, match=r"^error: (No space left on device|writing a checkpoint failed \(is the "
                                             r"disk full\?\)); .*last.pt holds the last finished epoch"):
            train_main(args + ["--resume"])
        assert (run / "last.pt").read_bytes() == kept
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    (run / ".last.pt.killed.tmp").write_bytes(b"left by SIGKILL")  # a save killed outright: swept by a resume
    train_main(args + ["--resume", "--stop-after", "1"])
    assert not (run / ".last.pt.killed.tmp").exists()
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_training_state_of_other_shapes_is_refused_in_a_line(tmp_path, data):
    """One whose config does not say so (older, or edited) went on to load_state_dict's traceback."""
    run = tmp_path / "run"
    train_main(TINY + ["--data", data, "--epochs", "2", "--out", str(run), "--stop-after", "1"])
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save(dict(state, config="{}"), run / "last.pt")
    wider = [a if a != "4" else "8" for a in TINY]
    with pytest.raises(SystemExit, match=r"^error: --resume: .*last.pt does not fit this model: Error\(s\) in loading "
                                         r"state_dict .*size mismatch"):
        train_main(wider + ["--data", data, "--epochs", "2", "--out", str(run), "--resume"])


def test_resume_refuses_other_settings_and_leaves_a_finished_run_alone(tmp_path, data, capsys):
    """A resume with another --seed, --lr or --epochs went on silently and wrote a card naming the new values (and
    --epochs 1 on a 2-epoch run relabelled it without training); a finished run resumed rewrote model.pt."""
    run = tmp_path / "run"
    first = TINY + ["--data", data, "--epochs", "2", "--out", str(run)]
    train_main(first + ["--stop-after", "1"])
    assert set(torch.load(run / "last.pt", weights_only=True)) >= {"scaler", "power", "optimizer"}
    shutil.copy(run / "last.pt", tmp_path / "last-1.pt")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    moved, other = shutil.copytree(data, tmp_path / "moved"), shutil.copytree(data, tmp_path / "other")
    one = next((other / "train").rglob("*.png"))
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(one)
    for extra, message in ((["--seed", "5"], "seed=0 there, 5 here"), (["--lr", "1.0"], "lr=0.1 there, 1.0 here"),
                           (["--batch-size", "4"], "batch_size=8 there, 4 here"),
                           (["--weight-decay", "0"], "weight_decay=0.0005 there, 0.0 here"),
                           (["--momentum", "0.5"], "momentum=0.9 there, 0.5 here"),
                           (["--warmup-epochs", "1"], "warmup_epochs=0.0 there, 1.0 here"),
                           (["--no-nesterov"], "nesterov=True there, False here"),
                           (["--train-subset", "6"], r"train_subset=None \(the whole split\) there, 6 here"),
                           (["--amp", "bf16"], "autocast='off' there, 'bfloat16' here"),
                           # other images (it went on unsaid, its card naming the new --data alone)
                           (["--data", str(other)], "other images in --data")):
        with pytest.raises(SystemExit, match=f"is a different run .*{message}"):
            train_main(first + extra + ["--resume"])
    with pytest.raises(SystemExit, match="epochs=2 there, 3 here"):
        train_main(TINY + ["--data", data, "--epochs", "3", "--out", str(run), "--resume"])
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    # killed after logging epoch 2 but before its last.pt (the log was written first): logged once, not twice
    with open(run / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "train_acc": 0.0, "test_acc": 0.0, "train_seconds": 0.0}) + "\n")
    # what --amp auto gave on the CPU, and the same images at another path: the same run
    train_main(first + ["--amp", "off", "--data", str(moved), "--resume"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["train_seconds"] > 0
    # a line cut short by a kill mid-append (or edited by hand) is dropped with the epochs after last.pt's
    (run / "last.pt").replace(tmp_path / "last-2.pt")
    shutil.copy(tmp_path / "last-1.pt", run / "last.pt")
    (run / "model.pt").unlink()
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "tr\n"note"\n')
    capsys.readouterr()
    train_main(first + ["--resume"])
    assert "kept the lines of epochs 1-1" in capsys.readouterr().out
    assert [r["epoch"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())] == [1, 2]
    # a finished run: nothing to do, nothing rewritten, even its evaluated card
    sdnet.cards.update_card(run / "model.pt", test_accuracy=12.5)
    finished = {f.name: f.read_bytes() for f in run.iterdir()}
    capsys.readouterr()
    assert train_main(first + ["--resume"]) == {}
    assert "finished run of 2 epochs (model.pt): nothing to do" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in run.iterdir()} == finished
    # killed between model.pt and its card: the resume that has nothing to train writes the card
    (run / "model.json").unlink()
    assert train_main(first + ["--resume"]) == {} and load_card(run / "model.pt")["epochs"] == 2
    # a model.pt written by training drops what was measured on the one it replaced (its fits too: Auto λ)
    sdnet.cards.update_card(run / "model.pt", robust_fit={"gaussian": {"slope": 1.0, "intercept": 0.1}},
                            baseline="resnet.pt")
    (run / "model.pt").unlink()
    train_main(first + ["--resume"])
    assert (run / "model.pt").exists()  # killed after the last epoch's last.pt, before model.pt: written now
    card = load_card(run / "model.pt")
    assert not {"test_accuracy", "robust_fit", "baseline"} & set(card) and card["epochs"] == 2


def test_no_cuda_graphs_reaches_the_refresh_and_is_said_to_do_nothing_on_the_cpu(tmp_path, data, capsys, monkeypatch):
    import sdnet.train as train
    seen = []
    real = train.refresh_step_sizes
    monkeypatch.setattr(train, "refresh_step_sizes", lambda model, **kw: seen.append(kw) or real(model, **kw))
    train_main(TINY + ["--data", data, "--epochs", "1", "--out", str(tmp_path / "a"), "--no-cuda-graphs"])
    assert seen and all(kw == {"cuda_graphs": False} for kw in seen)
    assert "--no-cuda-graphs ignored: CUDA graphs are only used on CUDA, and this run is on cpu" in capsys.readouterr().out
    seen.clear()
    train_main(TINY + ["--data", data, "--epochs", "1", "--out", str(tmp_path / "b")])
    assert seen and all(kw == {"cuda_graphs": True} for kw in seen)


def test_an_out_folder_that_cannot_be_written_is_said_before_the_data_is_read(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(SystemExit, match=f"--out {locked / 'run'}: no permission to write in {locked}$"):
        train_main(TINY + ["--data", str(tmp_path / "no-data"), "--out", str(locked / "run")])
    # where os.access says yes and the write fails all the same (/proc, for root; others are refused by os.access)
    if Path("/proc").is_dir():
        said = r"cannot write in /proc \(.+\)" if os.access("/proc", os.W_OK) else "no permission to write in /proc"
        with pytest.raises(SystemExit, match=rf"--out /proc/x: {said}$"):
            train_main(TINY + ["--data", str(tmp_path / "no-data"), "--out", "/proc/x"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit, match="a-file is a file, not a folder"):  # NotADirectoryError
        train_main(TINY + ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "a-file" / "run")])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit, match="dangling is a symbolic link to nothing"):  # a FileExistsError at mkdir
        train_main(TINY + ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "dangling")])


def test_torchrun_two_cpu_processes_end_with_the_same_weights_and_resume_bit_for_bit(tmp_path, data):
    """Two ranks agree; and a run stopped after epoch 1 and resumed ends as the straight run does (DDP's start-up
    broadcast, made after the resume had restored the step sizes, marked every dictionary changed: each layer
    estimated L afresh, and epoch 2's loss was 2.307 against 2.286)."""
    def torchrun(out: Path, *more: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sdnet.train", *TINY, "--data", data, "--epochs", "2", "--out", str(out), *more]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp"
    torchrun(out, "--save-every-rank")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(r0[k], r1[k]) for k in params)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    torchrun(tmp_path / "split", "--stop-after", "1")
    torchrun(tmp_path / "split", "--resume")
    straight, resumed = (torch.load(run / "model.pt", weights_only=True)["state_dict"] for run in (out, tmp_path / "split"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_cuda_with_mixed_precision(tmp_path, data, amp, capsys):
    """The GPU path of train and evaluate: autocast (bf16 is --amp auto's choice on CUDA, fp16 adds the
    gradient scaler), a resumed run, and a checkpoint that loads on the CPU."""
    cuda = [a if a != "cpu" else "cuda" for a in TINY] + ["--amp", amp, "--data", data, "--epochs", "2"]
    out = tmp_path / "run"
    train_main(cuda + ["--out", str(out), "--stop-after", "1"])
    train_main(cuda + ["--out", str(out), "--resume", "--no-cuda-graphs"])  # the refresh kernel by kernel
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in log)
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda" and config["amp"] == amp
    model, _ = load_checkpoint(out / "model.pt")  # weights stay float32 under autocast; the file holds no device
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not torch.equal(model.conv1.weight, _weights_init())
    norms = model.conv1.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    capsys.readouterr()
    on_gpu = evaluate_main(["--checkpoint", str(out / "model.pt"), "--data", data, "--json", "--device", "cuda"])
    on_cpu = evaluate_main(["--checkpoint", str(out / "model.pt"), "--data", data, "--json", "--device", "cpu"])
    assert on_gpu.layers.keys() == on_cpu.layers.keys()
    for name in on_cpu.layers:  # float32 on either device, but cuDNN convolutions default to TF32 on the GPU
        assert on_gpu.layers[name] == pytest.approx(on_cpu.layers[name], rel=1e-2), name


def test_evaluate_cli_json_lambda_and_corruption(tmp_path, data, capsys):
    run = tmp_path / "run"
    train_main(TINY + ["--data", data, "--epochs", "1", "--out", str(run)])
    ckpt = str(run / "model.pt")
    capsys.readouterr()
    base = ["--checkpoint", ckpt, "--data", data, "--json", "--device", "cpu"]
    clean = evaluate_main(base)
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_images"] == 12 and printed["accuracy"] == clean.accuracy
    assert printed["data"] == data and printed["images_from"]  # what was given (it was the unpacked copy's path)
    assert printed["n_steps"] is None and printed["trained_n_steps"] == 2 and printed["trained_lam"] == 0.1
    assert set(printed["layers"]) and printed["layers"].keys() == clean.layers.keys()
    high = evaluate_main(base + ["--lam", "2.0"])
    assert high.lam == 2.0 and high.layers["conv1"] > clean.layers["conv1"]  # more shrinkage, worse fit
    noisy = evaluate_main(base + ["--corruption", "gaussian", "--severity", "5"])
    assert noisy.corruption == "gaussian" and noisy.severity == 5
    assert noisy.layers["conv1"] != clean.layers["conv1"]
    # the same noise whatever the batches (it was drawn per batch: --batch-size changed the accuracy)
    small = evaluate_main(base + ["--corruption", "gaussian", "--severity", "5", "--batch-size", "5"])
    assert small.accuracy == noisy.accuracy and small.layers.keys() == noisy.layers.keys()
    for name, value in noisy.layers.items():  # None: a layer fed only zeros (this tiny model may have some)
        assert small.layers[name] == (None if value is None else pytest.approx(value, rel=1e-5)), name
    # --update-card records the clean accuracy at the trained lambda, and the command that measured it
    capsys.readouterr()
    evaluate_main(base + ["--update-card"])
    said = capsys.readouterr()
    json.loads(said.out)  # stdout stays one JSON object; what was written is said on stderr
    assert f"updated the card {Path(ckpt).with_suffix('.json')}: test accuracy" in said.err
    card = load_card(ckpt)
    assert said.err.rstrip().endswith(f"{card['test_accuracy']}% on 12 images")
    assert card["test_accuracy"] == round(clean.accuracy, 2) and card["test_images"] == 12
    assert card["evaluation"]["command"].endswith("--update-card") and card["architecture"] == "sdnet18_all"
    assert "random subset" not in card["data"]
    with pytest.raises(SystemExit, match="records the test accuracy: drop --split train"):
        evaluate_main(base + ["--update-card", "--split", "train"])  # train accuracy was stored as test_accuracy
    evaluate_main(base + ["--update-card", "--subset", "100000"])  # more than the split: all of it, no subset
    assert "random subset" not in load_card(ckpt)["data"]
    # a subset must not replace a card's accuracy on more images (--subset 20 wrote 85% over 86.07% on 9000)
    with pytest.raises(SystemExit,
                       match=r"accuracy \([0-9.]+%\) is on 12 images and --subset leaves 5: .*drop --subset"):
        evaluate_main(base + ["--update-card", "--subset", "5"])
    assert load_card(ckpt)["test_images"] == 12
    sdnet.cards.update_card(ckpt, test_images=9000)  # measured on a larger split than this data: no --subset to blame
    evaluate_main(base + ["--update-card"])
    assert load_card(ckpt)["test_images"] == 12
    row = markdown_table([ckpt]).splitlines()[-1]
    assert f"{card['test_accuracy']:.2f}%" in row and "sdnet18_all" in row and "| no |" in row
    # two runs' model.pt are told apart by their folders; a file that is not there is said to be missing
    other = Path(ckpt).parent.parent / "other" / "model.pt"
    rows = markdown_table([ckpt, str(other)]).splitlines()[2:]
    assert rows[0].startswith(f"| `{Path(ckpt).parent.name}/model.pt` |") and "(no such file)" in rows[1]
    (other.parent).mkdir()
    shutil.copy(ckpt, other)
    for text, said in (("[1, 2]", "(its card is not a JSON object)"), ("{not json", "(its card is not a JSON object)")):
        other.with_suffix(".json").write_text(text)
        assert said in markdown_table([ckpt, str(other)]).splitlines()[-1]  # both read "(no card)"
    other.with_suffix(".json").unlink()
    assert "(no card)" in markdown_table([ckpt, str(other)]).splitlines()[-1]
    assert all(row.count("|") == rows[0].count("|") for row in rows)  # as many cells as the header (10 for 11)
    for other in (["--lam", "0.5"], ["--corruption", "gaussian"], ["--n-steps", "4"]):  # never the card's headline
        with pytest.raises(SystemExit, match="records the card's headline accuracy: clean images at the trained"):
            evaluate_main(base + ["--update-card", *other])
    # the text output names the λ it ran at, and a corruption's default severity is 3
    capsys.readouterr()
    text = [a for a in base if a != "--json"]
    evaluate_main(text + ["--lam", "2.0"])
    evaluate_main(text + ["--corruption", "gaussian"])
    out = capsys.readouterr().out
    assert "(clean, lambda 2.0)" in out and "(gaussian severity 3, lambda trained)" in out
    # the checkpoint carries the step sizes of training; --fresh-step-size estimates them again instead
    capsys.readouterr()
    fresh = evaluate_main(base + ["--fresh-step-size"])
    assert json.loads(capsys.readouterr().out)["fresh_step_size"] is True
    assert fresh.layers.keys() == clean.layers.keys() and fresh.layers != clean.layers
    with pytest.raises(SystemExit, match="step sizes"):
        evaluate_main(base + ["--update-card", "--fresh-step-size"])
    # --baseline links the ResNet to compare with (a checkpoint in the same folder), only into the card
    shutil.copy(run / "model.pt", run / "sdnet-copy.pt")
    with pytest.raises(SystemExit, match="sdnet-copy.pt is a sdnet18_all, not a ResNet"):
        evaluate_main(base + ["--update-card", "--baseline", "sdnet-copy.pt"])
    sdnet.save_checkpoint(run / "other.pt", sdnet.build_model("resnet18", width=2, num_classes=3))
    (run / "model.json").write_text(load_card(ckpt) and "{not json")  # a hand edit gone wrong
    with pytest.raises(SystemExit, match="is not a JSON object .* nothing was written"):
        evaluate_main(base + ["--update-card"])  # it was rewritten with the new fields only
    assert (run / "model.json").read_text() == "{not json"
    sdnet.write_card(ckpt, card)
    with pytest.raises(SystemExit, match="needs --update-card"):
        evaluate_main(base + ["--baseline", "other.pt"])
    with pytest.raises(SystemExit, match="same folder"):
        evaluate_main(base + ["--update-card", "--baseline", "missing.pt"])
    with pytest.raises(SystemExit, match="bare file name"):
        evaluate_main(base + ["--update-card", "--baseline", str(run / "other.pt")])
    with pytest.raises(SystemExit, match="the checkpoint itself"):
        evaluate_main(base + ["--update-card", "--baseline", "model.pt"])
    real_access = os.access  # a folder the card cannot be written into: said before the evaluation, not after it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda path, mode: Path(path) != run and real_access(path, mode))
        with pytest.raises(SystemExit, match=f"model card .* cannot be written: no permission to write in {run}$"):
            evaluate_main(base + ["--update-card"])
    (run / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="junk.pt"):
        evaluate_main(base + ["--update-card", "--baseline", "junk.pt"])
    assert "baseline" not in load_card(ckpt)  # nothing recorded by a refused command
    capsys.readouterr()
    evaluate_main(base + ["--update-card", "--baseline", "other.pt"])
    assert load_card(ckpt)["baseline"] == "other.pt"
    assert "note: the baseline other.pt has width 2, this model 4" in capsys.readouterr().err  # allowed, and said
    sdnet.save_checkpoint(run / "same.pt", sdnet.build_model("resnet18", width=4, num_classes=3))
    evaluate_main(base + ["--update-card", "--baseline", "same.pt"])
    assert "note: the baseline" not in capsys.readouterr().err  # the same width: nothing to say


def test_evaluate_cli_clear_errors(tmp_path, data):
    with pytest.raises(SystemExit, match="no file at"):
        evaluate_main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", data])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt"):
        evaluate_main(["--checkpoint", str(bad), "--data", data])


@pytest.mark.parametrize("args, message", [
    (["--subset", "-3"], "--subset: expected a positive integer"), (["--subset", "0"], "--subset: expected a positive"),
    (["--lam", "-1"], "--lam: lambda for every CSC layer must be in"), (["--lam", "nan"], "--lam: lambda"),
    (["--n-steps", "0"], "--n-steps: n_steps for every CSC layer must be an integer"),
    (["--corruption", "gaussian", "--severity", "0"], "--severity: expected a severity 1..5 or a positive"),
    (["--severity", "2"], "--severity needs --corruption"), (["--batch-size", "0"], "--batch-size: expected a positive"),
    (["--corruption", "impulse", "--severity", "1.5"], "--severity 1.5 for impulse: impulse amount must be in (0, 1]"),
    # a severity out of 1..5 is read as the level c: for Gaussian noise 7 was a std of 7 pixel ranges, silently
    (["--corruption", "gaussian", "--severity", "7"], "--severity 7 for gaussian: 7 is not a CIFAR-10-C severity (1..5)"),
    (["--corruption", "impulse", "--severity", "6"], "--severity 6 for impulse: 6 is not a CIFAR-10-C severity (1..5)"),
    (["--seed", "-1"], "--seed: expected a seed from 0 to 2147483647")])
def test_evaluate_cli_refuses_bad_arguments_with_a_usage_error(args, message, capsys):
    """A bad number is an argparse error (exit code 2, the usage line and what is wrong), never a traceback
    or a silent surprise (--subset -3 used to evaluate all but 3 images, a Python slice)."""
    with pytest.raises(SystemExit) as info:
        evaluate_main(["--checkpoint", "unused.pt"] + args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    from sdnet.train import main
    with pytest.raises(SystemExit, match="--amp fp16 needs a CUDA device .* use --amp bf16 or off"):
        main(["--device", "cpu", "--amp", "fp16", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_train_and_robust_cli_refuse_bad_arguments(capsys):
    from sdnet.robust import main as robust_main
    from sdnet.train import parse_args as train_args
    for parse, args, message in [(train_args, ["--lam", "-1"], "--lam: lambda"),
                                 (train_args, ["--n-steps", "0"], "--n-steps: n_steps"),
                                 (train_args, ["--train-subset", "-5"], "--train-subset: expected a positive"),
                                 # SGD's own ValueError was a traceback; nan ended in eigh failing to converge
                                 (train_args, ["--lr", "-1"], "--lr: expected a positive number"),
                                 (train_args, ["--lr", "nan"], "--lr: expected a positive number"),
                                 (train_args, ["--momentum", "1"], "--momentum: expected a number in [0, 1)"),
                                 (train_args, ["--momentum", "0"], "Nesterov momentum needs --momentum above 0"),
                                 (train_args, ["--weight-decay", "-1"], "--weight-decay: expected a number >= 0"),
                                 (train_args, ["--warmup-epochs", "-1"], "--warmup-epochs: expected a number >= 0"),
                                 (train_args, ["--warmup-epochs", "5", "--epochs", "2"],
                                  "--warmup-epochs (5) must be fewer than --epochs (2)"),
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--n-steps", "0"], "--n-steps: n_steps"),
                                 (robust_main, ["eval", "--checkpoint", "x.pt", "--sweep-subset", "-5"], "expected an integer >= 0"),
                                 (robust_main, ["eval", "--checkpoint", "x.pt", "--threads", "-3"], "expected an integer >= 0"),
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--levels=-1"], "--levels: expected a severity"),
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--noise", "impulse", "--levels", "1.5"],
                                  "impulse at 1.5: impulse amount must be in (0, 1]"),
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--levels", "0"],
                                  "needs two or more noise levels"),  # a flat line would replace the card's fits
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--lams", "0.1:inf:0.1"], "expected finite"),
                                 (robust_main, ["fit", "--checkpoint", "x.pt", "--lams", "0:100:1e-8"], "at most 1000"),
                                 (robust_main, ["adversarial", "--checkpoint", "x.pt", "--tuned-lam", "-1"],
                                  "--tuned-lam takes a lambda or auto"),
                                 (robust_main, ["adversarial", "--checkpoint", "x.pt", "--step-factor", "-1"],
                                  "--step-factor: expected a positive number")]:
        with pytest.raises(SystemExit) as info:
            parse(args)
        assert info.value.code == 2 and message in capsys.readouterr().err, args


def test_a_whole_severity_above_5_used_as_shot_noises_level_is_said(capsys):
    """Shot noise takes any positive level, so --severity 6 ran at c = 6 (8x the noise of severity 5) with no word
    of it, where the other noises refuse a 6 as no CIFAR-10-C severity."""
    from sdnet.robust import main as robust_main
    with pytest.raises(SystemExit):  # (the checkpoint is not there: after the parse)
        evaluate_main(["--checkpoint", "unused.pt", "--corruption", "shot", "--severity", "6"])
    assert "note: --severity 6 is not a CIFAR-10-C severity (1..5): it is used as shot noise's level c = 6" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        robust_main(["fit", "--checkpoint", "unused.pt", "--noise", "shot", "--levels", "1,6", "--no-png"])
    assert "note: 6 is not a CIFAR-10-C severity (1..5): it is used as shot noise's level c = 6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", "unused.pt", "--corruption", "shot", "--severity", "60"])
    assert "note" not in capsys.readouterr().err  # 60: a level near CIFAR-10-C's (50 to 500), as meant


def test_evaluate_cli_refuses_what_does_not_apply(tmp_path, data):
    """A ResNet has no lambda to change, and a checkpoint cannot be scored on data with other classes."""
    run = tmp_path / "run"
    train_main(TINY + ["--model", "resnet18", "--data", data, "--epochs", "1", "--out", str(run)])
    assert not {"lam", "n_steps"} & set(load_card(run / "model.pt"))  # its card names no λ it does not have
    # a checkpoint without a card gets one that describes it, not only the fields the tool measured (cards_table
    # showed "None" for its architecture, width and epochs)
    bare = tmp_path / "bare" / "rn.pt"
    bare.parent.mkdir()
    shutil.copy(run / "model.pt", bare)
    evaluate_main(["--checkpoint", str(bare), "--data", data, "--device", "cpu", "--update-card"])
    card = load_card(bare)
    assert {k: card[k] for k in ("name", "architecture", "width", "shortcut", "epochs", "dataset")} == {
        "name": "resnet18-w4-e1 (no shortcuts)", "architecture": "resnet18", "width": 4, "shortcut": False, "epochs": 1,
        "dataset": "cifar10"} and "lam" not in card
    assert "| `rn.pt` | resnet18 | 4 | no | - | - | 1 |" in markdown_table([bare])  # TINY has --no-shortcut
    base = ["--checkpoint", str(run / "model.pt"), "--data", data, "--device", "cpu"]
    with pytest.raises(SystemExit, match="has no CSC layer"):
        evaluate_main(base + ["--lam", "0.5"])
    # the data's classes are matched to the model's by name: a folder with some of them, not in the model's
    # order, is scored as the model sees those classes; a class the model does not know is an error
    folder, some = Path(data), tmp_path / "some"
    names = sorted(p.name for p in (folder / "test").iterdir())
    for c in names[1:]:
        shutil.copytree(folder / "test" / c, some / "test" / c)
    part = evaluate_main(["--checkpoint", str(run / "model.pt"), "--data", str(some), "--device", "cpu"])
    assert part.n_images == sum(1 for c in names[1:] for _ in (folder / "test" / c).iterdir())
    aligned = align_classes(ImageSet(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1]), ["c", "b"], "x"),
                            ["a", "b", "c"], 3)
    assert aligned.labels.tolist() == [2, 1, 1] and aligned.classes == ["a", "b", "c"]
    shutil.copytree(folder / "test" / names[0], some / "test" / "unicorn")
    decoded = set((cache_dir() / "decoded").iterdir())
    with pytest.raises(SystemExit, match="classes the model was not trained on: unicorn"):
        evaluate_main(["--checkpoint", str(run / "model.pt"), "--data", str(some), "--device", "cpu"])
    assert set((cache_dir() / "decoded").iterdir()) == decoded  # refused before decoding the images
    with pytest.raises(SystemExit, match="was trained on cifar10, not --dataset cifar100"):
        evaluate_main(base + ["--dataset", "cifar100"])
    with pytest.raises(SystemExit) as info:  # a ValueError traceback from load_split
        evaluate_main(base + ["--dataset", "imagenet"])
    assert info.value.code == 2


def test_help_of_every_cli(capsys):
    # in-process: `python -m sdnet.train` itself is started as a subprocess by the torchrun test
    from sdnet.evaluate import parse_args as evaluate_args
    from sdnet.train import parse_args as train_args
    for parse in (train_args, evaluate_args):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--help"])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and "--data" in text
        assert "--help`" not in text  # the docstring's pointer to the help, not shown inside it
    with pytest.raises(SystemExit):
        train_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--epochs EPOCHS length of the schedule (220: the paper's) (default: 220)", "--seed SEED",
                   "--momentum MOMENTUM SGD momentum (default: 0.9)"):
        assert option in text  # every option says what it does and its default


def test_data_from_the_environment_is_named_in_what_a_run_records(tmp_path, data, monkeypatch):
    """With SDNET_DATA and no --data, config.json said "data": null and the card's commands named no data: they
    did not say what the model was trained and scored on, nor reproduce the run elsewhere."""
    monkeypatch.setenv("SDNET_DATA", data)
    run = tmp_path / "run"
    train_main(TINY + ["--epochs", "1", "--out", str(run)])
    assert json.loads((run / "config.json").read_text())["data"] == data
    assert load_card(run / "model.pt")["training"]["command"].endswith(f"--data {data}")
    evaluate_main(["--checkpoint", str(run / "model.pt"), "--device", "cpu", "--update-card"])
    assert load_card(run / "model.pt")["evaluation"]["command"].endswith(f"--data {data}")
    # given on the command line, it is recorded once, as given
    evaluate_main(["--checkpoint", str(run / "model.pt"), "--device", "cpu", "--data", data, "--update-card"])
    assert load_card(run / "model.pt")["evaluation"]["command"].count("--data") == 1


def test_a_subset_as_large_as_the_split_is_the_whole_split(capsys):
    from argparse import Namespace
    from sdnet.train import _all_or_subset
    data = ImageSet(torch.zeros(6, 3, 2, 2, dtype=torch.uint8), torch.arange(6) % 2, ["a", "b"], "x")
    for asked, kept, recorded, said in ((5, 5, 5, False), (6, 6, None, False), (9, 6, None, True)):
        args = Namespace(train_subset=asked, seed=0)
        assert len(_all_or_subset(data, args, "train_subset", is_main=True)) == kept
        assert args.train_subset == recorded  # (the card's "train_subset": None is the whole split)
        assert ("--train-subset 9: the split has 6 images, all of them are used" in capsys.readouterr().out) == said
