"""The project's own training prompts: fixed by the seed, never an evaluation prompt."""
import argparse

import pytest

from benchmarks.eval_prompts import ALL as EVAL_PROMPTS
from models.distill_data import MIXES, DataRecipe, build_prompt_slots
from models.train_heads import parse_data_spec


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_a_mix_is_fixed_by_its_seed_and_extends_by_prefix(mix):
    small = build_prompt_slots(DataRecipe(num_prompts=50, mix=mix))
    large = build_prompt_slots(DataRecipe(num_prompts=200, mix=mix))
    assert large[:50] == small
    assert len(set(large)) == 200                      # each prompt once
    assert build_prompt_slots(DataRecipe(num_prompts=50, mix=mix, seed=1)) != small


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_no_evaluation_prompt_is_trained_on(mix):
    texts = {text for _, text in build_prompt_slots(DataRecipe(num_prompts=2000, mix=mix))}
    assert not texts & set(EVAL_PROMPTS)


def test_the_varied_mix_brings_sources_the_general_one_lacks():
    sources = {source for source, _ in build_prompt_slots(DataRecipe(num_prompts=300, mix="varied"))}
    assert {"everyday", "composed_code"} <= sources
    assert all("{" not in text for _, text in build_prompt_slots(DataRecipe(num_prompts=300, mix="varied")))


def test_each_mix_has_its_own_data_directory(tmp_path):
    assert DataRecipe(mix="general").data_dir(tmp_path) != DataRecipe(mix="varied").data_dir(tmp_path)
    assert DataRecipe(num_prompts=96).data_dir(tmp_path) == DataRecipe(num_prompts=4800).data_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown prompt mix"):
        DataRecipe(mix="benchmarks")


def test_data_spec():
    assert parse_data_spec("general:2400,varied:1920") == [("general", 2400), ("varied", 1920)]
    for bad in ("general", "general:0", "nope:10", "general:5,general:6"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_data_spec(bad)
