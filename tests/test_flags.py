"""Every flag is classified once for each consumer (runtime.FLAGS): check_config's rule, whether
--resume needs the same value, and what experiment.py does with it. A flag nobody classified fails
here, so a new flag can neither skip its checks nor silently change the experiment's arms."""
import dataclasses

import pytest

import checkpoints
import experiment
import runtime
import train

FIELDS = [f.name for f in dataclasses.fields(train.TrainConfig)]
ARMS = experiment.ARM_NAMES


def test_every_field_is_classified_for_every_consumer():
    assert sorted(runtime.FLAGS) == sorted(FIELDS), set(FIELDS) ^ set(runtime.FLAGS)
    for name, (rule, resume, use) in runtime.FLAGS.items():
        assert rule in ("", *runtime.RULES), name
        assert resume in ("same", "free"), name
        assert use in ("all", "arm", "set") or len(use) > 20, name  # a class, or the reason it is refused


def test_an_unclassified_field_fails_the_classification(monkeypatch):
    """What the test above does with a field added to TrainConfig and not to FLAGS."""
    extended = dataclasses.make_dataclass("Extended", [("new_flag", int, dataclasses.field(default=0))],
                                          bases=(train.TrainConfig,))
    monkeypatch.setattr(train, "TrainConfig", extended)
    with pytest.raises(AssertionError):
        assert sorted(runtime.FLAGS) == sorted(f.name for f in dataclasses.fields(train.TrainConfig))


@pytest.mark.parametrize("name", [n for n, c in runtime.FLAGS.items() if c[0]])
def test_each_ruled_flag_refuses_a_value_outside_its_rule(name):
    bad = {"int>=1": 0, "int>=0": -1, ">=0": float("nan"), ">0": 0.0, "[0,1)": 1.0, "[0,1]": 1.5}
    cfg = dataclasses.replace(train.TrainConfig(), **{name: bad[runtime.FLAGS[name][0]]})
    with pytest.raises(ValueError, match=f"--{name} "):
        runtime.check_config(cfg)


def test_whole_numbers_beyond_63_bits_are_refused_by_name():
    with pytest.raises(ValueError, match="--seed 9223372036854775808: must be a whole number"):
        runtime.check_config(dataclasses.replace(train.TrainConfig(), seed=2 ** 63))
    with pytest.raises(ValueError, match="--seed -1: must be a whole number >= 0"):
        runtime.check_config(train.parse_args(["--seed", "-1"]))
    with pytest.raises(ValueError, match="--batch_size 9223372036854775808: must be a whole number >= 1"):
        runtime.check_config(dataclasses.replace(train.TrainConfig(), batch_size=2 ** 63))
    runtime.check_config(dataclasses.replace(train.TrainConfig(), seed=2 ** 63 - 1))  # the largest one is taken


@pytest.mark.parametrize("name", FIELDS)
def test_resume_compares_exactly_the_fields_marked_same(name):
    cfg = train.TrainConfig()
    changed = dataclasses.replace(cfg, **{name: object()})  # any other value
    diffs = checkpoints.resume_mismatches({"train_config": dataclasses.asdict(cfg)}, changed)
    assert bool(diffs) == (runtime.FLAGS[name][1] == "same"), (name, diffs)


@pytest.mark.parametrize("name", FIELDS)
def test_the_experiment_reaches_refuses_or_sets_each_field(name):
    use, default = runtime.FLAGS[name][2], getattr(train.TrainConfig(), name)

    def arms_with(value) -> dict:
        return {arm: experiment.arm_config(dataclasses.replace(train.TrainConfig(), **{name: value}), arm)
                for arm in ARMS}
    if use == "all":  # every arm gets the user's value as given
        sentinel = object()
        assert all(getattr(c, name) is sentinel for c in arms_with(sentinel).values()), name
    elif use == "arm":  # the arms derive theirs from it: another value changes some arm
        one, two = arms_with(default + 1), arms_with(default + 2)
        assert any(getattr(one[a], name) != getattr(two[a], name) or one[a] != two[a] for a in ARMS), name
    else:  # each arm sets its own ("set"), or the experiment refuses the flag: a user's value is refused
        value = "0,1,2" if isinstance(default, str) else (not default) if isinstance(default, bool) else default + 1
        flag = ([f"--{name}"] if value else [f"--no-{name}"]) if type(default) is bool else [f"--{name}", str(value)]
        with pytest.raises(ValueError, match=f"--{name} does not apply to the experiment"):
            experiment.parse_args(flag)
