"""Property: whatever JSON (or text) a user writes, validation answers with problems, never a traceback."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiosk.spec import load as specmod
from kiosk.core.errors import InvalidSpec

FIELDS = sorted(specmod.schema()["properties"]) + ["program", "package", "args", "ssid", "hostName", "lang"]

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=70)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), children, max_size=6),
    max_leaves=25,
)
# Near-valid specs reach the deeper semantic checks, not just the type errors.
near_valid = st.fixed_dictionaries(
    {"hostName": scalars, "hardware": st.sampled_from(["raspberryPi0", "raspberryPi3", "qemu", "x"]) | scalars,
     "program": st.fixed_dictionaries({"package": st.sampled_from(["cog", "chromium"]) | scalars}) | json_values},
    optional={name: json_values for name in FIELDS if name not in ("hostName", "hardware", "program")},
)


def answers_cleanly(data):
    try:
        spec = specmod.check(data, "fuzz.json")
    except InvalidSpec as exc:
        assert exc.problems, "an invalid spec must name at least one problem"
        for line in exc.render().splitlines():
            assert line.startswith("fuzz.json: /")
        return
    assert isinstance(spec.data["hostName"], str)


# The offline fixture only sets an environment variable, the same for every example: safe to share.
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(json_values)
def test_any_json_value_gives_problems_not_a_traceback(monkeypatch_offline, data):
    answers_cleanly(data)


@SETTINGS
@given(near_valid)
def test_near_valid_specs_give_problems_not_a_traceback(monkeypatch_offline, data):
    answers_cleanly(data)


@SETTINGS
@given(st.text(max_size=200) | json_values.map(json.dumps).map(lambda t: t[: len(t) // 2]))
def test_any_text_gives_problems_not_a_traceback(monkeypatch_offline, text):
    try:
        data = specmod.parse_json(text, "fuzz.json")
    except InvalidSpec as exc:
        assert exc.render().startswith("fuzz.json: /")
        return
    answers_cleanly(data)
