"""Faults during training: kills, torn files, full disks, hostile files, concurrent runs, divergence.

The specification of :mod:`qlora_ref.train.checkpoint` and of the fault
handling in :func:`qlora_ref.train.finetune.finetune`:

* a real ``qlora-ref finetune`` process killed (SIGKILL) at any point of a
  checkpoint write, or between steps, resumes to adapters bit-identical to an
  uninterrupted run, or is refused with one line; the previous complete
  checkpoint always survives (``test_kill_anywhere_then_resume_is_exact``; the
  kills come from the test hook ``QLORA_REF_FAULT_AFTER``, see
  :mod:`qlora_ref.train.checkpoint`, and one from outside, by pid);
* a full disk is reported as one, the previous checkpoint intact (a real
  tmpfs when run as root, and a simulated ``ENOSPC`` everywhere);
* no file the project reads is unpickled: crafted pickles run no code;
* resuming with other settings, two runs into one folder, a NaN loss and bad
  output paths each end in one line on stderr and exit status 2.
"""
import errno
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.robustness.zygote import zygote_source
import torch

import qlora_ref
from qlora_ref.train import checkpoint as ckpt
from qlora_ref.train import finetune as finetune_module
from qlora_ref.train.finetune import FinetuneConfig, finetune
from qlora_ref.train.pretrain import default_base_model_path
from tests.helpers import cli, one_line

pytestmark = pytest.mark.skipif(not default_base_model_path().is_file(),
                                reason="the shipped base model is missing")

# 16-bit LoRA keeps these runs fast; the checkpoint code is the same for every base
TINY = dict(quant_bits=16, train_size=64, eval_size=4, per_device_train_batch_size=4,
            lora_dropout=0.1, max_steps=4, save_steps=2)


@pytest.fixture
def tiny(tmp_path):
    """A ``--config FILE NAME`` pair for a tiny run."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"tiny": TINY}))
    return [str(path), "tiny"]


def rehash(folder: Path) -> None:
    """Rewrite a manifest to match the files as they are now (what a forger would do)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def save_synthetic(root: Path, step: int) -> Path:
    """A checkpoint with made-up contents, written by the real writer (no model needed)."""
    def adapter(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")

    tensors = {"trainable.w": torch.arange(6.0).reshape(2, 3) * step, "rng.torch": torch.get_rng_state()}
    return ckpt.save_checkpoint(root, step, tensors, {"history": [[step, 1.0]], "config": {}}, adapter)


# ----------------------------------------------------------------------------- the writer and the reader

def test_checkpoints_are_switched_in_whole_and_hold_no_pickle(tmp_path):
    root = tmp_path / "checkpoint"
    for step in (2, 4, 6):
        save_synthetic(root, step)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-000004", "step-000006"]
    assert (root / "LATEST").read_text().strip() == "step-000006"
    folder, note = ckpt.find_checkpoint(root)
    assert folder == root / "step-000006" and note is None
    manifest = ckpt.verify_checkpoint(folder)
    assert manifest["step"] == 6
    assert set(manifest["files"]) == {"training_state.safetensors", "trainer_state.json",
                                      "adapter/adapter_config.json"}
    state, tensors = ckpt.read_checkpoint(folder)
    assert state["step"] == 6 and torch.equal(tensors["trainable.w"], torch.arange(6.0).reshape(2, 3) * 6)
    for path in folder.rglob("*"):  # JSON or safetensors (8-byte header length, then a JSON header)
        if path.is_file():
            head = path.read_bytes()[:9]
            assert head[:1] == b"{" or head[8:9] == b"{", f"{path} is neither JSON nor safetensors"


@pytest.mark.parametrize("name", ["training_state.safetensors", "trainer_state.json",
                                  "adapter/adapter_config.json", "manifest.json"])
def test_a_torn_file_is_refused_by_name_or_the_previous_checkpoint_is_used(tmp_path, name):
    root = tmp_path / "checkpoint"
    save_synthetic(root, 2)
    torn = save_synthetic(root, 4) / name
    torn.write_bytes(torn.read_bytes()[: max(1, torn.stat().st_size // 2)])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(torn))):
        ckpt.find_checkpoint(root / "step-000004")           # asked for by name: refused
    folder, note = ckpt.find_checkpoint(root)                  # the run's folder: fall back, say so
    assert folder == root / "step-000002"
    assert str(torn) in note and "previous complete checkpoint" in note


def test_missing_manifest_means_incomplete_and_an_inconsistent_step_is_refused(tmp_path):
    root = tmp_path / "checkpoint"
    folder = save_synthetic(root, 2)
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "step": 5}))
    rehash(folder)
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json says step 5"):
        ckpt.read_checkpoint(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is missing"):
        ckpt.find_checkpoint(root)


def test_old_format_files_beside_new_checkpoints_do_not_block_resuming(tmp_path):
    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "training_state.pt").write_bytes(b"a pickle from an earlier version")
    save_synthetic(root, 2)
    assert ckpt.find_checkpoint(tmp_path) == (root / "step-000002", None)


def test_a_simulated_full_disk_is_reported_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    save_synthetic(root, 2)
    write = ckpt._write_bytes

    def full(path, data):
        if path.name == "training_state.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full)
    with pytest.raises(ckpt.DiskFullError, match=r"^disk full: no space left on device") as info:
        save_synthetic(root, 4)
    assert "step-000002 is intact" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-000002"]  # the partial one is gone
    assert ckpt.find_checkpoint(root) == (root / "step-000002", None)


def _mount_tmpfs(path: Path, size: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run as root to check a real full disk; "
                    "test_a_simulated_full_disk_... covers the logic)")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    if os.statvfs(path).f_blocks * os.statvfs(path).f_frsize > 2 * size:
        subprocess.run(["umount", str(path)])
        pytest.skip("the tmpfs mount did not take its size limit")


def test_a_real_full_disk_is_reported_and_keeps_the_previous_checkpoint(tmp_path, tiny, capsys):
    # measure one checkpoint, then give the run room for one and a half
    code, _, err = cli(capsys, "finetune", "--config", *tiny, "--max-steps", "2",
                    "--output-dir", tmp_path / "measure", "--quiet")
    assert code == 0, err
    one = sum(p.stat().st_size for p in (tmp_path / "measure" / "checkpoint" / "step-000002").rglob("*")
              if p.is_file())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, int(1.5 * one) + 64 * 1024)
    try:
        code, _, err = cli(capsys, "finetune", "--config", *tiny, "--max-steps", "4", "--save-steps", "2",
                        "--output-dir", disk / "run", "--quiet")
        line = one_line(err)
        assert code == 2 and "disk full: no space left on device" in line, line
        root = disk / "run" / "checkpoint"
        assert f"{root / 'step-000002'} is intact" in line, line
        assert ckpt.find_checkpoint(root) == (root / "step-000002", None)
        leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        assert not leftovers, "the partial checkpoint stayed"
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# ----------------------------------------------------------------------------- hostile files

class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists(), "the crafted pickle is harmless; the tests below would prove nothing"


def _hostile_cases(tmp_path, marker, tiny):
    payload = pickle.dumps(_Payload(marker))
    old = tmp_path / "old" / "checkpoint"
    old.mkdir(parents=True)
    torch.save({"trainable": _Payload(marker)}, old / "training_state.pt")  # the previous format
    (old / "trainer_state.json").write_text(json.dumps({"step": 1, "history": [], "config": {}}))
    yield ["finetune", "--resume", old, "--output-dir", tmp_path / "o1"], "old-format checkpoint"
    for name, message in [("training_state.safetensors", "not a readable safetensors file"),
                          ("trainer_state.json", "trainer_state.json is not readable")]:
        folder = save_synthetic(tmp_path / name / "checkpoint", 2)
        (folder / name).write_bytes(payload)
        rehash(folder)  # the manifest forged to match: the format itself must refuse
        yield ["finetune", "--resume", folder, "--output-dir", tmp_path / f"o-{name}"], message
    (tmp_path / "evil.safetensors").write_bytes(payload)
    yield (["finetune", "--base-model", tmp_path / "evil.safetensors", "--output-dir", tmp_path / "o2"],
           "not a valid qlora_ref base model")
    (tmp_path / "evil.json").write_bytes(payload)
    yield (["finetune", "--config", tmp_path / "evil.json", "x", "--output-dir", tmp_path / "o3"],
           "not valid JSON")
    (tmp_path / "evil.npy").write_bytes(payload)
    yield ["quantize", tmp_path / "evil.npy"], "not a readable .npy file"


def test_crafted_pickles_in_files_the_project_reads_run_no_code(tmp_path, tiny, capsys):
    marker = tmp_path / "ran"
    for argv, message in _hostile_cases(tmp_path, marker, tiny):
        code, _, err = cli(capsys, *argv)
        line = one_line(err)
        assert code == 2 and message in line, (argv, line)
        assert not marker.exists(), f"{argv}: the crafted pickle ran"
    # the library readers too: a PEFT adapter folder and a QuantState file
    from qlora_ref.nn import load_adapter
    from qlora_ref.quant_state import QuantState

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["0"]}))
    (adapter / "adapter_model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception):
        load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), adapter)
    (tmp_path / "state.npz").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception):
        QuantState.load(tmp_path / "state.npz")
    assert not marker.exists()


def test_nothing_in_the_package_unpickles():
    """No full unpickler anywhere: ``torch.load`` only with ``weights_only=True`` on the same line.

    The one ``pickle.Unpickler`` in the package (DCP's index, ``distributed/checkpoint.py``) is
    an allow-list, tested below against a payload that would run a command.
    """
    package = Path(qlora_ref.__file__).parent
    unsafe = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    found = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if unsafe.search(line) or ("torch.load(" in line and "weights_only=True" not in line)]
    assert not found, f"code that can unpickle: {found}"
    unpicklers = [str(p.relative_to(package)) for p in package.rglob("*.py")
                  if "pickle.Unpickler" in p.read_text()]
    assert unpicklers == ["distributed/checkpoint.py"], unpicklers


@pytest.mark.parametrize("module, name", [
    ("torch.distributed.checkpoint.filesystem", "os.system"),    # a dotted name walks attributes
    ("torch.distributed.checkpoint.filesystem", "os"),           # a module imported there
    ("torch.distributed.checkpoint.state_dict_saver", "save"),   # a function of DCP's
    ("os", "system"), ("builtins", "eval")])
def test_the_dcp_index_reader_refuses_what_an_index_never_holds(tmp_path, module, name):
    import io
    import pickle

    from qlora_ref.distributed.checkpoint import _MetadataUnpickler

    marker = tmp_path / "ran"
    # protocol 4: SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL, an argument, REDUCE
    def text(s):
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b
    payload = (b"\x80\x04" + text(module) + text(name) + b"\x93"
               + text(f"touch {marker}") + b"\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _MetadataUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


# ----------------------------------------------------------------------------- refusals, one line each

@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run gets as far as building the model."""
    def trained(*args, **kwargs):
        raise AssertionError("the run started before its arguments and paths were checked")

    monkeypatch.setattr(finetune_module, "build_model", trained)


def test_bad_output_paths_and_step_counts_are_refused_before_training(tmp_path, tiny, capsys, no_training):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad_adapter = tmp_path / "bad_adapter"
    (bad_adapter / "adapter").parent.mkdir()
    (bad_adapter / "adapter").write_text("x")
    bad_report = tmp_path / "bad_report"
    (bad_report / "report.md").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--output-dir", a_file], f"output directory {a_file} exists and is not a directory"),
        (["--output-dir", a_file / "run"], "a part of its path is a file"),
        (["--output-dir", bad_adapter], "adapter exists and is not a directory"),
        (["--output-dir", bad_report], "report.md is a directory"),
        (["--epochs", "0", "--max-steps", "-5"], "max_steps must be a positive integer"),
        (["--max-steps", "0"], "max_steps must be a positive integer"),
        (["--epochs", "0", "--max-steps", "-1"], "num_train_epochs must be positive"),
        (["--stop-after", "0"], "stop_after must be a positive integer"),
        (["--save-steps", "-1"], "save_steps must be >= 0"),
        (["--learning-rate", "inf"], "learning_rate must be a finite number"),
        (["--lora-alpha", "nan"], "lora_alpha must be a finite number"),
        (["--resume", tmp_path / "nowhere"], "no checkpoint at"),
        (["--resume", tmp_path / "empty"], "no checkpoint in"),
    ]
    for extra, message in cases:
        argv = ["finetune", "--config", *tiny, "--quiet", *extra]
        if "--output-dir" not in extra:
            argv += ["--output-dir", tmp_path / "out"]
        code, _, err = cli(capsys, *argv)
        line = one_line(err)
        assert code == 2 and message in line, (extra, line)


@pytest.mark.skipif(os.name != "posix", reason="the lock is an flock (POSIX)")
def test_a_second_run_into_the_same_folder_is_refused(tmp_path, tiny, capsys, no_training):
    out = tmp_path / "out"
    out.mkdir()
    with ckpt.output_lock(out):
        code, _, err = cli(capsys, "finetune", "--config", *tiny, "--output-dir", out, "--quiet")
    line = one_line(err)
    assert code == 2 and f"in use by another qlora-ref run (pid {os.getpid()})" in line, line


HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[1])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
held = module.output_lock(sys.argv[2])  # kept referenced: collecting it would release the lock
held.__enter__()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(os.name != "posix", reason="the lock is an flock (POSIX)")
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, ckpt.__file__, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid}"):
            with ckpt.output_lock(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with ckpt.output_lock(tmp_path):  # the kernel released it with the process
        pass


def test_resuming_with_other_settings_is_refused_by_field(tmp_path, tiny, capsys):
    first = tmp_path / "first"
    code, _, err = cli(capsys, "finetune", "--config", *tiny, "--max-steps", "2", "--output-dir", first,
                    "--quiet")
    assert code == 0, err
    other_base = tmp_path / "other_base.safetensors"
    from qlora_ref.train.pretrain import load_base_model, save_base_model

    model = load_base_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    save_base_model(model, other_base)
    cases = [(["--learning-rate", "0.01"],
              "trained with learning_rate=0.003, this run has learning_rate=0.01"),
             (["--task", "reverse"], "trained with task='sort', this run has task='reverse'"),
             (["--r", "4"], "trained with r=8, this run has r=4"),
             (["--base-model", other_base], "was trained on another base model"),
             (["--max-steps", "1"], "is at step 2, past this run's 1 steps")]
    for extra, message in cases:
        code, _, err = cli(capsys, "finetune", "--config", *tiny, "--resume", first,
                        "--output-dir", tmp_path / "second", "--quiet", *extra)
        line = one_line(err)
        assert code == 2 and message in line, (extra, line)
    # the number of steps may change: 2 more steps on top of the checkpoint's 2
    code, _, err = cli(capsys, "finetune", "--config", *tiny, "--resume", first, "--max-steps", "4",
                    "--output-dir", tmp_path / "second", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["steps"] == 4 and report["resumed_from_step"] == 2


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    # lr 1e30: step 1 is finite, its update overflows the logits, so step 2's loss is NaN
    code, _, err = cli(capsys, "finetune", "--config", *tiny, "--learning-rate", "1e30", "--save-steps", "1",
                    "--output-dir", out, "--quiet")
    line = one_line(err)
    assert code == 2 and "loss became nan at step 2" in line, line
    assert f"last good checkpoint is {out / 'checkpoint' / 'step-000001'}" in line, line
    assert ckpt.find_checkpoint(out / "checkpoint") == (out / "checkpoint" / "step-000001", None)
    assert not (out / "adapter").exists() and not (out / "report.md").exists()


def test_speed_after_resume_counts_every_step_and_its_time(tmp_path):
    config = FinetuneConfig(**TINY)
    first = finetune(config, device="cpu", output_dir=tmp_path, stop_after=3, progress=False,
                     evaluate_before=False)
    resumed = finetune(config, device="cpu", output_dir=tmp_path, resume_from=tmp_path, progress=False,
                       evaluate_before=False)
    assert resumed.resumed_from_step == 3 and resumed.steps == 4
    assert resumed.seconds >= first.seconds, "the resumed run's time must include the first part"
    assert json.loads((tmp_path / "report.json").read_text())["seconds"] == resumed.seconds


def test_pretrain_refuses_bad_steps_and_never_writes_into_the_package(tmp_path, capsys, monkeypatch):
    from qlora_ref.train.pretrain import check_output_path, default_output_path

    shipped = default_base_model_path()
    before = shipped.read_bytes()
    for argv, message in [(["--steps", "0"], "steps must be a positive integer, got 0"),
                          (["--steps", "-1"], "steps must be a positive integer, got -1"),
                          (["--steps", "1", "--output", shipped], "inside the installed package")]:
        code, _, err = cli(capsys, "pretrain", "--quiet", *argv)
        line = one_line(err)
        assert code == 2 and message in line, (argv, line)
    assert shipped.read_bytes() == before
    monkeypatch.chdir(tmp_path)
    assert not Path(default_output_path()).resolve().is_relative_to(shipped.parent.parent)
    check_output_path(default_output_path())  # the default is accepted


# ----------------------------------------------------------------------------- kill -9, then resume

# A parent that imports torch and qlora_ref once, then forks one child per run: each child is a
# separate process running qlora_ref.cli.main(["finetune", ...]), killed by its own pid; the
# imports (about 8 s of a fresh process here) are paid once. The reference run and one of the
# killed runs are fresh `qlora-ref finetune` processes, so the two kinds are compared too.
ZYGOTE = zygote_source("\n".join([
    'import torch._dynamo  # noqa: F401',
    'import qlora_ref.cli, qlora_ref.train.finetune, qlora_ref.train.report  # noqa: F401']))

# (QLORA_REF_FAULT_AFTER, step LATEST names after the kill): save every 2 steps, 24 steps in all.
# A kill while step s is written leaves step s - 2; once LATEST switched, step s.
KILLS = [
    ("training_state.safetensors:half@4", 2),
    ("trainer_state.json:half@6", 4),
    ("adapter/adapter_config.json:half@8", 6),
    ("adapter/adapter_model.safetensors:half@10", 8),
    ("manifest.json:half@12", 10),
    ("manifest.json@14", 12),       # complete in the temporary folder, not yet renamed
    ("rename@16", 14),              # step-000016 in place, LATEST not switched
    ("LATEST:half@18", 16),         # LATEST.tmp half written
    ("published@20", 20),           # switched; old folders not yet deleted
    ("step@21", 20),                # between two optimizer steps
]


def _env():
    # one thread: the killed, resumed and uninterrupted runs must sum in the same order to
    # compare bit for bit (the OpenMP wait policy is the package's own, as for a user)
    return dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")


def _fresh_process(argv, log, env):
    script = Path(sys.executable).with_name("qlora-ref")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "qlora_ref"]
    return subprocess.Popen(command + [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks a warm parent and kills with SIGKILL (Linux)")
def test_kill_anywhere_then_resume_is_exact(tmp_path):
    """One run of 24 steps, killed ten times at the points of ``KILLS`` and once from outside.

    Each run resumes where the one before was killed, so a resume that is off
    by anything (a step counter, a batch, an optimizer moment, the RNG) shows
    in the final adapters, which must equal the uninterrupted run's byte for
    byte. After each kill the checkpoint ``LATEST`` names, and the one before
    it, must verify.
    """
    config = tmp_path / "chain.json"
    config.write_text(json.dumps({"chain": {**TINY, "max_steps": 24, "save_steps": 2}}))
    common = ["finetune", "--config", str(config), "chain", "--quiet"]
    ref_log = open(tmp_path / "reference.log", "w")
    reference = _fresh_process(common + ["--output-dir", tmp_path / "reference"], ref_log, _env())
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    out, logs = tmp_path / "run", tmp_path / "logs"
    root = out / "checkpoint"
    logs.mkdir()

    def run(argv, env, name):
        zygote.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env,
                                       "log": str(logs / name)}) + "\n")
        zygote.stdin.flush()
        return json.loads(zygote.stdout.readline())["code"], (logs / name).read_text()

    try:
        assert zygote.stdout.readline().strip() == "ready"
        resume = []
        for i, (fault, expected) in enumerate(KILLS):
            code, log = run(common + ["--output-dir", out, *resume], {ckpt.FAULT_ENV: fault}, f"{i}.log")
            assert code == -signal.SIGKILL, f"{fault}: exit {code}, not killed\n{log}"
            folder, note = ckpt.find_checkpoint(root)
            assert (folder, note) == (root / f"step-{expected:06d}", None), f"after {fault}"
            if expected > 2:  # the previous complete checkpoint survives too
                previous = sorted(p for p in root.glob("step-*") if p != folder)[-1]
                ckpt.verify_checkpoint(previous)
            resume = ["--resume", root]

        # a fresh process, killed from outside by its pid once it has written a new checkpoint
        with open(logs / "external.log", "w") as log:
            victim = _fresh_process(common + ["--output-dir", out, *resume], log, _env())
            deadline = time.monotonic() + 300
            while victim.poll() is None and time.monotonic() < deadline:
                if ckpt.latest_checkpoint(root) != root / "step-000020":
                    os.kill(victim.pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
            assert victim.wait() == -signal.SIGKILL, (logs / "external.log").read_text()
        latest = ckpt.find_checkpoint(root)[0]

        # finally, the newest checkpoint is damaged on disk: resume falls back and says so
        damaged = latest / "training_state.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
        code, log = run(common + ["--output-dir", out, *resume], {}, "final.log")
        assert code == 0, log
        line = one_line(log)
        assert f"{damaged} is torn or modified" in line and "resuming from the previous complete" in line
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
        ref_log.close()

    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), \
            f"{name} differs from the uninterrupted run's"
    got, want = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "reference"))
    assert got["history"] == want["history"] and got["steps"] == want["steps"] == 24
