"""mxfp4-train on bad input: one line on stderr, exit status 2, nothing trained or written; every
arm is checked before the first one trains. A bug keeps its traceback."""
import os
import sys

import pytest
import torch

from train_helpers import SMALL

from megatron_mxfp4.train import cli
from megatron_mxfp4.train.cli import main


def _refused(capsys, argv, fragment):
    """main(argv) exits 2 with exactly one stderr line naming the problem and prints nothing else."""
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("mxfp4-train: error: ") and fragment in lines[0], lines[0]
    return lines[0]


# (arguments, a fragment of the error line): refused before megatron-core is imported
CASES = {
    "unknown-arm": (["--arms", "bf16,fp4"], "unknown arm(s) 'fp4'; choose from bf16, fp8"),
    "arm-twice": (["--arms", "bf16,bf16"], "arm(s) listed twice: bf16"),
    "unknown-preset": (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    "unknown-option": (["--hiden", "128"], "unrecognized arguments: --hiden"),
    "not-a-number": (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    "hidden-not-multiple-of-heads": (["--hidden", "100", "--heads", "3"], "--hidden 100 is not a multiple of --heads 3"),
    "no-layers": (["--layers", "0"], "--layers must be positive, got 0"),
    "negative-hidden": (["--hidden", "-128"], "--hidden must be positive, got -128"),
    "no-sequence": (["--seq-length", "0"], "--seq-length must be positive, got 0"),
    "negative-batch": (["--global-batch", "-8"], "--global-batch must be positive, got -8"),
    "batch-not-multiple-of-micro": (["--global-batch", "6", "--micro-batch", "4"],
                                    "--global-batch 6 is not a multiple of --micro-batch 4"),
    "dropout": (["--dropout", "1"], "--dropout must be in [0, 1)"),
    "split": (["--split", "100,0,0"], "--split must be 'train,valid,test' weights"),
    "shard": (["--shard", "2/2"], "--shard 2/2: need 0 <= i < n"),
    "seeds": (["--seeds", "1,1"], "--seeds must be distinct"),
    "guard-patience": (["--guard-patience", "0"], "argument --guard-patience: must be >= 1, got 0"),
    "unquantized-tail": (["--unquantized-tail", "1"], "argument --unquantized-tail: must be in [0, 1)"),
    "backend": (["--mxfp4-backend", "fast"], "argument --mxfp4-backend: invalid choice: 'fast'"),
    "seed-beyond-64-bits": (["--arms", "bf16,mxfp4", "--seeds", str(2**64)],
                            "arm 'mxfp4' seed 18446744073709551616: MXFP4Recipe.seed must be an unsigned 64-bit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments(case, tmp_path, capsys):
    argv, fragment = CASES[case]
    _refused(capsys, [*argv, "--out", str(tmp_path / "run")], fragment)
    assert not (tmp_path / "run").exists()


def test_missing_dataset(tmp_path, capsys):
    _refused(capsys, ["--data-path", str(tmp_path / "nowhere" / "mine"), "--out", str(tmp_path / "run")],
             "mine.bin does not exist (make it with mxfp4-preprocess")
    for ext in (".bin", ".idx"):  # the files but no sidecar, and no --tokenizer
        (tmp_path / f"mine{ext}").write_bytes(b"")
    _refused(capsys, ["--data-path", str(tmp_path / "mine"), "--out", str(tmp_path / "run")], "mine.meta.json")
    assert not (tmp_path / "run").exists()


def test_unreadable_tokenizer(tmp_path, capsys):
    (tmp_path / "tok.json").write_text("not json")
    _refused(capsys, ["--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "run")],
             "is not a tokenizers JSON file")
    _refused(capsys, ["--tokenizer", str(tmp_path / "none.json"), "--out", str(tmp_path / "run")], "does not exist")


def test_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _refused(capsys, ["--out", str(tmp_path / "file")], "file is a file, not a folder")
    _refused(capsys, ["--out", str(tmp_path / "file" / "run")], "file is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_folder_not_writable(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _refused(capsys, ["--out", str(ro / "run")], "is not writable")
    finally:
        ro.chmod(0o700)


def test_te_fp8_needs_transformer_engine(tmp_path, capsys):
    from megatron_mxfp4.train.model import te_available

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    _refused(capsys, ["--arms", "bf16,te-fp8", "--out", str(tmp_path / "te")], "arm 'te-fp8' needs Transformer Engine")


def test_tensor_parallel_without_processes(tmp_path, capsys):
    _refused(capsys, ["--tp", "2", "--out", str(tmp_path / "run")], "--tp 2 does not divide the number of processes 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU backends may run here")
def test_backend_that_cannot_run_here_stops_before_the_first_arm(tmp_path, small_data, megatron_cpu, capsys):
    out = tmp_path / "run"
    _refused(capsys, ["--data-path", small_data, "--arms", "bf16,mxfp4", "--mxfp4-backend", "hopper", "--out",
                      str(out), *SMALL], "--mxfp4-backend hopper: no hopper gemm kernel can run on cpu")
    assert not out.exists()


def test_too_few_evaluation_samples_stop_before_the_first_arm(tmp_path, small_data, megatron_cpu, capsys):
    out = tmp_path / "run"
    _refused(capsys, ["--data-path", small_data, "--arms", "bf16", "--out", str(out), *SMALL, "--eval-samples", "1"],
             "an evaluation needs --eval-samples")
    assert not (out / "config.json").exists() and not (out / "bf16-s1").exists()  # the corrected command may run here


def test_hidden_size_the_mxfp4_layers_may_refuse(tmp_path, small_data, megatron_cpu, capsys):
    """`--arms bf16,mxfp4 --hidden 100`: either the MXFP4 layers take it and both arms train, or the
    run stops in one line before the bf16 arm trains (never after it)."""
    out = tmp_path / "run"
    argv = ["--data-path", small_data, "--arms", "bf16,mxfp4", "--steps", "1", "--eval-interval", "1", "--out",
            str(out), *SMALL, "--hidden", "100"]
    rc = main(argv)
    cap = capsys.readouterr()
    if rc == 2:
        assert len(cap.err.splitlines()) == 1 and "arm 'mxfp4': " in cap.err, cap.err
        assert not (out / "bf16-s1").exists()
    else:
        assert rc == 0 and (out / "bf16-s1" / "done.json").exists() and (out / "mxfp4-s1" / "done.json").exists()


def test_one_line_from_the_command(tmp_path):
    """The real process: exit status 2 and one line, no traceback, no warnings."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-m", "megatron_mxfp4.train", "--arms", "bf16,mxfp4,fp4", "--out",
                        str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["mxfp4-train: error: unknown arm(s) 'fp4'; choose from " + ", ".join(cli.ARMS)]


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "resolve_config", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["--out", str(tmp_path / "run")])
