pytest_plugins = ["novalet_dev.testing"]

# A hook here, not in tests/e2e/conftest.py: under pytest-xdist the controlling process collects
# nothing, so only this conftest (and the plugins) is loaded there.
MATRIX_PROPERTY = "crash_matrix"  # tests/e2e/test_crash_recovery.py: (index, action, point, outcome)


def pytest_terminal_summary(terminalreporter):
    """The crash-point matrix (action x crash point -> outcome), as Markdown, from the rows the
    crash cases put in their reports (an xdist worker's reports reach this process too)."""
    rows = sorted({tuple(value) for reports in terminalreporter.stats.values() for report in reports
                   if getattr(report, "when", None) == "call"
                   for key, value in getattr(report, "user_properties", ()) if key == MATRIX_PROPERTY})
    if rows:
        terminalreporter.write_sep("=", "crash-point matrix")
        terminalreporter.write_line("| action | crash point | taskState at the crash -> outcome after restart |")
        terminalreporter.write_line("|---|---|---|")
        for _, action, point, outcome in rows:
            terminalreporter.write_line(f"| {action} | {point} | {outcome} |")
