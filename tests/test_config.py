"""The config system: a saved ``llavatune_config.yaml`` feeds back into its command as given."""

from __future__ import annotations

import pytest
import yaml

from llavatune.config import ConfigError, config, parse_config, save_resolved


@config
class A:
    name: str = "x"
    """a name"""
    extra: dict | None = None
    """a mapping option"""


@config
class B:
    steps: int = 1
    """steps"""


def test_saved_sections_feed_back(tmp_path):
    a, b = parse_config([A, B], ["--name", "y", "--steps", "7"])
    saved = tmp_path / "llavatune_config.yaml"
    save_resolved(saved, {"first": a, "second": b}, command="llavatune thing")
    assert saved.read_text().startswith("# llavatune thing\n")
    assert yaml.safe_load(saved.read_text()) == {"first": {"name": "y", "extra": None}, "second": {"steps": 7}}
    assert parse_config([A, B], [str(saved)]) == [a, b]
    assert parse_config([A, B], [str(saved), "--steps", "3"])[1].steps == 3


def test_plain_options_whose_values_are_mappings_stay_options(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"extra": {"k": 1}}))
    assert parse_config([A, B], [str(p)])[0].extra == {"k": 1}
    p.write_text(yaml.safe_dump({"s1": {"steps": 1}, "s2": {"steps": 2}}))
    with pytest.raises(ConfigError, match="'steps' has two values"):
        parse_config([A, B], [str(p)])


def test_saved_training_config_takes_later_flags_and_keeps_the_users_values(tmp_path):
    """train's saved config fed back with --gradient_checkpointing true checkpoints (transformers 5 also has
    activation_checkpointing, which must not be saved beside it and win), and a CPU run saves pin memory as the
    user left it (the Trainer turns it off without an accelerator; a GPU rerun of the file pins again)."""
    from llavatune.train.run import SECTIONS

    argv = ["--data", str(tmp_path / "d.json"), "--output_dir", str(tmp_path / "run")]
    first = parse_config(SECTIONS, argv)
    saved = tmp_path / "llavatune_config.yaml"
    save_resolved(saved, dict(zip(("model", "data", "method", "eval", "training"), first)))
    text = yaml.safe_load(saved.read_text())["training"]
    assert "activation_checkpointing" not in text and text["gradient_checkpointing"] is False
    assert text["dataloader_pin_memory"] is True
    again = parse_config(SECTIONS, [str(saved), "--gradient_checkpointing", "true"])[-1]
    assert again.gradient_checkpointing is True and again.activation_checkpointing is True
