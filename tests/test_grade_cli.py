"""`rft grade` checks the grader and the data before any model loads: a bad field, a formula naming an unknown
grader, a python grader without `grade` each fail at once naming the field, even with a --model that does not
exist; a good grader gets as far as loading that model."""
import json
import subprocess
import sys
import time

import pytest

from rftkit.cli import main

GOOD = {"type": "multi", "calculate_output": "0.5 * name + 0.5 * args", "graders": {
    "name": {"type": "string_check", "input": "{{ sample.output_json.name }}", "reference": "{{ item.name }}",
             "operation": "eq"},
    "args": {"type": "text_similarity", "input": "{{ sample.output_text }}", "reference": "{{ item.arguments }}",
             "evaluation_metric": "fuzzy_match"}}}


def variant(**change):
    spec = json.loads(json.dumps(GOOD))
    for path, value in change.items():
        node = spec
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return spec


BAD = [
    (variant(graders__args__evaluation_metric="bleurt"), "grader.graders.args.evaluation_metric: must be one of"),
    (variant(calculate_output="0.5 * name + 0.5 * arguments"),
     "grader.calculate_output: calculate_output '0.5 * name + 0.5 * arguments': 'arguments' is not one of its graders"),
    (variant(graders__args={"type": "python", "source": "def score(sample, item):\n    return 1.0\n"}),
     "grader.graders.args.source: defines no top-level function `grade(sample, item)`"),
    (variant(graders__name__refrence="x"), "grader.graders.name.refrence: not a field of a string_check grader"),
    (variant(graders__name__input="{{ output_text }}"), "grader.graders.name.input: template variable"),
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "call it"}], "name": "f",
                                "arguments": "{}"}) + "\n")
    return str(path)


@pytest.mark.parametrize("spec, message", BAD)
def test_bad_grader_fails_before_any_model_loads(spec, message, data, tmp_path, capsys, monkeypatch):
    import rftkit.loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the grader was checked")
    monkeypatch.setattr(rftkit.loading, "load", no_load)
    (tmp_path / "g.json").write_text(json.dumps(spec))
    rc = main(["grade", "--grader", str(tmp_path / "g.json"), "--data", data, "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and f"rft grade: error: {message}" in err, err


def test_good_grader_gets_to_the_model_and_bad_data_is_named(data, tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps(GOOD))
    rc = main(["grade", "--grader", str(tmp_path / "g.json"), "--data", data, "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope: no such model folder or file" in err, err     # the model, not the grader, failed
    (tmp_path / "bad.jsonl").write_text('{"reference_answer": "x"}\n')
    rc = main(["grade", "--grader", str(tmp_path / "g.json"), "--data", str(tmp_path / "bad.jsonl")])
    assert rc == 2 and "bad.jsonl:1: no 'messages' or 'prompt' column" in capsys.readouterr().err


def test_rft_grade_command_fails_fast_and_grades_given_completions(data, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(BAD[1][0]))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "rftkit.cli", "grade", "--grader", str(tmp_path / "bad.json"),
                          "--data", data, "--model", "/does/not/exist"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "grader.calculate_output" in out.stderr, out.stderr
    assert time.perf_counter() - t0 < 60            # an interpreter start and a JSON check: no model, no engine
    rows = tmp_path / "done.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "call it", "name": "f", "arguments": "{}", "completion": c}) + "\n"
                            for c in ['{"name": "f"}', '{"name": "g"}', "plain"]))
    (tmp_path / "good.json").write_text(json.dumps(GOOD))
    out = subprocess.run([sys.executable, "-m", "rftkit.cli", "grade", "--grader", str(tmp_path / "good.json"),
                          "--data", str(rows), "--use-completions"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "on 3 completions of 3 rows" in out.stdout and "failed on 1 of 3 completions" in out.stdout
    assert "output_json" in out.stdout and "sub-grader 'name': mean 0.500 on 2" in out.stdout, out.stdout
