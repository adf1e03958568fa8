import types

import pytest
import torch
from helpers import run_cli, small_config, write_config


@pytest.fixture(scope="session")
def demo_assets():
    from diffsynth.demo import ensure_demo_assets
    return ensure_demo_assets()


@pytest.fixture(scope="session")
def small_render(demo_assets, tmp_path_factory):
    """The small config rendered once, uninterrupted: the reference the render and resume tests compare with.
    Returns the folder holding `run/` (the run folder). Tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("small_render")
    config = write_config(folder / "config.yaml", small_config(demo_assets, folder / "run"))
    # A real process (not forked by the tests' fork server): the renders the tests compare with it are forked, so
    # this also checks that forking changes no byte.
    result = run_cli("render", config, "--no-progress", fresh=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("video.mp4")
    return folder


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on 2-core CI boxes torch's intra-op threads spin badly when other processes
    compete for the cores (FastBlend's many small ops suffer most)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model set as diffusers folders and as single files in the original layouts, per test module."""
    from diffsynth.models.tiny import write_tiny_models, write_tiny_single_files
    root = tmp_path_factory.mktemp("tiny_models")
    folders = write_tiny_models(root / "folders")
    files = write_tiny_single_files(root / "files", folders)
    return types.SimpleNamespace(folders=folders, files=files, root=root)


def pytest_terminal_summary(terminalreporter):
    """Say why a browser test was skipped even under `pytest -q` (no -rs): a silent skip would hide a CI gap."""
    for report in terminalreporter.stats.get("skipped", []):
        if "tests/e2e/" in report.nodeid.replace("\\", "/") or report.nodeid.startswith("e2e/"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}", yellow=True)
