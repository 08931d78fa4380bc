"""Every unreadable checkpoint is reported with its real cause, in one line (flowgen/checkpoints/diagnosis.py).

Each kind of bad file is written into tmp_path and passed to ``load_checkpoint``; a few go the whole way
through ``sample.py``'s path in process, and one through the real ``python sample.py``.

Tests of: flowgen/checkpoints/diagnosis.py.
"""

from __future__ import annotations

import io
import os
import pickle
import posix
import random
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from flowgen.build import run_config
from flowgen.checkpoints import diagnosis
from flowgen.checkpoints.reading import load_checkpoint
from flowgen.cli.errors import EXIT_USER_ERROR, run_reporting_errors
from flowgen.cli.sample import sample
from flowgen.errors import UserError
from tests.train_runner import REPO, run_entry

RUN_CONFIG = {"model": {"_target_": "flowgen.models.Glow", "levels": 1}, "data": {"n_bits": 5}}


def lightning_checkpoint(run_config: dict | None = RUN_CONFIG) -> dict:
    """What a Lightning checkpoint of flowgen holds, small: weights, training state, the run's configuration."""
    generator = torch.Generator().manual_seed(0)
    state = OrderedDict((f"model.layer{i}.weight", torch.randn(16, 16, generator=generator)) for i in range(4))
    hyper_parameters = {"num_levels": 32, **({"run_config": run_config} if run_config is not None else {})}
    return {"epoch": 0, "global_step": 6, "pytorch-lightning_version": "2.6.0", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1, 2, 3]}]}],
            "lr_schedulers": [], "hyper_parameters": hyper_parameters}


def saved(checkpoint, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, **kwargs)
    return buffer.getvalue()


GOOD = saved(lightning_checkpoint())


def random_bytes(seed: int, n: int = 4096, prefix: bytes = b"") -> bytes:
    return prefix + random.Random(seed).randbytes(n)


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


class RunsACommand:
    """A malicious payload: unpickling it calls os.system."""

    def __reduce__(self):
        return (os.system, ("true",))


EVIL = RunsACommand()

# name -> (the file's bytes, what the message must say)
TRUNCATED = "cannot be read: it is truncated"
TEXT = "cannot be read: it is a text file"
BINARY = "cannot be read: it holds binary data that is neither a zip archive"
NOT_TORCH_ZIP = "not a torch checkpoint (a checkpoint holds <archive>/data.pkl)"
PLAIN_PICKLE = "cannot be read: it is a Python pickle of plain data"
BARE = "is a bare state dict"
CODE = "was refused: it carries pickled Python objects that could run code"
CASES = {
    "empty": (b"", "cannot be read: it is empty (0 bytes)"),
    **{f"truncated at {cut}": (GOOD[:cut], TRUNCATED) for cut in (2, 3, 30, 200, 1000, len(GOOD) // 2,
                                                                   len(GOOD) - 22, len(GOOD) - 1)},
    "truncated non-zip torch file": (saved(lightning_checkpoint(), _use_new_zipfile_serialization=False)[:150],
                                     TRUNCATED),
    "non-zip torch file cut in its tensor data": (
        saved(lightning_checkpoint(), _use_new_zipfile_serialization=False)[:-100],
        "cannot be read: it is truncated or damaged, a torch checkpoint in the older non-zip format"),
    "truncated pickle": (pickle.dumps(list(range(1000)), protocol=2)[:500], TRUNCATED),
    "text: yaml": (b"model:\n  levels: 3\ndata:\n  n_bits: 5\n", TEXT),
    "text: words": (b"hello world, this is not a checkpoint\n" * 50, TEXT),
    "text: epoch": (b"epoch,step,val/bpd\n0,6,4.21\n", TEXT),
    "text: utf-8": ("caf\u00e9 na\u00efve \u2713\n".encode() * 100, TEXT),
    "text: latin-1": ("caf\u00e9\n".encode("latin-1"), TEXT),
    **{f"random bytes, seed {seed}": (random_bytes(seed), BINARY) for seed in range(4)},
    "random bytes after 0x80": (random_bytes(5, prefix=b"\x80"), BINARY),
    "random bytes after a pickle's 0x80 0x02": (random_bytes(6, prefix=b"\x80\x02"), BINARY),
    "random bytes after a pickle's 0x80 0x04": (random_bytes(7, prefix=b"\x80\x04"), BINARY),
    "zip of pngs": (zip_of({"a.png": b"\x89PNG\r\n\x1a\n" + bytes(100), "b.png": b"\x89PNG\r\n\x1a\n"}),
                    "cannot be read: it is a zip archive of 2 files"),
    "zip with data.pkl at its top": (zip_of({"data.pkl": pickle.dumps({}, protocol=2)}), NOT_TORCH_ZIP),
    "empty zip": (zip_of({}), "cannot be read: it is a zip archive of 0 files"),
    **{f"plain-data pickle, protocol {p}": (pickle.dumps({"epoch": 3, "lr": [0.1, 0.01]}, protocol=p), PLAIN_PICKLE)
       for p in (0, 2, 4, 5)},
    "bare state dict": (saved(lightning_checkpoint()["state_dict"]), BARE),
    "bare state dict, non-zip format": (saved(lightning_checkpoint()["state_dict"],
                                              _use_new_zipfile_serialization=False), BARE),
    "a single tensor": (saved(torch.zeros(3, 4)), "is a single tensor of shape (3, 4)"),
    "a dict without state_dict": (saved({"epoch": 1, "model": {"w": torch.zeros(2)}}),
                                  "is a dictionary without model weights (no state_dict entry"),
    "code: pickle protocol 2": (pickle.dumps(EVIL, protocol=2), CODE),
    "code: pickle protocol 4": (pickle.dumps(EVIL, protocol=4), CODE),
    "code: pickle protocol 0 (text)": (pickle.dumps(EVIL, protocol=0), CODE),
    "code: inside a torch.save zip": (saved({**lightning_checkpoint(), "extra": EVIL}, pickle_module=pickle), CODE),
    "code: inside a non-zip torch file": (saved({**lightning_checkpoint(), "extra": EVIL}, pickle_module=pickle,
                                                _use_new_zipfile_serialization=False), CODE),
}


@pytest.fixture
def no_command_runs(monkeypatch):
    """os.system is posix.system: any unpickler that resolved and called it would land here."""
    calls = []
    monkeypatch.setattr(posix, "system", lambda *args: calls.append(args) or 0)
    yield calls
    assert calls == [], "unpickling ran the checkpoint's code"


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_file_is_named_for_what_it_is(name, mmap, tmp_path, no_command_runs):
    content, expected = CASES[name]
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_checkpoint(path, mmap=mmap)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} ") and expected in message, message
    assert "\n" not in message
    if expected != CODE:
        assert "could run code" not in message


def test_good_checkpoints_load(tmp_path):
    for name, content in {"zip": GOOD, "non-zip": saved(lightning_checkpoint(),
                                                        _use_new_zipfile_serialization=False)}.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(content)
        for mmap in (False, True):  # torch maps only zips: the older format is read instead
            loaded = load_checkpoint(path, mmap=mmap)
            assert torch.equal(loaded["state_dict"]["model.layer0.weight"],
                               lightning_checkpoint()["state_dict"]["model.layer0.weight"])


def test_a_directory_and_an_unreadable_file(tmp_path, monkeypatch):
    directory = tmp_path / "last.ckpt"
    directory.mkdir()
    with pytest.raises(UserError, match="is a directory, not a checkpoint file"):
        load_checkpoint(directory)
    path = tmp_path / "locked.ckpt"
    path.write_bytes(GOOD)

    def denied(_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(diagnosis, "_open", denied)  # as root, chmod 000 would not stop a read
    message = diagnosis.why_unreadable(path, PermissionError(13, "Permission denied"))
    assert message == (f"checkpoint {path} cannot be read: permission denied; make it readable (chmod u+r) "
                       "or use a copy")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission(tmp_path):
    path = tmp_path / "locked.ckpt"
    path.write_bytes(GOOD)
    path.chmod(0)
    with pytest.raises(UserError, match="cannot be read: permission denied"):
        load_checkpoint(path)


def test_a_checkpoint_without_its_run_configuration(tmp_path):
    path = tmp_path / "orphan" / "model.ckpt"
    path.parent.mkdir()
    path.write_bytes(saved(lightning_checkpoint(run_config=None)))
    checkpoint = load_checkpoint(path)
    with pytest.raises(UserError) as error:
        run_config(checkpoint, path)
    assert "is a Lightning checkpoint without its run configuration" in str(error.value)
    assert "no config.yaml was found" in str(error.value)
    (path.parent / "config.yaml").write_text("model:\n  scales: 2\ndata:\n  n_bits: 5\n")
    assert run_config(checkpoint, path).model.scales == 2
    (path.parent / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        run_config(checkpoint, path)
    (path.parent / "config.yaml").write_text("seed: 3\n")
    with pytest.raises(UserError, match=r"is not a flowgen run configuration \(no model or data section\)"):
        run_config(checkpoint, path)
    with pytest.raises(UserError, match="the run configuration saved in it is not a flowgen run configuration"):
        run_config({**checkpoint, "hyper_parameters": {"run_config": "glow"}}, path)


# ---- the whole way: sample.py in process, and once as a real process ------------------------------

def sample_error(capsys, ckpt: Path) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={ckpt}", "device=cpu"])
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(sample, cfg)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


THROUGH_SAMPLE = {
    "text": (b"model: glow\n", TEXT),
    "random": (random_bytes(0), BINARY),
    "bare": (CASES["bare state dict"][0], BARE),
    "orphan": (saved(lightning_checkpoint(run_config=None)), "without its run configuration"),
}


@pytest.mark.parametrize("name", list(THROUGH_SAMPLE))
def test_sample_py_reports_one_line(name, tmp_path, capsys):
    content, expected = THROUGH_SAMPLE[name]
    path = tmp_path / f"{name}.ckpt"
    path.write_bytes(content)
    line = sample_error(capsys, path)
    assert line.startswith(f"error: checkpoint {path} ") and expected in line, line


@pytest.mark.slow  # ~10 s; the same path is tested in process above, and sample.py's one line in test_sample_evaluate
def test_sample_py_on_a_text_file_prints_one_line(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("epoch 3: val/bpd 4.2\n")
    run = run_entry("sample.py", [f"ckpt_path={path}"], tmp_path, env={"PYTHONWARNINGS": "default"})
    assert run.returncode == EXIT_USER_ERROR, run.output[-3000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {path} {TEXT}"), run.stderr
    assert "epoch 3" not in run.stderr  # nothing of the file's content
