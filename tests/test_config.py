"""The run identity: which settings name a run folder (training/config.py)."""

import dataclasses
import pickle

import pytest

from dessilbi.training.config import ConfigError, OptimizerConfig, TrainConfig

# Names given by the flat configuration (current hash) and by releases before 0.2 (legacy hash:
# every field that existed then, so not target_macs or final_lr; the run folders committed in
# docs/results carry such names): the nested sections and later options must not change them.
NAMED_BEFORE = [
    (dict(dataset="digits", epochs=3, lr=0.05),
     "digits_lenet3_dessilbi_k1_nuauto_lam1_lr0.05_e3_s0_3823b232", "ee0aab3f"),
    (dict(dataset="fashion-mnist", model="conv4", target_density=0.3, milestones=[3, 5],
          schedule="multistep", pull="all", select_at=0.5, support="grow", reserve=0,
          width_prior=0.0),
     # the defaults when it was named
     "fashion-mnist_conv4_dessilbi_units0.3_lr0.1_e20_s0_ceb8e238", "85304f6b"),
    (dict(dataset="mnist", optimizer="sgd", exclude=["fc"]),
     "mnist_lenet3_sgd_lr0.1_e20_s0_7b24d7b8", "7dd94ff0"),
]


@pytest.mark.parametrize("flat, name, legacy_hash", NAMED_BEFORE)
def test_existing_runs_keep_their_names(flat, name, legacy_hash):
    cfg = TrainConfig(**flat)
    assert cfg.run_name() == name
    assert cfg.run_name(legacy=True) == name.rsplit("_", 1)[0] + "_" + legacy_hash
    assert TrainConfig.from_dict(cfg.to_nested()).run_name() == name  # sections load back


def test_a_new_option_names_a_run_only_away_from_its_default():
    base = TrainConfig(dataset="digits", epochs=3, lr=0.05)
    assert base.replace(final_lr=0.1).run_name() == base.run_name()  # final_lr came later
    assert base.replace(final_lr=0.2).run_name() != base.run_name()
    aimed = TrainConfig(**AIMED)
    assert aimed.replace(start_at=0.0).run_name() == aimed.run_name()  # start_at came later
    assert aimed.replace(start_at=0.0).run_name(legacy=True) == aimed.run_name(legacy=True)
    assert aimed.replace(start_at=0.1).run_name() != aimed.run_name()
    # reserve came later with the default 8 (0 before it existed): 0 names what it named
    assert aimed.replace(reserve=0).run_name() != aimed.run_name()
    assert aimed.replace(score="initial").run_name() == aimed.run_name()  # score came later
    assert aimed.replace(score="mean").run_name() != aimed.run_name()
    # width_prior came later with the default 0.25 (0 before it existed): 0 names what it named
    assert aimed.replace(width_prior=0.0).run_name() != aimed.run_name()
    assert aimed.replace(width_prior=0.5).run_name() != aimed.run_name()


def test_a_score_is_one_of_the_rankings():
    TrainConfig(**AIMED, score="mean").validate()
    with pytest.raises(ConfigError, match="score"):
        TrainConfig(**AIMED, score="median").validate()


def test_a_width_prior_is_a_number_of_zero_or_more():
    TrainConfig(**AIMED, width_prior=0.25).validate()
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="width_prior"):
            TrainConfig(**AIMED, width_prior=bad).validate()


@pytest.mark.parametrize("reserve", [-1, 2.5, True])
def test_a_reserve_is_a_whole_number_of_units(reserve):
    with pytest.raises(ConfigError, match="reserve"):
        TrainConfig(**AIMED, reserve=reserve).validate()


@pytest.mark.parametrize("start_at", [0.3, 0.5, -0.1, True])
def test_start_at_must_come_before_the_selection(start_at):
    with pytest.raises(ConfigError, match="start_at"):
        TrainConfig(**AIMED, start_at=start_at).validate()


# Aimed runs named before a default changed, and the settings they were named with.
AIMED = dict(dataset="fashion-mnist", model="conv4", target_density=0.3)
AIMED_BEFORE = [
    (dict(pull="all", select_at=0.5, support="grow", reserve=0, width_prior=0.0),
     "15f3bdb9"),  # the first
    (dict(pull="conv-outside", select_at=0.5, support="grow", reserve=0, width_prior=0.0),
     "2b8cd2e8"),  # next
    (dict(pull="outside", select_at=0.3, support="shrink", reserve=0, width_prior=0.0),
     "d773be77"),  # chosen by hand then, before the reserve
    (dict(pull="outside", select_at=0.3, support="shrink", reserve=8, width_prior=0.0),
     "92d924be"),  # before the width prior
    (dict(pull="outside", select_at=0.3, support="shrink", reserve=8, width_prior=0.25),
     "faf19110"),  # today's
]


@pytest.mark.parametrize("settings, named", AIMED_BEFORE)
def test_a_changed_default_keeps_the_names_runs_were_given(settings, named):
    """pull ("all" → "conv-outside" → "outside"), select_at (0.5 → 0.3), support ("grow" →
    "shrink"), reserve (none, 0 → 8) and width_prior (none, 0 → 0.25) changed their defaults:
    every run keeps the name it was given, so a run aimed with today's defaults is the one
    named with those settings spelled out."""
    assert TrainConfig(**AIMED, **settings).run_name().endswith("_" + named)
    assert TrainConfig(**AIMED).run_name().endswith("_faf19110")


@pytest.mark.parametrize("key, former", [("pull", "all"), ("select_at", 0.5),
                                         ("support", "grow"), ("reserve", 0),
                                         ("width_prior", 0.0)])
def test_without_a_target_a_changed_default_names_nothing(key, former):
    plain = TrainConfig(dataset="digits", epochs=3, lr=0.05)
    assert plain.replace(**{key: former}).run_name() == plain.run_name()
    assert plain.replace(**{key: former}).run_name(legacy=True) == plain.run_name(legacy=True)


def test_without_a_target_no_pull_of_any_release_names_a_run():
    plain = TrainConfig(dataset="digits", epochs=3, lr=0.05)
    assert {plain.replace(pull=p).run_name() for p in ("all", "conv-outside", "outside")} == \
        {plain.run_name()}


def test_sections_and_flat_keys_are_one_configuration():
    cfg = TrainConfig.from_dict({"optim": {"lr": 0.05, "name": "sgd"}, "epochs": 3,
                                 "target-density": 0.3})
    assert (cfg.optim.lr, cfg.lr, cfg.optimizer, cfg.sched.epochs, cfg.target.density) == \
        (0.05, 0.05, "sgd", 3, 0.3)
    assert cfg == TrainConfig(lr=0.05, optimizer="sgd", epochs=3, target_density=0.3)
    assert cfg == TrainConfig(optim=OptimizerConfig(lr=0.05, name="sgd"), epochs=3,
                              target_density=0.3)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 0.2  # type: ignore[misc]
    assert cfg.replace(lr=0.2).lr == 0.2 and cfg.lr == 0.05  # a copy, never in place
    with pytest.raises(ConfigError, match="unknown key 'optim.betas'|unknown key optim.betas"):
        TrainConfig.from_dict({"optim": {"betas": 1}})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        TrainConfig.from_dict({"colour": 1})


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


def test_the_two_config_files_of_the_cli_page_are_one_configuration():
    import re
    from pathlib import Path

    import yaml

    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    flat, nested = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, re.S)[:2]]
    assert "optim" in nested and "optim" not in flat
    assert TrainConfig.from_dict(flat) == TrainConfig.from_dict(nested)


@pytest.mark.parametrize("field, target_list, bad", [("pull", "TARGET_PULLS", "inside"),
                                                     ("support", "SCHEDULES", "fast")])
def test_the_configs_choices_are_the_targets(field, target_list, bad):
    """The config checks its pull and support without importing torch; its lists are the
    target's; a non-default choice names a run of its own."""
    from dessilbi.core import target

    base = dict(target_density=0.5, linear_penalty="group")
    for choice in getattr(target, target_list):
        TrainConfig(**base, **{field: choice}).validate()
    with pytest.raises(ConfigError, match=f"invalid {field}='{bad}'"):
        TrainConfig(**base, **{field: bad}).validate()
    aimed = TrainConfig(**base)
    other = {"pull": "all", "support": "grow"}[field]
    assert aimed.replace(**{field: other}).run_name() != aimed.run_name()
    assert aimed.replace(**{field: getattr(aimed, field)}).run_name() == aimed.run_name()


def test_a_stored_config_without_a_later_key_reads_as_its_release_wrote_it():
    """A checkpoint written before ``pull`` and ``support`` existed ran the paper's pull on
    every unit and grew its support."""
    stored = TrainConfig(target_density=0.3, pull="all", support="grow").to_dict()
    del stored["pull"], stored["support"]
    assert (TrainConfig.from_stored(stored).pull, TrainConfig.from_stored(stored).support) == \
        ("all", "grow")
    assert TrainConfig.from_dict(stored).pull == "outside"  # a config file: today's default
    assert TrainConfig.from_stored({**stored, "pull": "outside"}).pull == "outside"
