"""training.artifacts: atomic writes, weights with provenance, weights built on demand."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from training import artifacts, backbones
from training.artifacts import (
    BUILDERS,
    atomic_dir,
    atomic_write,
    ensure_weights,
    read_provenance,
    save_with_provenance,
    sha256_file,
    verified,
    write_json,
    write_text,
)


class Crash(RuntimeError):
    """Stands for the process dying mid-write."""


def _write_then_crash(p: str) -> None:
    with open(p, "w") as f:
        f.write("half")
    raise Crash


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "sub" / "f.txt")  # the directory is created
    write_text(path, "old")
    atomic_write(path, lambda p: open(p, "w").write("new"), mode=0o644)
    assert open(path).read() == "new" and _listing(tmp_path / "sub") == ["f.txt"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_crash_mid_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = str(tmp_path / "f.txt")
    write_text(path, "old")
    with pytest.raises(Crash):
        atomic_write(path, _write_then_crash)
    assert open(path).read() == "old" and _listing(tmp_path) == ["f.txt"]


def test_a_crash_before_the_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Crash):
        atomic_write(str(tmp_path / "f.txt"), _write_then_crash)
    assert _listing(tmp_path) == []


def test_write_json_ends_indented_files_with_a_newline(tmp_path):
    write_json(str(tmp_path / "a.json"), {"a": 1}, indent=2)
    write_json(str(tmp_path / "b.json"), [1, 2])
    assert (tmp_path / "a.json").read_text() == '{\n  "a": 1\n}\n' and (tmp_path / "b.json").read_text() == "[1, 2]"


def test_atomic_dir_swaps_the_whole_directory(tmp_path):
    out = str(tmp_path / "model")
    atomic_dir(out, lambda d: (os.makedirs(d), open(os.path.join(d, "a"), "w").write("1")))
    atomic_dir(out, lambda d: (os.makedirs(d), open(os.path.join(d, "b"), "w").write("2")))
    assert _listing(out) == ["b"] and _listing(tmp_path) == ["model"]  # no stale file, no temp or old dir


def test_atomic_dir_crash_keeps_the_old_directory(tmp_path):
    out = str(tmp_path / "model")
    atomic_dir(out, lambda d: (os.makedirs(d), open(os.path.join(d, "a"), "w").write("1")))

    def crash(d: str) -> None:
        os.makedirs(d)
        _write_then_crash(os.path.join(d, "b"))

    with pytest.raises(Crash):
        atomic_dir(out, crash)
    assert _listing(out) == ["a"] and _listing(tmp_path) == ["model"]


def _save(path: str, value: float = 1.0) -> dict:
    return save_with_provenance(path, {"w": torch.full((2, 3), value)}, {"recipe": {"steps": 3}, "torch": "x"},
                                path[: -len(".safetensors")] + ".json")


def test_save_with_provenance_writes_metadata_and_a_checksummed_sidecar(tmp_path):
    path = str(tmp_path / "m.safetensors")
    record = _save(path)
    side = json.loads((tmp_path / "m.json").read_text())
    assert side == record == {"recipe": {"steps": 3}, "torch": "x", "sha256": sha256_file(path)}
    assert read_provenance(path) == {"recipe": {"steps": 3}, "torch": "x"}  # a file cannot hold its own hash
    assert torch.equal(load_file(path)["w"], torch.ones(2, 3))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # a shared asset, not safetensors' 0600
    assert _listing(tmp_path) == ["m.json", "m.safetensors"]


def test_save_with_provenance_is_byte_compatible_with_a_plain_safetensors_save(tmp_path):
    prov = {"a": 1}
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"), metadata={"provenance": json.dumps(prov)})
    save_with_provenance(str(tmp_path / "ours.safetensors"), {"w": torch.ones(2)}, prov, str(tmp_path / "o.json"))
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


class Builder:
    """Counts its builds; writes weights of ``value`` with a sidecar."""

    def __init__(self, value: float = 1.0) -> None:
        self.calls, self.value = 0, value

    def __call__(self, out: str) -> None:
        self.calls += 1
        _save(out, self.value)


def test_ensure_weights_builds_missing_weights_once(tmp_path):
    path, side, build = str(tmp_path / "m.safetensors"), str(tmp_path / "m.json"), Builder()
    assert ensure_weights(path, side, build) == path and build.calls == 1
    assert ensure_weights(path, side, build) == path and build.calls == 1  # verified: not rebuilt


def test_ensure_weights_rebuilds_on_a_checksum_mismatch(tmp_path):
    path, side, build = str(tmp_path / "m.safetensors"), str(tmp_path / "m.json"), Builder()
    _save(path, 2.0)
    with open(path, "r+b") as f:  # corrupt one byte of the tensor data
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert not verified(path, side)
    ensure_weights(path, side, build)
    assert build.calls == 1 and torch.equal(load_file(path)["w"], torch.ones(2, 3)) and verified(path, side)


def test_ensure_weights_takes_weights_without_a_sidecar_as_they_are(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.zeros(1)}, path)  # placed by hand: no checksum to check
    build = Builder()
    ensure_weights(path, str(tmp_path / "m.json"), build)
    assert build.calls == 0


def test_ensure_weights_fails_when_the_build_does_not_match(tmp_path):
    path, side = str(tmp_path / "m.safetensors"), str(tmp_path / "m.json")

    def bad_build(out: str) -> None:
        _save(out)
        write_json(side, {"sha256": "0" * 64})  # a builder that records the wrong checksum

    with pytest.raises(RuntimeError, match="does not match"):
        ensure_weights(path, side, bad_build)


def test_the_recipes_register_builders_for_every_default_model():
    assert artifacts.builder("vit_tiny_offline") is not None  # imports training.recipes on the first miss
    assert {"vit_tiny_offline", "vilt_scenes", "film_scenes"} <= set(BUILDERS.names())
    assert artifacts.builder("vit_test") is None


def test_create_backbone_builds_missing_default_weights_with_the_registered_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(backbones, "shipped_weights_path", lambda name: str(tmp_path / "not-installed.safetensors"))
    shipped = load_file(str(backbones.ASSETS / "vit_tiny_offline.safetensors"))
    built = []

    def build(out: str) -> None:
        built.append(out)
        save_with_provenance(out, shipped, {"test": True}, backbones.sidecar_path(out))

    monkeypatch.setattr(artifacts, "builder", lambda name: build if name == "vit_tiny_offline" else None)
    model = backbones.create_backbone("vit_tiny_offline", 3)
    assert built == [backbones.offline_weights_path()]
    torch.testing.assert_close(model.state_dict()["pos_embed"], shipped["pos_embed"])
    backbones.create_backbone("vit_tiny_offline", 3)
    assert len(built) == 1  # the cached file is verified and reused
    with pytest.raises(FileNotFoundError):
        os.remove(backbones.offline_weights_path())
        backbones.create_backbone("vit_tiny_offline", 3, ensure_pretrained=False)
