"""Every YAML example in README.md loads with the project's own config class: a block with an
unknown key or a value of the wrong type fails here, so the README cannot drift from the code."""

import re
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from stmdit.data.store import PrepareConfig
from stmdit.evaluate.run import EvaluateConfig
from stmdit.experiments.pseudolabel import PseudolabelConfig
from stmdit.experiments.simulate import SimulateConfig
from stmdit.sections.edits import EditConfig
from stmdit.train import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# A block names its config by its first-line comment (``# eval.yaml``); training configs have none
# and are recognised by their output_dir.
CONFIGS = {"prepare.yaml": PrepareConfig, "eval.yaml": EvaluateConfig, "pseudo.yaml": PseudolabelConfig,
           "sim.yaml": SimulateConfig, "edit.yaml": EditConfig}  # fmt: skip


def readme_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def config_class(block: str):
    first = block.splitlines()[0].strip()
    if first.startswith("#"):
        name = first.lstrip("# ").split()[0]
        if name not in CONFIGS:
            pytest.fail(
                f"README YAML block '{first}' names no known config; add it to CONFIGS: {list(CONFIGS)}"
            )
        return CONFIGS[name]
    if "output_dir" in yaml.safe_load(block):
        return TrainConfig
    pytest.fail(f"README YAML block starting {first!r} is not recognisable as any config")


def load(cls, text: str, tmp_path: Path):
    """The config as the CLI loads it (unknown keys refused), with the field types checked."""
    path = tmp_path / "block.yaml"
    path.write_text(text)
    config = cls.from_yaml(path)
    pydantic.TypeAdapter(cls).validate_python(yaml.safe_load(text))
    if cls is PseudolabelConfig:
        config.slide_specs()  # the slide entries' own keys
    return config


BLOCKS = readme_blocks()


def test_readme_has_every_kind_of_config_block():
    kinds = [config_class(b) for b in BLOCKS]
    assert set(kinds) == {*CONFIGS.values(), TrainConfig}, kinds


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_yaml_block_loads(index, tmp_path):
    block = BLOCKS[index]
    load(config_class(block), block, tmp_path)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_bad_key_or_type_in_the_block_is_refused(index, tmp_path):
    """The check has teeth: the same block with an unknown key, or a number field given a word, fails."""
    block = BLOCKS[index]
    cls = config_class(block)
    data = yaml.safe_load(block)
    with pytest.raises((ValueError, TypeError)):
        load(cls, yaml.safe_dump({**data, "not_a_key": 1}), tmp_path)
    numeric = [k for k, v in typing.get_type_hints(cls).items() if v in (int, float)] + [
        k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    number = next((k for k in numeric if k in data), numeric[0])
    with pytest.raises((ValueError, TypeError)):
        load(cls, yaml.safe_dump({**data, number: "many"}), tmp_path)
