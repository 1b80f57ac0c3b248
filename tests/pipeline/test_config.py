"""The pipeline config (megatron_lopd/pipeline/config.py): files, `key=value` overrides, one-line errors."""

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.pipeline import PipelineConfig, StageEnv, build_stages


def test_config_file_roundtrip_and_overrides(config, tmp_path):
    config.envs.train = StageEnv(venv="/v", env={"NCCL_DEBUG": "INFO"})
    path = config.save(tmp_path / "p.json")
    assert PipelineConfig.load(path) == config
    loaded = PipelineConfig.load(path, ["trainer.lr=1e-6", "score.tensor_parallel=4", "eval_data=none", "envs.train.venv=null", "envs.train.python=/p/python"])
    assert loaded.trainer.lr == 1e-6 and loaded.score.tensor_parallel == 4 and loaded.eval_data is None
    assert loaded.envs.train.python == "/p/python" and loaded.envs.train.env == {"NCCL_DEBUG": "INFO"}
    assert [s.name for s in build_stages(loaded)][-1] == "export"  # no eval data: no eval stage
    toml = tmp_path / "p.toml"
    toml.write_text(f'work_dir = "{tmp_path}/w"\nteacher = "/t"\n[trainer]\nlr = 3e-6\nnproc_per_node = 2\n')
    t = PipelineConfig.load(toml)
    assert t.trainer.lr == 3e-6 and t.trainer.nproc_per_node == 2 and t.trainer.config == "lightning_opd"
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.lrr' \(fix: did you mean lr\?\)"):
        PipelineConfig.load(path, ["trainer.lrr=1"])
    with pytest.raises(ConfigError, match="trainer.lr='fast' is not a number"):
        PipelineConfig.load(path, ["trainer.lr=fast"])
    with pytest.raises(ConfigError, match="config file not found"):
        PipelineConfig.load(tmp_path / "missing.json")
