"""test_config.py - options classes, TOML files, SMALLMIND_* variables and flags: validation
naming the field, and the precedence flags > environment > file > defaults."""
import pytest

import smallmind as sm
from smallmind import cli
from smallmind.config import InferenceOptions, ModelOptions, ServerOptions, TrainingOptions, load_settings


def test_precedence_flags_env_file_defaults(tmp_path):
    f = tmp_path / "sm.toml"
    f.write_text('[training]\nsteps = 300\nbatch_size = 8\nlearning_rate = 5e-4\n'
                 '[inference]\nstop = ["\\n", "END"]\n[server]\nport = 9001\n[model]\npreset = "tiny"\n')
    d = load_settings(env={})
    assert (d.training.steps, d.server.port, d.inference.window, d.sources) == (1000, 8000, "shift", ("defaults",))
    s = load_settings(f, env={})
    assert (s.training.steps, s.training.batch_size, s.server.port, s.model.preset) == (300, 8, 9001, "tiny")
    assert s.inference.stop == ("\n", "END") and s.training.learning_rate == 5e-4
    env = {"SMALLMIND_TRAINING_STEPS": "700", "SMALLMIND_SERVER_TIMEOUT": "2.5",
           "SMALLMIND_INFERENCE_STOP": "a,b", "SMALLMIND_SIMD": "avx2", "PATH": "/bin"}
    e = load_settings(f, env=env)
    assert (e.training.steps, e.training.batch_size, e.server.timeout) == (700, 8, 2.5)
    assert e.inference.stop == ("a", "b") and e.sources == ("defaults", str(f), "environment")
    g = load_settings(f, env=env, overrides={"training": {"steps": 5, "seed": None}})
    assert (g.training.steps, g.training.seed) == (5, 42) and g.sources[-1] == "flags"
    again = tmp_path / "again.toml"
    again.write_text(g.to_toml())
    assert load_settings(again, env={}).to_dict() == g.to_dict()


@pytest.mark.parametrize("make,match", [
    (lambda: TrainingOptions(steps=-1), "steps"),
    (lambda: TrainingOptions(learning_rate=-1e-3), "learning_rate"),
    (lambda: TrainingOptions(batch_size=0), "batch_size"),
    (lambda: TrainingOptions(min_lr=0.5, learning_rate=0.1), "min_lr"),
    (lambda: TrainingOptions(save_every=5), "save_every"),
    (lambda: ModelOptions(n_embd=30, n_head=4), "n_embd"),
    (lambda: ModelOptions(preset="huge"), "preset"),
    (lambda: InferenceOptions(top_p=0), "top_p"),
    (lambda: InferenceOptions(window="crop"), "window"),
    (lambda: InferenceOptions(stop=[""]), "stop"),
    (lambda: ServerOptions(port=70000), "port"),
    (lambda: ServerOptions(timeout=0), "timeout"),
    # through the loader, the section is named too, and a wrong type is a ValidationError
    (lambda: load_settings(overrides={"training": {"steps": -1}}), "training.steps"),
    (lambda: load_settings(overrides={"training": {"steps": "ten"}}), "training.steps must be an int"),
    (lambda: load_settings(overrides={"server": {"port": 70000}}), "server.port"),
    (lambda: load_settings(overrides={"model": {"preset": "huge"}}), "model.preset"),
])
def test_bad_values_name_the_field(make, match):
    with pytest.raises(sm.ValidationError, match=match):
        make()


def test_wrong_types_are_type_errors_naming_the_field():
    with pytest.raises(TypeError, match="batch_size must be an int, got bool"):
        TrainingOptions(batch_size=True)
    with pytest.raises(TypeError, match="port must be an int, got str"):
        ServerOptions(port="80")


def test_training_options_are_the_one_definition_of_train_arguments():
    # Training.train's keywords are TrainingOptions' fields (batch_size and seed belong to
    # Training(...)), with the same defaults
    import dataclasses
    import inspect

    from smallmind.model.training import Training
    params = inspect.signature(Training.train).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}
    own = set(params) - {"self", "cancel", "callback"}
    assert own == set(fields) - {"batch_size", "seed"}
    for name in own - {"steps"}:
        assert params[name].default == fields[name], name
    assert set(TrainingOptions().train_arguments()) == own


def test_bad_files_and_variables(tmp_path):
    cases = {"unknown_section.toml": ("[gpu]\nx = 1\n", "unknown section"),
             "unknown_key.toml": ("[training]\nstepz = 3\n", "training.stepz"),
             "bad_type.toml": ('[server]\nport = "http"\n', "server.port"),
             "not_toml.toml": ("[training\n", "not valid TOML")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(sm.ValidationError, match=match):
            load_settings(tmp_path / name, env={})
    with pytest.raises(sm.ValidationError, match="no such config"):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(sm.ValidationError, match="SMALLMIND_TRAINING_STEPS"):
        load_settings(env={"SMALLMIND_TRAINING_STEPS": "many"})
    with pytest.raises(sm.ValidationError, match="server.colour"):
        load_settings(env={"SMALLMIND_SERVER_COLOUR": "red"})


def test_info_config_prints_the_effective_configuration(tmp_path, capsys, monkeypatch):
    f = tmp_path / "sm.toml"
    f.write_text("[inference]\ntemperature = 0.3\n")
    monkeypatch.setenv("SMALLMIND_SERVER_PORT", "8123")
    assert cli.main(["info", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "temperature = 0.3" in out and "port = 8123" in out and "environment" in out
    assert "[training]" in out and "steps = 1000" in out
    f.write_text("[training]\nsteps = 0.5\n")
    assert cli.main(["info", "--config", str(f)]) == 2
    assert "training.steps" in capsys.readouterr().err


def test_train_takes_its_options_from_a_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 100)
    cfg = tmp_path / "sm.toml"
    cfg.write_text(f'[model]\nn_layer = 1\nn_embd = 16\nn_head = 2\nblock_size = 16\n'
                   f'[training]\nsteps = 12\nbatch_size = 4\nwarmup_steps = 2\neval_every = 0\n'
                   f'log_every = 6\ncheckpoint_dir = "{tmp_path / "ck"}"\n')
    assert cli.main(["train", str(tmp_path / "a.txt"), "--config", str(cfg), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "n_layer=1" in out and "step 6/6" in out and (tmp_path / "ck" / "model_last.safetensors").exists()
