def pytest_terminal_summary(terminalreporter):
    """Say why a browser test was skipped even under `pytest -q` (no -rs): a silent skip would hide a CI gap."""
    for report in terminalreporter.stats.get("skipped", []):
        if "tests/e2e/" in report.nodeid.replace("\\", "/") or report.nodeid.startswith("e2e/"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}", yellow=True)
