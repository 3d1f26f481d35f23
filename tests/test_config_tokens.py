import pytest
import yaml

from omnitalk.config import Config, preset
from omnitalk.errors import CheckpointError
from omnitalk.tokens import TokenLayout
from pathlib import Path

FIX = Path(__file__).resolve().parent / "fixtures" / "parity"


def test_released_config_reads_and_writes_back(tmp_path):
    cfg = Config.from_file(FIX / "manifests" / "model_config.yaml")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.head_size) == (24, 896, 14, 2, 64)
    assert cfg.padded_vocab_size == 181120 and cfg.tie_word_embeddings
    cfg.to_yaml(tmp_path / "c.yaml")
    again = yaml.safe_load((tmp_path / "c.yaml").read_text())
    orig = yaml.safe_load((FIX / "manifests" / "model_config.yaml").read_text())
    assert again == orig  # every field of the released file survives, unknown ones included


def test_preset_equals_released_file():
    released = Config.from_file(FIX / "manifests" / "model_config.yaml")
    for k, v in preset("mini-omni2").to_dict().items():
        assert getattr(released, k) == v, k


@pytest.mark.parametrize("bad, msg", [
    (dict(n_embd=100), "n_embd 100 != n_head"),
    (dict(n_query_groups=4), "not a multiple of n_query_groups"),
    (dict(padded_vocab_size=5), "padded_vocab_size 5"),
    (dict(asr_adapter="mlp"), "asr_adapter 'mlp'"),
    (dict(audio_pool=0), "audio_pool must be a whole number >= 1.*got 0"),
    (dict(audio_compress="mean"), "audio_compress must be 'none'.*or 'ctc'.*got 'mean'"),
])
def test_invalid_configs_are_named(bad, msg):
    with pytest.raises(CheckpointError, match=msg):
        Config(**bad).validate()


def test_audio_pool_is_written_only_when_not_the_release(tmp_path):
    assert "audio_pool" not in preset("mini-omni2").to_dict()   # the released layout: file unchanged
    cfg = Config(**{**preset("tiny").to_dict(), "audio_pool": 4})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["audio_pool"] == 4
    assert Config.from_file(tmp_path / "c.yaml").audio_pool == 4


def test_audio_compress_is_written_only_when_not_the_release(tmp_path):
    assert "audio_compress" not in preset("mini-omni2").to_dict()
    Config(**{**preset("tiny").to_dict(), "audio_compress": "ctc"}).to_yaml(tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["audio_compress"] == "ctc"
    assert Config.from_file(tmp_path / "c.yaml").audio_compress == "ctc"


def test_config_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Config.from_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        Config.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(CheckpointError, match="not a YAML mapping"):
        Config.from_file(tmp_path / "list.yaml")


def test_official_ids():
    L = TokenLayout.from_config(preset("mini-omni2"))
    assert (L.eot, L.pad_t, L.input_t, L.answer_t, L.asr) == (151936, 151937, 151938, 151939, 151940)
    assert (L.eoa, L.pad_a, L.input_a, L.answer_a, L.image, L.eoimage) == (4096, 4097, 4098, 4099, 4101, 4102)
    assert L.shift(L.eoa, 0) == 156096 and L.shift(L.eoa, 6) == 181056
    assert L.shift(4159, 6) == 181119 and L.audio_slice(6) == slice(176960, 181120)
    assert L.codebook_size == 4096 and L.n_streams == 8 and L.text_stream == 7


def test_layout_follows_the_config():
    L = TokenLayout.from_config(Config(text_vocab_size=1064, audio_vocab_size=576, n_audio_layers=7,
                                       padded_vocab_size=1064 + 7 * 576))
    assert L.eot == 1000 and L.codebook_size == 512 and L.eoa == 512 and L.shift(0, 1) == 1064 + 576
