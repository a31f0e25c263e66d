"""Assertions shared by the CLI tests (imported by them; not a test module)."""


def assert_one_line_error(result, *fragments):
    """A Click result that failed as bad input should: exit code 2, one line starting "Error:", no traceback, and
    each fragment in that line."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
