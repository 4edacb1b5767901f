"""Every lesson's exercise: its check accepts the solution in lessons/solutions/, rejects a
plausible mistake and the unfilled stub, and the lesson itself calls that check."""
import importlib.util
import pathlib
import re

import pytest

from tinydeeplab import Function, exercises

ROOT = pathlib.Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9]*.py"))
SOLUTIONS = {p.stem: p for p in (ROOT / "lessons" / "solutions").glob("[0-9]*.py")}


def load(path):
    spec = importlib.util.spec_from_file_location(f"solution_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


class StubFunction(Function):  # the stub of an exercise that asks for a Function
    @staticmethod
    def forward(ctx, x):
        raise NotImplementedError("your code here")

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("your code here")


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_exercise_check_accepts_the_solution_and_rejects_mistakes(lesson):
    assert lesson.stem in SOLUTIONS, f"lessons/solutions/{lesson.name} is missing"
    solution = load(SOLUTIONS[lesson.stem])
    check = getattr(exercises, solution.CHECK)
    source = lesson.read_text(encoding="utf-8")
    called = re.search(rf"exercises\.run\(exercises\.{solution.CHECK}, (\w+)\)", source)
    assert called, f"{lesson.name} does not run exercises.{solution.CHECK} on its stub"
    assert check(solution.SOLUTION) is True
    with pytest.raises(AssertionError):
        check(solution.MISTAKE)
    assert exercises.run(check, solution.MISTAKE) is False
    unfilled = StubFunction if isinstance(solution.SOLUTION, type) else stub
    with pytest.raises(NotImplementedError):
        check(unfilled)
    assert exercises.run(check, unfilled) is False
