import pytest

from delta_megatron.reward.extract import answer_line, extract_answer, last_boxed, wrap_math


@pytest.mark.parametrize("text, expected", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),                       # nested braces
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),            # deeper nesting
    (r"first \boxed{3}, then corrected: \boxed{4}", "4"),                     # multiple: the last
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                                       # escaped set braces
    (r"\boxed{7} and then \boxed{\frac{1}{", "7"),                            # truncated last one
    (r"\boxed 5 is it", "5"),                                                 # brace-less form
    (r"\fbox{12}", "12"),
    (r"\boxed{ } then \boxed{8}", "8"),
    (r"\boxed{8} then \boxed{  }", "8"),                                      # empty box skipped
    ("no answer here", None),
    (r"\boxedfoo{3}", None),                                                  # not a \boxed command
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("work...\nAnswer: 42", "42"),
    ("work\nAnswer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("**Answer:** 7", "7"),
    ("Final Answer: \\(x=2\\)", "x=2"),
    ("answer: 1\nthinking again\nAnswer: -3", "-3"),                          # the last line wins
    ("The answer is 5", None),                                                # no "Answer:" line
    ("Answer:   \n", None),
    ("Answer: \\$18.90", "\\$18.90"),                                         # escaped dollar kept
])
def test_answer_line(text, expected):
    assert answer_line(text) == expected


def test_boxed_takes_precedence_over_answer_line():
    assert extract_answer("Answer: 3\nso \\boxed{4}") == "4"
    assert extract_answer("Answer: 3\nso \\boxed{}") == "3"
    assert extract_answer("nothing") is None


@pytest.mark.parametrize("text, expected", [
    ("1/2", "$1/2$"),
    (" \\frac{1}{2} ", "$\\frac{1}{2}$"),
    ("\\$18.90", "$\\$18.90$"),     # an escaped dollar is text, not a delimiter
    ("$x$", "$x$"),
    ("\\boxed{3}", "\\boxed{3}"),
    ("\\(x\\)", "\\(x\\)"),
])
def test_wrap_math(text, expected):
    assert wrap_math(text) == expected


# Adversarial responses (the fault corpus): each would take minutes with a rescanning or backtracking
# extractor (``"\\boxed{" * 16000`` took 108 s in-process); the answers must still be the right ones.
ADVERSARIAL = {
    "16k unclosed boxes": ("\\boxed{" * 16000, None),
    "unclosed boxes after a good one": ("\\boxed{7}" + "\\boxed{" * 16000, "7"),
    "50k nested boxes": ("\\boxed{" * 50000 + "}" * 50000, "\\boxed{}"),
    "100k empty boxes then one": ("\\boxed{}" * 100000 + "\\boxed{5}", "5"),
    "brace-less boxes before dollars": ("\\boxed $" * 50000, None),
    "escaped braces in an open box": ("\\boxed{" + "\\{" * 100000, None),
    "answer keyword then 100k blanks": ("Answer" + " " * 100000 + "x", None),
    "answer of 60k dollar pairs": ("Answer: " + "$" * 60000 + "4" + "$" * 60000, "4"),
    "100k answer lines": ("Answer: 1\n" * 100000 + "Answer: 2", "2"),
}


@pytest.mark.parametrize("text, expected", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_responses_are_linear(text, expected):
    assert extract_answer(text) == expected


def test_only_the_tail_is_read():
    from delta_megatron.reward.extract import MAX_CHARS

    early = "\\boxed{1}" + "x" * MAX_CHARS  # the box is before the last MAX_CHARS characters
    assert extract_answer(early) is None
    assert extract_answer(early + "\\boxed{2}") == "2"
    assert extract_answer(early, max_chars=len(early)) == "1"
