"""The run-level rules both trainers follow: when to validate."""

from jaxdiff import run
from jaxdiff.config import TrainConfig


def _config(**fields) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="model", train_data_dir="data", **fields)


def test_validation_follows_completed_epochs():
    every_second = _config(validation_epochs=2, validation_prompts=["a cat"])
    assert [run.should_validate(every_second, s, s - 1, s) for s in range(1, 5)] == [False, True, False, True]
    assert run.should_validate(every_second, 1, 1, 4)  # a step that completes several epochs of a tiny dataset
    assert not run.should_validate(every_second, 1, 0, 1)
    steps = _config(validation_steps=3)
    assert [run.should_validate(steps, s, 0, 1) for s in (1, 3, 6)] == [False, True, True]  # epochs do not count
    assert not run.should_validate(_config(), 1, 0, 1)


def test_final_weights_are_validated_once_when_there_are_prompts():
    prompts = _config(validation_steps=2, validation_prompts=["a cat"])
    assert run.should_validate_final(prompts, 5, 4)
    assert run.should_validate_final(prompts, 5, None)
    assert not run.should_validate_final(prompts, 4, 4)  # just validated
    assert not run.should_validate_final(_config(validation_steps=2), 5, 4)  # no prompts
