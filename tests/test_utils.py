"""Shared helpers in llavatune.utils."""

import torch.distributed as dist

from llavatune.utils import finish_distributed


def test_finish_distributed_tears_down_the_process_group(tmp_path):
    # A one-rank gloo group stands in for torchrun's: the helper must leave no live group behind
    # (a live gloo group at interpreter exit can SIGABRT a rank that already finished its work).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    finish_distributed()
    assert not dist.is_initialized()
    finish_distributed()  # and is a no-op when there is none


# ---------------------------------------------------------------------------------- image paths under a root

import os  # noqa: E402

import pytest  # noqa: E402

from llavatune.utils import (  # noqa: E402
    OUTPUT_MARKER,
    UserError,
    check_output_dir,
    check_output_file,
    prepare_output_dir,
    resolve_under,
)


@pytest.fixture
def shared(tmp_path):
    """data/ with images -> ../shared/coco (a symlink, the usual way to point at a shared copy)."""
    coco = tmp_path / "shared" / "coco"
    coco.mkdir(parents=True)
    (coco / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(coco)
    return data


def test_symlinked_image_folder_is_accepted_and_escapes_are_refused(shared, tmp_path):
    got = resolve_under(shared, "images/a.jpg")
    assert got == shared.resolve() / "images" / "a.jpg" and got.is_file()
    assert resolve_under(shared, "./images/../images/a.jpg").is_file()
    assert resolve_under(shared, str(shared / "images" / "a.jpg")).is_file()  # absolute, inside the root as given
    for bad in ("../secret.txt", "images/../../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd",
                str(tmp_path / "shared" / "coco" / "a.jpg")):  # the link's target itself is outside the root
        with pytest.raises(UserError, match="escapes the image folder"):
            resolve_under(shared, bad)


def test_root_reached_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert resolve_under(tmp_path / "link", "a.jpg").is_file()
    assert resolve_under(tmp_path / "link", str(tmp_path / "link" / "a.jpg")).is_file()
    assert resolve_under(tmp_path / "link", str(real / "a.jpg")).is_file()


# ------------------------------------------------------------------------------ outputs never touch inputs


def test_output_file_may_not_be_an_input(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("[]")
    os.link(data, tmp_path / "hard.json")
    (tmp_path / "soft.json").symlink_to(data)
    for target in (data, tmp_path / "hard.json", tmp_path / "soft.json", tmp_path / "." / "data.json"):
        with pytest.raises(UserError, match="that is an input file"):
            check_output_file(target, {"--data": data}, "--json")
    check_output_file(tmp_path / "report.json", {"--data": data}, "--json")
    assert data.read_text() == "[]"


def test_overwrite_replaces_only_our_own_outputs_holding_no_input(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        check_output_dir(mine, overwrite=False, kind="train")
    with pytest.raises(UserError, match="not a llavatune output"):
        prepare_output_dir(mine, overwrite=True, kind="train")
    assert (mine / "notes.txt").read_text() == "keep"
    run = prepare_output_dir(tmp_path / "run", kind="train")
    assert (run / OUTPUT_MARKER).is_file()
    (run / "data.json").write_text("[]")  # the user keeps the data in the run folder
    with pytest.raises(UserError, match="contains the input"):
        prepare_output_dir(run, overwrite=True, kind="train", inputs={"--data": run / "data.json"})
    with pytest.raises(UserError, match="a llavatune train output"):
        prepare_output_dir(run, overwrite=True, kind="prepare")  # another command's output is not replaced either
    assert (run / "data.json").is_file()
    prepare_output_dir(run, overwrite=True, kind="train", inputs={"--data": tmp_path / "elsewhere.json"})
    assert sorted(p.name for p in run.iterdir()) == [OUTPUT_MARKER]
    (tmp_path / "alias").symlink_to(run)
    (run / "x").write_text("1")
    with pytest.raises(UserError, match="symbolic link"):
        prepare_output_dir(tmp_path / "alias", overwrite=True, kind="train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(tmp_path / "file", overwrite=True, kind="train")


def test_outputs_of_older_versions_are_recognised_by_their_own_files(tmp_path):
    from llavatune.utils import output_kind

    def folder(name, *files):
        d = tmp_path / name
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text("{}")
        return d

    assert output_kind(folder("prep", "data.json", "prepare_report.json", "llavatune_config.yaml")) == "prepare"
    assert output_kind(folder("run", "llavatune_config.yaml", "metrics.jsonl", "base_model/config.json")) == "train"
    assert output_kind(folder("half", "llavatune_config.yaml", "base_model/config.json")) == "train"
    assert output_kind(folder("merged", "config.json", "model.safetensors", "llavatune_checkpoint.json")) == "merge"
    assert output_kind(folder("mine", "llavatune_config.yaml", "notes.txt")) is None  # a copied config alone is not
