"""The run identity: which settings name a run folder (training/config.py)."""

import dataclasses

from dessilbi.training.config import TrainConfig


def test_a_new_option_at_its_default_keeps_every_name():
    extended = dataclasses.make_dataclass("Extended", [("new_option", int, 0)],
                                          bases=(TrainConfig,))
    old = TrainConfig(dataset="digits", epochs=3, lr=0.05)
    new = extended(dataset="digits", epochs=3, lr=0.05)
    assert new.run_name() == old.run_name()
    assert extended(dataset="digits", epochs=3, lr=0.05, new_option=1).run_name() != \
        old.run_name()


def test_settings_that_do_not_change_the_result_are_not_in_the_name(tmp_path):
    a = TrainConfig(dataset="digits", epochs=3)
    b = TrainConfig(dataset="digits", epochs=3, runs_dir=str(tmp_path), data_dir="/elsewhere",
                    device="cpu", progress=False, tensorboard=False)
    assert a.run_name() == b.run_name()
    assert TrainConfig(dataset="digits", epochs=4).run_name() != a.run_name()


def test_init_and_mask_files_count_by_content_not_path(tmp_path):
    one, two, other = tmp_path / "a" / "init.pt", tmp_path / "b" / "init.pt", tmp_path / "c.pt"
    for path, data in ((one, b"weights"), (two, b"weights"), (other, b"other weights")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    name = TrainConfig(dataset="digits", init_from=str(one)).run_name()
    assert TrainConfig(dataset="digits", init_from=str(two)).run_name() == name
    assert TrainConfig(dataset="digits", init_from=str(other)).run_name() != name
    assert TrainConfig(dataset="digits", mask=str(other)).run_name() != \
        TrainConfig(dataset="digits").run_name()


def test_folders_named_by_an_earlier_release_are_found(tmp_path):
    cfg = TrainConfig(dataset="digits", epochs=3, runs_dir=str(tmp_path))
    assert cfg.run_dir() == tmp_path / cfg.run_name()
    legacy = tmp_path / cfg.run_name(legacy=True)
    assert legacy != cfg.run_dir()
    legacy.mkdir()
    assert cfg.run_dir() == legacy  # an old run is resumed where it is
    (tmp_path / cfg.run_name()).mkdir()
    assert cfg.run_dir() == tmp_path / cfg.run_name()
