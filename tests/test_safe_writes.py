"""Nothing lost, nothing followed outside: output folders that hold other files, writes killed at every file
operation, concurrent writers, paths in a patched folder that lead out of it, hostile local hints, moved scans."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lorsa_surgery import LorsaSurgeryError

from lorsa_surgery.io import files

from lorsa_surgery.host import models
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.publishing.patched import LOCAL_HINT, ROOT_FILE, load_patched, read_root, save_patched
from lorsa_surgery.analysis.scan import HeadStore
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy
from test_interventions import cli
from test_rough_edges import folders, no_model_load  # noqa: F401  (fixtures)
from test_training import host, text, tiny_config  # noqa: F401  (fixtures)

LAYER = 1


def listing(folder: Path) -> dict[str, object]:
    """Each file's content (safetensors by their tensors: the header's key order varies between writes)."""
    def content(p: Path):
        if p.suffix == ".safetensors":
            return {k: v.numpy().tobytes() for k, v in files.read_safetensors(p).items()}
        return p.read_bytes()

    return {p.relative_to(folder).as_posix(): content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- output folders ----------------------------------------------------------------------------------------------------


def test_an_out_holding_other_files_is_refused_before_any_work(folders, tmp_path, no_model_load):
    model_dir, lorsa_dir = folders
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    for args in (["replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", mine],
                 ["replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", mine, "--overwrite"],
                 ["ablate", model_dir, "--lorsa", f"1={lorsa_dir}", "--heads", "L1.H3", "--prompt", "abc", "--save", mine],
                 ["heads", "scan", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", mine]):
        result = cli(*args)
        assert result.exit_code == 1 and "did not write" in result.output, result.output
    (tmp_path / "afile").write_text("keep")
    result = cli("replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", tmp_path / "afile")
    assert result.exit_code == 1 and "is not a folder" in result.output
    assert (mine / "thesis.txt").read_text() == "years of work" and (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "lorsa", "model", "mydata"]


def test_replacing_our_own_folder_needs_overwrite_and_leaves_nothing_beside_it(folders, tmp_path):
    model_dir, lorsa_dir = folders
    out = tmp_path / "patched"
    args = ["replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", out, "--max-length", "16"]
    assert cli(*args).exit_code == 0
    first = listing(out)
    result = cli(*args)
    assert result.exit_code == 1 and "--overwrite" in result.output and listing(out) == first
    result = cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert files.is_ours(out) and (out / ROOT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lorsa", "model", "patched"]


def test_the_current_folder_is_never_an_output(folders, tmp_path, monkeypatch, no_model_load):
    model_dir, lorsa_dir = folders
    monkeypatch.chdir(tmp_path)
    result = cli("replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", ".", "--overwrite")
    assert result.exit_code == 1 and "current folder" in result.output


def test_a_second_writer_of_the_same_folder_is_refused_cleanly(tmp_path):
    out = tmp_path / "out"
    with files.new_folder(out) as staging:
        (staging / "a").write_text("first")
        with pytest.raises(LorsaSurgeryError, match="Another lorsa-surgery process is writing"):
            with files.new_folder(out):
                pass
    assert (out / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_interrupted_between_two_renames_is_put_back(tmp_path):
    """Where no atomic exchange exists, the old folder waits under a fixed name until the next writer restores it."""
    out = tmp_path / "out"
    with files.new_folder(out) as staging:
        (staging / "a").write_text("old")
    os.rename(out, tmp_path / ".out.lorsa-old")  # what a kill right after the first rename leaves
    with pytest.raises(LorsaSurgeryError, match="--overwrite"):
        files.check_out(out)
    assert (out / "a").read_text() == "old" and not (tmp_path / ".out.lorsa-old").exists()


# ---- kills at every file operation -------------------------------------------------------------------------------------

KILLED = 77
WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod", "os.truncate", "ctypes.call_function"}


def _counts_as_write(event: str, args: tuple) -> bool:
    if event in WRITE_EVENTS:
        return True
    if event != "open":
        return False
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def run_killed_at(n: int, work) -> int:
    """Run `work` in a forked child that dies (os._exit) at its n-th file operation; the child's exit code."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        count = 0

        def hook(event, args):
            nonlocal count
            if _counts_as_write(event, args):
                count += 1
                if count == n:
                    os._exit(KILLED)

        sys.addaudithook(hook)
        try:
            work()
        except BaseException:
            os._exit(2)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def every_kill(work, check, limit: int = 400, stride: int = 1) -> int:
    """Kill `work` at its 1st, 2nd, ... file operation until it finishes unkilled, calling check(n) after each kill;
    the number of operations it took."""
    torch.set_num_threads(1)  # forked children must not wait on the parent's thread pool
    for n in range(1, limit, stride):
        code = run_killed_at(n, work)
        assert code in (KILLED, 0), f"the work failed (exit {code}) after a kill at operation {n - stride}"
        check(n)
        if code == 0:
            return n
    raise AssertionError(f"the work did not finish within {limit} file operations")


def test_a_patched_save_killed_at_every_file_operation_leaves_the_old_folder_or_the_new(tmp_path):
    model = __import__("test_splice").tiny("llama")
    handle = splice(model, {LAYER: exact_copy(model, LAYER)})
    handle.base = {"id": "tiny/llama", "revision": None}
    out = tmp_path / "patched"
    save_patched(handle, out, metrics={"run": "old"})
    old = listing(out)
    new_metrics = {"run": "new"}

    def check(n):
        assert out.is_dir(), f"no folder after a kill at operation {n}"
        now = listing(out)
        run = read_root(out)["metrics"]["run"]
        assert run in ("old", "new")
        if run == "old":
            assert now == old, f"the old folder changed after a kill at operation {n}"
        else:
            assert Lorsa.from_pretrained(out / "layer_1").cfg.n_ov_heads == handle[LAYER].source.cfg.n_ov_heads
        # The next save cleans what the killed one left and succeeds.
        save_patched(handle, out, metrics={"run": "old"}, overwrite=True)
        assert listing(out) == old or read_root(out)["metrics"] == {"run": "old"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["patched"], sorted(p.name for p in tmp_path.iterdir())

    steps = every_kill(lambda: save_patched(handle, out, metrics=new_metrics, overwrite=True), check)
    assert steps > 10  # the save really was cut at many points


def _store(key: str, value: float) -> HeadStore:
    """A small store whose every tensor holds `value`: a mix of two stores shows as mixed values."""
    import dataclasses

    tensors = {f.name: torch.full((3, 2), value) for f in dataclasses.fields(HeadStore) if f.type in ("torch.Tensor", torch.Tensor)}
    return HeadStore(layer=1, names=["a"], labels=[""], notes=[""], n_heads=1, group_size=1, top_k=1, key=key, **tensors)


def test_a_rescan_killed_at_every_file_operation_never_serves_the_old_key_over_new_tensors(tmp_path):
    store_dir = tmp_path / "L1"
    old, new = _store("old-key", 1.0), _store("new-key", 2.0)
    old.save(store_dir)

    def check(n):
        loaded = HeadStore.load(store_dir)
        value = {"old-key": 1.0, "new-key": 2.0}[loaded.key]
        tensors = [v for v in vars(loaded).values() if isinstance(v, torch.Tensor)]
        assert len(tensors) > 10 and all(bool((t == value).all()) for t in tensors), f"key {loaded.key} over other tensors after a kill at {n}"
        old.save(store_dir)

    assert every_kill(lambda: new.save(store_dir), check) > 3


@pytest.mark.slow
def test_a_training_run_killed_at_its_file_operations_resumes_to_the_same_module(host, text, tmp_path):  # noqa: F811
    from lorsa_surgery.training.trainer import train

    torch.set_num_threads(1)
    whole = tmp_path / "whole"
    train(tiny_config(host, text, whole, checkpoint_every=4))
    expected = Lorsa.from_pretrained(whole / "L1").state_dict()
    out = tmp_path / "killed"

    def check(n):
        # Whatever the kill left, a resumed run finishes and gives the module an unbroken run gives.
        train(tiny_config(host, text, out, checkpoint_every=4, resume=True))
        got = Lorsa.from_pretrained(out / "L1").state_dict()
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected), f"after a kill at operation {n}"
        assert not [p for p in out.rglob("*") if ".lorsa-new-" in p.name or p.name.endswith(".tmp")]
        import shutil

        shutil.rmtree(out)

    every_kill(lambda: train(tiny_config(host, text, out, checkpoint_every=4, resume=True)), check, stride=7)


# ---- paths read from a folder ------------------------------------------------------------------------------------------


@pytest.fixture
def patched(folders, tmp_path):
    model_dir, lorsa_dir = folders
    out = tmp_path / "patched"
    assert cli("replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", out, "--max-length", "16").exit_code == 0
    return out, model_dir


@pytest.mark.parametrize("field,value", [
    ("layer", "../lorsa"), ("layer", None), ("layer", "/etc"), ("interventions", "../../x.json"),
    ("bundled_base", "/"), ("adapter", "../model"), ("layer", "link"),
])
def test_paths_in_a_patched_folder_stay_inside_it(patched, tmp_path, field, value):
    out, model_dir = patched
    root = json.loads((out / ROOT_FILE).read_text())
    if value == "link":
        os.symlink(tmp_path / "lorsa", out / "link")
    if field == "layer":
        root["layers"]["1"]["folder"] = value
    elif field == "adapter":
        root["adapter"] = {"folder": value}
    else:
        root[field] = value
    (out / ROOT_FILE).write_text(json.dumps(root))
    with pytest.raises(LorsaSurgeryError, match="outside|should be"):
        load_patched(out, base=model_dir)
    for args in (["generate", out, "--base", model_dir, "--prompt", "abc", "--max-new-tokens", "2"],
                 ["heads", "label", out, "L1.H2", "x"], ["inspect", out]):
        result = cli(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "lorsa" / "head_catalog.json").read_text().count('"x"')


def test_layer_keys_are_plain_numbers(patched):
    out, model_dir = patched
    root = json.loads((out / ROOT_FILE).read_text())
    for key in ("01", "-1", "x"):
        (out / ROOT_FILE).write_text(json.dumps({**root, "layers": {key: root["layers"]["1"]}}))
        with pytest.raises(LorsaSurgeryError, match="layer number written plainly"):
            read_root(out)


def test_a_hostile_local_hint_is_ignored_not_walked(folders, tmp_path, monkeypatch):
    model_dir, lorsa_dir = folders
    model = models.load_model(model_dir)[0]
    handle = splice(model, {LAYER: Lorsa.from_pretrained(lorsa_dir)})
    out = save_patched(handle, tmp_path / "patched")
    assert json.loads((out / LOCAL_HINT).read_text())["base_path"] == str(Path(model_dir).resolve())
    walked = []
    monkeypatch.setattr(models, "folder_fingerprint", lambda path: walked.append(path) or "x")
    for hint in ({"base_path": "/"}, {"base_path": "relative/folder"}, {"base_path": ["/"]}, [], {"base_path": str(tmp_path)}):
        (out / LOCAL_HINT).write_text(json.dumps(hint))
        with pytest.raises(LorsaSurgeryError, match="not found here; pass base=PATH"):
            load_patched(out)
    assert walked == []


def test_a_moved_scan_folder_reads_its_own_tokenizer(folders, tmp_path):
    model_dir, lorsa_dir = folders
    scan_dir = tmp_path / "scan"
    result = cli("heads", "scan", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", scan_dir, "--max-tokens", "64",
                 "--max-length", "16", "--no-pages")
    assert result.exit_code == 0, result.output
    moved = tmp_path / "elsewhere"
    os.rename(scan_dir, moved)
    result = cli("heads", "list", moved, "--limit", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((moved / "scan.json").read_text())["tokenizer"] == "tokenizer"  # not where it was made
    # A rescan into the same folder keeps the unchanged store.
    result = cli("heads", "scan", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", moved, "--max-tokens", "64",
                 "--max-length", "16", "--no-pages")
    assert result.exit_code == 0 and "unchanged, kept" in result.output
