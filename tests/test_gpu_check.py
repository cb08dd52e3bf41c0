"""gpu_check's budget and files, with stand-in stages that take fractions of a second: each
stage is capped by the time left, a stage that no longer fits is skipped with the reason,
a timed-out stage loses its whole process group, the report is on disk before the next
stage starts, and the folder never holds more than 8 files. And the prebuilt extension is
used only when its hash matches and it imports."""

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Stage

PY = sys.executable
WRITES = ("import json, sys, pathlib; p = pathlib.Path(sys.argv[1]); json.dump({'rows': [1]}, p.open('w')); "
          "p.with_suffix('.png').write_bytes(b'png')")
# Copies the report (proof that it was written before this stage began), starts a grandchild
# that records its pid, then outlives any deadline.
HANGS = ("import shutil, subprocess, sys, time; shutil.copy(sys.argv[2], sys.argv[3]); "
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "open(sys.argv[4], 'w').write(str(c.pid)); time.sleep(60)")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.fixture
def fake_quick(tmp_path, monkeypatch):
    out = tmp_path / "out" / "gpu_check.json"
    snapshot, pid_file = tmp_path / "snapshot.json", tmp_path / "grandchild.pid"
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    monkeypatch.setattr(gpu_check, "QUICK", [
        Stage("first", (), [PY, "-c", WRITES, "{json}"], 60, min_s=1),
        Stage("args", (), [PY, "-c", "import sys, json; json.dump(sys.argv[2:], open(sys.argv[1], 'w'))", "{json}"],
              60, smoke_args=["--smoke"], min_s=1),
        Stage("absent", (), [PY, "-c", "raise SystemExit(5)"], 60, min_s=1, unavailable=lambda: "no such library"),
        Stage("hangs", (), [PY, "-c", HANGS, "{json}", str(out), str(snapshot), str(pid_file)], 60, min_s=1),
        Stage("last", (), [PY, "-c", WRITES, "{json}"], 60, min_s=5),
    ])
    return out, snapshot, pid_file


def test_quick_caps_each_stage_by_the_deadline_and_skips_what_no_longer_fits(fake_quick):
    out, snapshot, pid_file = fake_quick
    start = time.monotonic()
    rc = gpu_check.main(["--quick", "--smoke", "--skip", "build", "--deadline-s", "4", "--out", str(out),
                         "--stage-args", "args=--dtypes bfloat16 --batch 3"])
    took = time.monotonic() - start
    assert rc == 1 and took < 6
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == ["first", "args", "absent", "hangs", "last"]
    assert stages["first"]["rc"] == 0 and stages["first"]["results"] == {"rows": [1]}
    # A stage's own arguments, then the ones given for it on the command line.
    assert stages["args"]["results"] == ["--smoke", "--dtypes", "bfloat16", "--batch", "3"]
    assert stages["absent"]["skipped"] == "no such library"
    assert stages["hangs"]["rc"] == "timeout" and stages["hangs"]["limit_s"] <= 4
    assert "left before the deadline" in stages["last"]["skipped"]
    assert report["failed"] == 1
    # The report was on disk, with the stages before, when the stage that hung began.
    early = json.loads(snapshot.read_text())["stages"]
    assert early["first"]["results"] == {"rows": [1]} and early["hangs"] == {
        "running": True, "command": stages["hangs"]["command"], "limit_s": stages["hangs"]["limit_s"]}
    deadline = time.monotonic() + 5
    pid = int(pid_file.read_text())
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the timed-out stage's child outlived it"
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.plots.zip"]
    assert len(files) <= gpu_check.MAX_FILES
    assert zipfile.ZipFile(out.parent / "gpu_check.plots.zip").namelist() == ["first.png"]
    assert "== hangs" in (out.parent / "gpu_check.log").read_text()


def test_a_run_starts_clean_of_an_earlier_runs_files(fake_quick):
    out, _, _ = fake_quick
    out.parent.mkdir(parents=True)
    for name in ("gpu_check.running.absent.json", "gpu_check.running.last.png", "gpu_check.plots.zip"):
        (out.parent / name).write_text("earlier run")
    gpu_check.main(["--quick", "--smoke", "--skip", "build,first,args,hangs", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.plots.zip"]
    assert json.loads(out.read_text())["stages"]["absent"] == {"skipped": "no such library"}


def test_stage_args_name_a_planned_stage(fake_quick):
    out, _, _ = fake_quick
    with pytest.raises(SystemExit, match="--stage-args"):
        gpu_check.main(["--quick", "--smoke", "--out", str(out), "--stage-args", "bench_nothing=--fast"])


def test_quick_order_is_the_issues_priority():
    names = [s.name for s in gpu_check.QUICK]
    assert names == ["build", "info", "selftest", "bench_conv_bn", "bench_grouped_conv", "bench_train_step",
                     "bench_hashtag_ce", "bench_data"]
    selftest = gpu_check.QUICK[2]
    assert selftest.gpu_args == ["--dtypes", "bfloat16"]
    assert sum(s.limit_s for s in gpu_check.QUICK if s.name != "bench_data") <= 1400


def _fake_repo(tmp_path: Path, library: Path, data: bytes) -> Path:
    repo = tmp_path / "repo"
    (repo / "csrc").mkdir(parents=True)
    (repo / "csrc" / "ops.cpp").write_text("int f() { return 1; }\n")
    (repo / "setup.py").write_text("# setup\n")
    (repo / "engine").mkdir()
    (repo / "engine" / "__init__.py").write_text("")
    built = repo / ".gpu-ext" / "engine"
    built.mkdir(parents=True)
    (built / library.name).write_bytes(data)
    (repo / ".gpu-ext" / "hash").write_text(gpu_check.ext_hash(repo) + "\n")
    return repo


def _real_extension() -> Path:
    built = sorted((gpu_check.REPO / "engine").glob("_C.*.so"))
    if not built:
        pytest.skip("engine._C is not built here")
    return built[0]


def test_prebuilt_extension_is_used_only_when_its_hash_matches(tmp_path):
    library = _real_extension()
    repo = _fake_repo(tmp_path, library, library.read_bytes())
    (repo / "csrc" / "ops.cpp").write_text("int f() { return 2; }\n")
    assert "hash differs" in gpu_check.use_prebuilt(repo)
    assert not list((repo / "engine").glob("_C.*"))
    (repo / "csrc" / "ops.cpp").write_text("int f() { return 1; }\n")
    assert gpu_check.use_prebuilt(repo) == "prebuilt"
    assert list((repo / "engine").glob("_C.*.so"))


def test_prebuilt_extension_that_does_not_import_is_not_used(tmp_path):
    repo = _fake_repo(tmp_path, _real_extension(), b"not a library")
    assert "does not import" in gpu_check.use_prebuilt(repo)
    assert not list((repo / "engine").glob("_C.*"))
    shutil.rmtree(repo / ".gpu-ext")
    assert "make gpu-ext" in gpu_check.use_prebuilt(repo)


def test_in_place_checkout_has_engine_kernels_as_an_attribute(tmp_path):
    """The GPU machine imports from the checkout with no install (-S: no site, so no editable
    finder): engine.kernels must be reachable by attribute, as torch.compile's tracing does."""
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import engine; print(engine.kernels.__name__)"
    proc = subprocess.run([PY, "-S", "-c", probe, str(gpu_check.REPO)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "engine.kernels", proc.stderr[-2000:]


def test_setup_finds_the_toolkit_of_a_wrapper_nvcc_on_path(tmp_path):
    """/usr/local/bin/nvcc may be a script that execs a versioned toolkit's nvcc: the toolkit
    is where nvcc says it lives, not the wrapper's grandparent (torch's guess, without libcudart)."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    source = (gpu_check.REPO / "setup.py").read_text().split("\next_modules, cmdclass = extensions()")[0]
    namespace: dict = {}
    exec(compile(source, "setup.py", "exec"), namespace)
    assert namespace["nvcc_toolkit"](str(wrapper)) == str(toolkit)
