"""Recipe files (--config): every shipped recipe runs end to end on a tiny model, flags override the file, a bad
key or value is refused naming the key and the file, and a run's saved config.json replays the same run."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rftkit.cli import build_parser, config_from_args, main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "4", "--lora-r", "2",
        "--eval-every", "0"]


@pytest.fixture
def long_folder(tmp_path, tok_dir):
    """tiny_folder with a 2,048-token context: a GSM word problem is ~600 byte tokens."""
    from rftkit.loading import save_model_folder
    from tests.conftest import tiny_model
    model = tiny_model(vocab_size=258, max_seq_len=2048)
    model.cfg.eos_token_id = [257]
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    return tmp_path / "tiny"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_shipped_recipes_are_the_eight_the_docs_list():
    assert [p.stem for p in RECIPES] == ["arithmetic", "code", "countdown", "gsm_word_problems", "guess_number",
                                         "json_extraction", "reasoning_gym", "tool_multiply"]
    for p in RECIPES:                               # each opens with a comment header that gives its command
        head = p.read_text().split("\n\n")[0]
        assert head.startswith("# ") and f"rft train --config recipes/{p.name}" in head, p.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_end_to_end_on_a_tiny_model(recipe, long_folder, tmp_path, monkeypatch):
    import yaml
    monkeypatch.chdir(REPO)                         # recipes name their data and reward files from the repo root
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--model", str(long_folder), *TINY, "--output", str(run)]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1] and (run / "adapter" / "adapter_model.safetensors").is_file()
    saved, wanted = json.loads((run / "config.json").read_text()), yaml.safe_load(recipe.read_text())
    for key in ("task", "data", "task_reward", "reward", "reward_weights", "loss_type", "temperature"):
        if key in wanted:                           # the recipe's own settings reached the run
            assert saved[key] == wanted[key], key
    assert saved["steps"] == 1 and saved["model"] == str(long_folder)     # and the flags won over the file


def test_flags_override_the_file_and_lists_nest(tmp_path):
    (tmp_path / "r.yaml").write_text("task: countdown\nsteps: 7\nlora_targets: [q_proj, v_proj]\n"
                                     "reward: [numeric, exact]\nreward_weights: [0.5, 2]\nloss-type: grpo\n")
    parser, cls = build_parser("train")
    cfg = config_from_args(cls, parser.parse_args(["train", "--config", str(tmp_path / "r.yaml"), "--steps", "3"]))
    assert (cfg.task, cfg.steps, cfg.lora_targets, cfg.loss_type) == ("countdown", 3, ["q_proj", "v_proj"], "grpo")
    assert cfg.reward == ["numeric", "exact"] and cfg.reward_weights == [0.5, 2.0]
    cfg = config_from_args(cls, parser.parse_args(["train", "--config", str(tmp_path / "r.yaml"),
                                                   "--lora-targets", "o_proj", "--no-dynamic-sampling"]))
    assert cfg.lora_targets == ["o_proj"] and cfg.dynamic_sampling is False and cfg.steps == 7


@pytest.mark.parametrize("command,key,value", [("sft", "lr", 0.001), ("eval", "n", 3), ("compress", "out", "c"),
                                               ("serve", "port", 8123)])
def test_every_command_takes_a_config_file(command, key, value, tmp_path):
    (tmp_path / "r.yaml").write_text(f"{key}: {value}\n")
    parser, cls = build_parser(command)
    cfg = config_from_args(cls, parser.parse_args([command, "--config", str(tmp_path / "r.yaml")]))
    assert getattr(cfg, key) == value


@pytest.mark.parametrize("text,message", [
    ("stepz: 3\n", "unknown key 'stepz' for GRPOConfig; allowed keys: base_bits, beta, checkpoint_every"),
    ("loss_type: ppo\n", "key 'loss_type': 'ppo' is not allowed; allowed values: 'grpo', 'dr_grpo', 'dapo'"),
    ("steps: three\n", "key 'steps': expected an integer, got 'three'"),
    ("reward_weights: [1, x]\n", "key 'reward_weights'[1]: expected a number, got 'x'"),
    ("dynamic_sampling: 1\n", "key 'dynamic_sampling': expected true or false, got 1"),
    ("- steps\n", "must be a mapping of option: value, got list"),
])
def test_a_bad_key_or_value_is_an_error_naming_it_and_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"rft train: error: config file {path}" in err and message in err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"config file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err


def test_yaml_tags_that_build_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("task: !!python/object/apply:os.system ['echo hacked']\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"config file {path} is not valid YAML/JSON" in capsys.readouterr().err


def test_the_saved_config_replays_the_same_run(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "--config", str(REPO / "recipes" / "arithmetic.yaml"), "--model", str(tiny_folder),
                 *TINY, "--steps", "2", "--seed", "5", "--output", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--output", str(again)]) == 0
    saved, replayed = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert {**saved, "output": None} == {**replayed, "output": None}
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (first, again))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)          # bit-identical adapters
    for x, y in zip(_rows(first), _rows(again), strict=True):
        for key in ("step", "reward", "reward_std", "completion_len", "samples"):
            assert x[key] == y[key], key
    other = tmp_path / "other"                     # the identity is not vacuous: another seed trains another adapter
    assert main(["train", "--config", str(first / "config.json"), "--seed", "6", "--output", str(other)]) == 0
    c = load_file(str(other / "adapter" / "adapter_model.safetensors"))
    assert any((a[k] != c[k]).any() for k in a)


def test_rft_sft_saves_a_config_that_reads_back_as_the_same_config(tiny_folder, tmp_path):
    from rftkit.recipe import read_recipe
    from rftkit.sft import SFTConfig
    rows = [{"prompt": f"say {w}", "completion": w} for w in ("one", "two", "three", "four")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sft.yaml").write_text(f"model: {tiny_folder}\ndata: {tmp_path / 'd.jsonl'}\nsteps: 1\n"
                                       f"batch_size: 4\nlora_r: 2\noutput: {tmp_path / 'run'}\n")
    assert main(["sft", "--config", str(tmp_path / "sft.yaml"), "--lr", "0.01"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["steps"], saved["lora_r"], saved["lr"]) == (1, 2, 0.01)
    assert SFTConfig(**read_recipe(tmp_path / "run" / "config.json", SFTConfig)) == SFTConfig(**saved)
